"""Coordinator round overhead at 1,000 and 10,000 simulated devices: everything except device training.

One command: ``python benchmarks/coordinator_scale.py [--sizes 1000,10000] [--broker-sizes 1000] [--store file|memory]
[--batch 256] [--dashboard]``.

Deltas: ``--templates`` devices really train (engine Trainer on ``examples.tiny_plan``, 8 steps of batch 8 on
their own samples) once; every simulated device then sends one template's delta re-encoded with its own device
id, round, base hash and counter (``Delta.to_bytes``: a real, distinct, canonical payload per device). The
encoding happens before the clock starts: it is the devices' work.

(a) in-memory: the sans-I/O ``Coordinator`` driven directly (hello + status per device, batched like the deltas,
then StartRound, every delta, commit), with the real SQLite store (``--store file``: WAL + synchronous=FULL on
local disk, as ``tinyfleet serve``; ``memory``: ``:memory:``). Timed phases: dispatch (select + N tasks), ingest (decode, judge,
dedup, write-ahead, fold into the round's running sums), commit (the last delta, aggregate from the running sums,
encode + hash the update, persist). Ingest goes through ``Coordinator.handle_many`` in batches of ``--batch``
deltas (one store transaction, one fsync each: what an MQTT adapter does per network-loop iteration, acknowledging
the batch after it returns); ``--batch 1`` is one ``handle`` (one fsync) per delta. Also timed after the round:
``stacked`` (re-read and re-decode every accepted delta from the store: what a coordinator restarted mid-round
pays once) and ``aggregate`` over those rows alone. ``round_overhead_cpu_s`` is the process CPU time of the three
timed phases: on a shared machine it tells our work from waiting for a core (it leaves out fsync waits).

(b) broker: the same coordinator behind ``fleet.mqtt.CoordinatorLink`` on an embedded Mosquitto; one MQTT client
plays all N devices (it answers every ``dev/<id>/task`` with that device's pre-encoded delta at once), so the
time from StartRound to RoundClosed is coordinator + broker + paho overhead with zero training time. One
client, not N: 1,000+ paho clients need 1,000+ threads, which would measure our 2 cores, not the coordinator.

(c) ``--dashboard``: (b) again with a live dashboard on the same link, as ``serve --dashboard`` runs it (every
coordinator output applied to its view, the registry copied every 0.5 s through ``CoordinatorLink.call``) and a
reader fetching the summary and a 50-row page of the device table every 0.5 s: ``overhead_ratio`` is its round
overhead over (b)'s, measured in the same run, plus the reader's request latencies.

Last line: one JSON object, per size ``{"inmemory": {...}, "broker": {...}}``; seconds and deltas/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import emit, peak_rss_mb


def template_deltas(plan, n: int) -> list:
    """``n`` real deltas (``wire.delta.Delta`` objects) from real local training."""
    from device_agent.engine.trainer import Trainer
    from device_agent.wire.delta import encode_delta
    from device_agent.wire.plan import plan_hash
    from tests.fixtures.tiny import tiny_dataset

    out = []
    for i in range(n):
        x, y = tiny_dataset(48, seed=i)
        t = Trainer(plan)
        old = t.trainable_state()
        rng = np.random.default_rng(i)
        for _ in range(8):
            idx = rng.integers(0, len(y), 8)
            t.train_step(x[idx], y[idx], 0.2)
        out.append(encode_delta(plan, old, t.trainable_state(), device_id="tmpl", round_id=1, base_hash=b"\0" * 32,
                                counter=1, sample_count=48, plan_hash=plan_hash(plan)))
    return out


def payloads(templates, ids: list[str], round_id: int, base_hash: str) -> dict[str, bytes]:
    out = {}
    for i, d in enumerate(ids):
        t = templates[i % len(templates)]
        t.device_id, t.round_id, t.base_hash, t.counter = d, round_id, bytes.fromhex(base_hash), round_id
        out[d] = t.to_bytes()
    return out


def hello(d: str, plan_hash: str) -> tuple[bytes, bytes]:
    from device_agent.wire.messages import Hello, Status

    return (Hello(d, "stm32f746", 320_000, 1_000_000, (plan_hash,), "sim").to_json(),
            Status(d, "online", 1, 48).to_json())


def coordinator(plan, n: int, store_path: str, clock=time.time):
    from fleet import round as rnd
    from fleet.coordinator import Coordinator, CoordinatorConfig, WireCodec
    from fleet.store import Store

    cfg = CoordinatorConfig(round=rnd.RoundConfig(goal=n, over_selection=1.0, quorum=0.5, deadline_s=3600.0))
    return Coordinator(plan, Store(store_path), cfg, clock, WireCodec(plan))


def run_inmemory(plan, templates, n: int, store: str, workdir: Path, batch: int = 256) -> dict:
    from fleet import aggregate as agg
    from fleet.coordinator import Boot, Received, RoundClosed, StartRound

    path = ":memory:" if store == "memory" else str(workdir / f"inmem-{n}.sqlite")
    c = coordinator(plan, n, path)
    c.handle(Boot())
    ids = [f"dev{i:05d}" for i in range(n)]
    t0 = time.perf_counter()
    step = max(1, batch // 2)
    for i in range(0, n, step):
        c.handle_many([Received(kind, d, msg) for d in ids[i:i + step]
                       for kind, msg in zip(("hello", "status"), hello(d, c.codec.plan_hash))])
    register_s = time.perf_counter() - t0
    blobs = payloads(templates, ids, c.machine.round_id + 1, c.hash)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    tasks = c.handle(StartRound())
    dispatch_s = time.perf_counter() - t0
    assert len(tasks) == n, f"{len(tasks)} tasks for {n} devices"
    rest = ids[:-1]
    t0 = time.perf_counter()
    if batch <= 1:
        for d in rest:
            c.handle(Received("delta", d, blobs[d]))
    else:
        for i in range(0, len(rest), batch):
            c.handle_many([Received("delta", d, blobs[d]) for d in rest[i:i + batch]])
    ingest_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = c.handle(Received("delta", ids[-1], blobs[ids[-1]]))
    commit_s = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0
    closed = [o for o in out if isinstance(o, RoundClosed)]
    assert closed and closed[0].committed and len(closed[0].accepted) == n
    rid = closed[0].round_id
    t0 = time.perf_counter()
    stacked = c.stacked(rid)
    stacked_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    agg.aggregate("fedavg", *stacked)
    aggregate_s = time.perf_counter() - t0
    total = dispatch_s + ingest_s + commit_s
    return {"devices": n, "store": store, "batch": batch, "register_s": register_s, "dispatch_s": dispatch_s,
            "ingest_s": ingest_s,
            "ingest_per_delta_ms": 1e3 * ingest_s / max(1, n - 1), "commit_s": commit_s,
            "restart_redecode_s": stacked_s, "commit_aggregate_s": aggregate_s, "round_overhead_s": total,
            "round_overhead_cpu_s": cpu_s,
            "aggregation_deltas_per_s": n / commit_s, "aggregate_only_deltas_per_s": n / aggregate_s,
            "delta_bytes": len(blobs[ids[0]]), "coordinates": int(stacked[0].shape[1])}


class Watcher:
    """A live dashboard on the link, as ``serve --dashboard`` runs it (coordinator outputs applied, registry
    followed every 0.5 s), and a browser-like reader fetching the summary and a page of the device table every
    0.5 s; records each request's latency."""

    def __init__(self, fleet: str, plan_hash: str):
        from fleet.dashboard.server import Dashboard
        from fleet.dashboard.view import FleetView

        self.dash = Dashboard(FleetView(fleet, plan_hash)).start()
        self.latency_ms: list[float] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)

    def follow(self, link) -> Watcher:
        self.dash.follow(link)
        self._reader.start()
        return self

    def apply(self, output) -> None:
        self.dash.update(lambda v: v.apply(output))

    def _read(self) -> None:
        import urllib.request

        page = 0
        while not self._stop.wait(0.5):
            for path in ("api/summary", f"api/devices?page={page}&size=50"):
                t = time.perf_counter()
                with urllib.request.urlopen(self.dash.url + path, timeout=30) as r:
                    r.read()
                self.latency_ms.append(1000 * (time.perf_counter() - t))
            page += 1

    def stop(self) -> dict:
        self._stop.set()
        self._reader.join(35)
        self.dash.stop()
        lat = sorted(self.latency_ms) or [float("nan")]
        return {"requests": len(self.latency_ms), "latency_ms_p50": lat[len(lat) // 2], "latency_ms_max": lat[-1]}


def run_broker(plan, templates, n: int, store: str, workdir: Path, dashboard: bool = False) -> dict:
    from device_agent.mqtt import MqttEndpoint
    from device_agent.wire.messages import full_topic, split_topic
    from fleet.coordinator import RoundClosed, StartRound
    from fleet.mqtt import CoordinatorLink
    from fleet.sim.broker import EmbeddedBroker

    fleet = "scale"
    tag = "-dash" if dashboard else ""
    path = ":memory:" if store == "memory" else str(workdir / f"broker-{n}{tag}.sqlite")
    closed: list = []
    done = threading.Event()
    watcher: Watcher | None = None

    def on_output(o):
        if watcher is not None:
            watcher.apply(o)
        if isinstance(o, RoundClosed):
            closed.append((time.perf_counter(), o))
            done.set()

    with EmbeddedBroker(workdir=workdir / f"broker-{n}{tag}") as broker:
        link = CoordinatorLink(broker.url, fleet, lambda: coordinator(plan, n, path), on_output=on_output).start()
        if dashboard:
            watcher = Watcher(fleet, link.call(lambda c: c.codec.plan_hash)).follow(link)
        ids = [f"dev{i:05d}" for i in range(n)]
        base = link.call(lambda c: (c.machine.round_id + 1, c.hash, c.codec.plan_hash))
        blobs = payloads(templates, ids, base[0], base[1])
        tasks_seen = [0]
        sim: MqttEndpoint

        def on_task(topic, payload, ack):
            where = split_topic(fleet, topic)
            if where is not None and where[1] == "task":
                tasks_seen[0] += 1
                sim.publish(full_topic(fleet, f"dev/{where[0]}/delta"), blobs[where[0]])
            ack()

        sim = MqttEndpoint(broker.url, "scale-sim", [full_topic(fleet, "dev/+/task")], on_task).start()
        t0 = time.perf_counter()
        for d in ids:
            h, s = hello(d, base[2])
            sim.publish(full_topic(fleet, f"dev/{d}/hello"), h, retain=True)
            sim.publish(full_topic(fleet, f"dev/{d}/status"), s, retain=True)
        end = time.monotonic() + 120
        while link.call(lambda c: sum(r.online for r in c.registry.devices.values())) < n:
            assert time.monotonic() < end, "devices did not register"
            time.sleep(0.05)
        register_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        link.submit(StartRound())
        ok = done.wait(600)
        t1 = closed[0][0] if closed else time.perf_counter()
        seen = watcher.stop() if watcher is not None else None
        sim.stop()
        link.stop()
        assert ok and closed[0][1].committed, f"round did not commit: {closed}"
        return {"devices": n, "store": store, "register_s": register_s, "round_overhead_s": t1 - t0,
                "tasks_seen": tasks_seen[0], "accepted": len(closed[0][1].accepted),
                "deltas_per_s": len(closed[0][1].accepted) / (t1 - t0), "link_errors": list(link.errors),
                **({"dashboard": seen} if seen is not None else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--broker-sizes", default="1000")
    ap.add_argument("--store", choices=("file", "memory"), default="file")
    ap.add_argument("--templates", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256, help="deltas per handle_many (1: one handle per delta)")
    ap.add_argument("--dashboard", action="store_true",
                    help="run each broker size twice, without and with a live dashboard and a reader: its overhead")
    args = ap.parse_args()
    from tests.fixtures.tiny import tiny_plan

    plan = tiny_plan()
    templates = template_deltas(plan, args.templates)
    result: dict = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tinyfleet-scale-") as tmp:
        for n in [int(s) for s in args.sizes.split(",") if s]:
            r = run_inmemory(plan, templates, n, args.store, Path(tmp), args.batch)
            result.setdefault(str(n), {})["inmemory"] = r
            rows.append((n, "in-memory", args.store, f"{r['round_overhead_s']:.2f}", f"{r['dispatch_s']:.2f}",
                         f"{r['ingest_s']:.2f}", f"{r['commit_s']:.2f}", f"{r['restart_redecode_s']:.2f}",
                         f"{r['aggregation_deltas_per_s']:.0f}"))
        for n in [int(s) for s in args.broker_sizes.split(",") if s]:
            r = run_broker(plan, templates, n, args.store, Path(tmp))
            result.setdefault(str(n), {})["broker"] = r
            rows.append((n, "broker", args.store, f"{r['round_overhead_s']:.2f}", "", "", "", "",
                         f"{r['deltas_per_s']:.0f}"))
            if args.dashboard:
                d = run_broker(plan, templates, n, args.store, Path(tmp), dashboard=True)
                d["overhead_ratio"] = d["round_overhead_s"] / r["round_overhead_s"]
                result[str(n)]["broker_dashboard"] = d
                rows.append((n, "broker + dashboard", args.store, f"{d['round_overhead_s']:.2f}", "", "", "", "",
                             f"{d['deltas_per_s']:.0f}"))
    result["peak_rss_mb"] = peak_rss_mb()
    result["target_overhead_s_at_10000"] = 5.0
    emit(result, rows, ("devices", "link", "store", "overhead s", "dispatch s", "ingest s", "commit s",
                        "restart re-decode s", "deltas/s (commit)"))


if __name__ == "__main__":
    main()
