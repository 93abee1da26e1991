"""What idle aggregation workers cost per second: CPU of the worker processes and the pool's threads, no deltas.

One command: ``python benchmarks/pool_idle.py [--workers 1] [--seconds 30]``.

A coordinator (``CoordinatorLink`` on an embedded Mosquitto) and ``--workers`` aggregation workers
(fleet/coordinator/pool.py) sit idle for ``--seconds``: no device, no delta. What their processes spend then is
paid again every second of every round, however long the devices train (a 10,000-device round lasted 300-600 s on
this machine), so it belongs to the overhead a round pays. Reports CPU ms per second for the worker processes (every
thread: main loop, MQTT network thread) and for the coordinator's threads, from Linux's scheduler counters. Last
line: one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit
from benchmarks.sched_probe import process_sched, threads_sched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    from device_agent.wire.messages import DEVICE_UP
    from fleet import round as rnd
    from fleet.coordinator import Coordinator, CoordinatorConfig, WireCodec
    from fleet.coordinator.pool import AggregationPool
    from fleet.mqtt import CoordinatorLink
    from fleet.sim.broker import EmbeddedBroker
    from fleet.store import Store
    from tests.fixtures.tiny import tiny_plan

    plan = tiny_plan()
    cfg = CoordinatorConfig(round=rnd.RoundConfig(goal=10, over_selection=1.0, quorum=1.0, deadline_s=60.0))
    with tempfile.TemporaryDirectory(prefix="tinyfleet-poolidle-") as tmp, \
            EmbeddedBroker(workdir=Path(tmp) / "broker") as broker:
        pool = AggregationPool(broker.url, "idle", WireCodec(plan), args.workers)

        def factory():
            c = Coordinator(plan, Store(str(Path(tmp) / "store.sqlite")), cfg, time.time, WireCodec(plan))
            c.partials = pool.partials
            return c

        link = CoordinatorLink(broker.url, "idle", factory, kinds=tuple(k for k in DEVICE_UP if k != "delta")).start()
        pool.start(link)
        time.sleep(2.0)  # settle: connections, subscriptions
        named = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        pids = pool.pids()
        w0, t0 = [process_sched(p) for p in pids], threads_sched(named)
        time.sleep(args.seconds)
        w1, t1 = [process_sched(p) for p in pids], threads_sched(named)
        pool.stop()
        link.stop()
    per_s = 1e3 / args.seconds
    r = {"workers": args.workers, "seconds": args.seconds,
         "worker_process_cpu_ms_per_s": [round((b[0] - a[0]) * per_s, 3) for a, b in zip(w0, w1)],
         "coordinator_threads_cpu_ms_per_s": {k: round((v[0] - t0.get(k, (0.0, 0.0))[0]) * per_s, 3)
                                              for k, v in t1.items() if k != "MainThread"}}
    rows = [(f"worker {i}", v) for i, v in enumerate(r["worker_process_cpu_ms_per_s"])]
    rows += [(k, v) for k, v in r["coordinator_threads_cpu_ms_per_s"].items()]
    emit(r, rows, ("process / thread", "CPU ms per s idle"))


if __name__ == "__main__":
    main()
