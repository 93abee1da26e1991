"""What one delta costs the aggregation side, stage by stage: decode, check, sum, persist, broker fan-in.

One command: ``python benchmarks/delta_costs.py [--deltas 5000] [--batch 256]``.

Deltas: ``--templates`` devices really train (engine Trainer on ``examples.tiny_plan``, the plan of
``fleet_python.py``); every simulated device sends one template re-encoded with its own id, round, base and counter
(``Delta.to_bytes``: distinct canonical payloads). Stages, each timed alone over every delta, single thread:

- ``decode``: :func:`fleet.coordinator.deltas.read_delta` (wire reader + sha256 + the device check): what an
  aggregation worker does per delta;
- ``check``: the round machine's verdict (``RoundMachine.handle(DeltaArrived)``), the coordinator's per-delta judge;
- ``sum``: flatten + ``RunningSums.add`` (the FedAvg fold);
- ``persist``: ``Store.accept_delta`` in transactions of ``--batch`` deltas on a SQLite file (WAL, synchronous=FULL,
  as ``serve``); also the cost of one commit (fsync) alone;
- ``broker fan-in``: one paho client publishes every payload at QoS 1 to an embedded Mosquitto and one subscriber
  (manual acks, as the coordinator's link) receives them all; deltas/s from first publish to last arrival, and the
  same with the deltas split over ``--share`` subscribers of a shared subscription.

Last line: one JSON object (microseconds per delta, deltas/s). Numbers are for this plan's delta size (printed);
decode and sum grow with the number of coordinates, check and persist barely do.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit
from benchmarks.coordinator_scale import payloads, template_deltas


def _per(fn, items) -> float:
    t0 = time.perf_counter()
    for it in items:
        fn(it)
    return 1e6 * (time.perf_counter() - t0) / max(1, len(items))


def stages(plan, blobs: dict[str, bytes], batch: int, workdir: Path) -> dict:
    from fleet import round as rnd
    from fleet.aggregate import RunningSums
    from fleet.coordinator import WireCodec
    from fleet.coordinator.deltas import flat_delta, read_delta
    from fleet.store import DeltaRow, Store

    codec = WireCodec(plan)
    ids = list(blobs)
    reads = {}
    decode_us = _per(lambda d: reads.__setitem__(d, read_delta(codec, d, blobs[d])), ids)
    assert all(r.decoded is not None for r in reads.values())
    m = rnd.RoundMachine(rnd.RoundConfig(goal=len(ids), over_selection=1.0, quorum=1.0, deadline_s=1e9),
                         codec.plan_hash)
    up0 = reads[ids[0]].decoded.header
    m.handle(rnd.StartRound(1, 1, up0.base_hash, 0.0))
    m.handle(rnd.Eligible(tuple(ids), 0.0))
    verdicts = []
    check_us = _per(lambda d: verdicts.append(m.handle(rnd.DeltaArrived(reads[d].decoded.header, 1.0))), ids[:-1])
    assert all(isinstance(v[0], rnd.Accepted) for v in verdicts), verdicts[:1]
    shared = [t for t in plan.trainable if not t.personal]
    sums = RunningSums(sum(t.numel for t in shared))
    sum_us = _per(lambda d: sums.add(*flat_delta(shared, reads[d].decoded), reads[d].decoded.header.num_samples), ids)
    store = Store(str(workdir / "persist.sqlite"))
    store.bind_plan(codec.plan_hash, "sync")
    store.save_round({"round_id": 1, "state": "collecting", "selected": ids})
    t0 = time.perf_counter()
    for i in range(0, len(ids), batch):
        with store.batch():
            for d in ids[i:i + batch]:
                up = reads[d].decoded.header
                store.accept_delta(DeltaRow(1, d, up.content_hash, up.counter, up.num_samples, blobs[d]),
                                   "collecting")
    persist_us = 1e6 * (time.perf_counter() - t0) / len(ids)
    t0 = time.perf_counter()
    for k in range(50):
        store.save_round({"round_id": 1, "state": "collecting", "selected": [], "k": k})
    commit_ms = 1e3 * (time.perf_counter() - t0) / 50
    return {"decode_us": decode_us, "check_us": check_us, "sum_us": sum_us, "persist_us": persist_us,
            "persist_batch": batch, "one_commit_ms": commit_ms,
            "coordinator_alone_us": decode_us + check_us + sum_us + persist_us,
            "coordinator_with_workers_us": check_us + persist_us}


def fan_in(blobs: dict[str, bytes], share: int, workdir: Path) -> dict:
    """Deltas/s through Mosquitto: one publisher, then 1 and ``share`` subscribers (shared subscription)."""
    from device_agent.mqtt import MqttEndpoint
    from device_agent.wire.messages import full_topic
    from fleet.sim.broker import EmbeddedBroker

    out = {}
    with EmbeddedBroker(workdir=workdir / "fanin") as broker:
        for k, subs in enumerate((1, share)):
            left = [len(blobs)]
            lock, done = threading.Lock(), threading.Event()

            def got(topic, payload, ack, left=left, lock=lock, done=done):
                hashlib.sha256(payload).digest()  # touch the bytes, as a reader does
                ack()
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
            topic = full_topic("fan", "dev/+/delta")
            eps = [MqttEndpoint(broker.url, f"fan-sub{k}-{i}", [f"$share/fan/{topic}" if subs > 1 else topic], got)
                   .start() for i in range(subs)]
            pub = MqttEndpoint(broker.url, f"fan-pub{k}", [], lambda *a: None).start()
            time.sleep(0.3)
            t0 = time.perf_counter()
            for d, b in blobs.items():
                pub.publish(full_topic("fan", f"dev/{d}/delta"), b)
            assert done.wait(300), f"{left[0]} deltas never arrived"
            dt = time.perf_counter() - t0
            out[f"fan_in_{subs}_subscriber{'s' if subs > 1 else ''}_per_s"] = len(blobs) / dt
            for e in (*eps, pub):
                e.stop()
            if share == 1:
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deltas", type=int, default=5000)
    ap.add_argument("--templates", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256, help="deltas per store transaction")
    ap.add_argument("--share", type=int, default=2, help="subscribers of the shared subscription (fan-in)")
    args = ap.parse_args()
    from tests.fixtures.tiny import tiny_plan

    plan = tiny_plan()
    templates = template_deltas(plan, args.templates)
    ids = [f"dev{i:06d}" for i in range(args.deltas)]
    from fleet.coordinator import Coordinator  # noqa: F401  (imports the coordinator stack before timing)
    from fleet.coordinator.codec import WireCodec

    base = "00" * 32
    codec = WireCodec(plan)
    blobs = payloads(templates, ids, 1, base)
    with tempfile.TemporaryDirectory(prefix="tinyfleet-deltacosts-") as tmp:
        r = stages(plan, blobs, args.batch, Path(tmp))
        r.update(fan_in(blobs, args.share, Path(tmp)))
    r.update({"deltas": args.deltas, "delta_bytes": len(next(iter(blobs.values()))),
              "coordinates": sum(t.numel for t in plan.trainable if not t.personal), "plan_hash": codec.plan_hash})
    rows = [(k, f"{v:.1f}") for k, v in r.items() if k.endswith(("_us", "_ms", "_per_s"))]
    emit(r, rows, ("stage", "value"))


if __name__ == "__main__":
    main()
