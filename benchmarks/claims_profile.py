"""CPU profile of the aggregation path with workers: what a worker and the coordinator do per delta, by function.

One command: ``python benchmarks/claims_profile.py [--deltas 10000] [--batch 30] [--top 12] [--plain]``.

The path of ``aggregation_workers: N`` without the broker and the pipes: ``--deltas`` distinct real deltas
(``coordinator_scale.template_deltas``, the ``examples.tiny_plan`` of ``fleet_python.py``); a worker's share
(``read_delta`` then, once accepted, ``flat_delta`` + ``RunningSums.add``) and the coordinator's share
(``Coordinator.handle_many`` over ``Claimed`` events, ``--batch`` per store transaction on a SQLite file with WAL +
synchronous=FULL, as ``serve``) each run under cProfile. ``--batch 30`` is what a 10,000-device round of
``fleet_python.py`` hands the coordinator per 0.5 s claim window (10,000 deltas over ~350 commits). Reports per
delta: CPU µs of each side, wall µs of the coordinator's side, the commits' wall time (fsync) apart, and the top
functions by own CPU time (cProfile timing thread CPU time; it adds its own overhead: compare shares, not absolute
times, with the benchmark).
``--plain``: the same without cProfile, for CPU times without its overhead. ``--no-round-cache``: the store's
per-connection round-state cache defeated (the A/B of that cache: alternate runs with and without it).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit
from benchmarks.coordinator_scale import coordinator, hello, payloads, template_deltas
from benchmarks.sched_probe import CountingConnection


def _top(prof: cProfile.Profile, n: int, calls: int) -> list[tuple[str, float, int]]:
    """The ``n`` functions with the most own time: ``(file:line(name), µs per delta, calls)``."""
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, name), (_cc, nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((f"{Path(file).name}:{line}({name})", 1e6 * tt / calls, nc))
    return sorted(rows, key=lambda r: -r[1])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deltas", type=int, default=10000)
    ap.add_argument("--templates", type=int, default=8)
    ap.add_argument("--batch", type=int, default=30, help="claims per coordinator store transaction")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--plain", action="store_true", help="no cProfile: CPU and wall times without its overhead")
    ap.add_argument("--no-round-cache", action="store_true",
                    help="the store checks the round's row on every delta (its per-connection cache of the round "
                         "state defeated): run alternately with and without it for that cache's A/B")
    args = ap.parse_args()
    from fleet.aggregate import RunningSums
    from fleet.coordinator import Boot, Claimed, Received, RoundClosed, StartRound
    from fleet.coordinator.deltas import flat_delta, read_delta
    from tests.fixtures.tiny import tiny_plan

    plan = tiny_plan()
    templates = template_deltas(plan, args.templates)
    n = args.deltas
    ids = [f"dev{i:05d}" for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="tinyfleet-claimsprof-") as tmp:
        c = coordinator(plan, n, str(Path(tmp) / "store.sqlite"))
        c.partials = lambda round_id: []  # NOTE: no worker partials: the commit decodes from the store (not timed)
        if args.no_round_cache:  # a data descriptor that always answers "unknown" shadows the instance's cache
            c.store.__class__ = type("UncachedStore", (type(c.store),),
                                     {"_round_state": property(lambda s: None, lambda s, v: None)})
        c.handle(Boot())
        for i in range(0, n, 128):
            c.handle_many([Received(k, d, m) for d in ids[i:i + 128]
                           for k, m in zip(("hello", "status"), hello(d, c.codec.plan_hash))])
        blobs = payloads(templates, ids, c.machine.round_id + 1, c.hash)
        c.handle(StartRound())
        db = c.store._db = CountingConnection(c.store._db)

        worker = cProfile.Profile(time.thread_time)  # NOTE: CPU time: the machine is shared
        t0, c0 = time.perf_counter(), time.process_time()
        if not args.plain:
            worker.enable()
        reads = {d: read_delta(c.codec, d, blobs[d]) for d in ids}
        worker.disable()
        read_cpu = time.process_time() - c0
        claims = [Claimed(d, blobs[d], r.content_hash, r.decoded.header if r.decoded else None, r.reject, r.detail)
                  for d, r in reads.items()]

        coord = cProfile.Profile(time.thread_time)
        rest = claims[:-1]  # NOTE: the last one closes the round (commit: not the per-delta path)
        t0, c0 = time.perf_counter(), time.process_time()
        if not args.plain:
            coord.enable()
        for i in range(0, len(rest), args.batch):
            c.handle_many(rest[i:i + args.batch])
        coord.disable()
        coord_wall, coord_cpu = time.perf_counter() - t0, time.process_time() - c0
        commits = db.counts()

        shared = [t for t in plan.trainable if not t.personal]
        sums = RunningSums(sum(t.numel for t in shared))
        c0 = time.process_time()
        if not args.plain:
            worker.enable()
        for r in reads.values():
            sums.add(*flat_delta(shared, r.decoded), r.decoded.header.num_samples)
        worker.disable()
        sum_cpu = time.process_time() - c0
        out = c.handle_many(claims[-1:])
        assert any(isinstance(o, RoundClosed) and o.committed for o in out)

    per = 1e6 / (n - 1)
    r = {"deltas": n, "batch": args.batch, "delta_bytes": len(blobs[ids[0]]), "round_cache": not args.no_round_cache,
         "worker_read_cpu_us": 1e6 * read_cpu / n, "worker_sum_cpu_us": 1e6 * sum_cpu / n,
         "coordinator_cpu_us": coord_cpu * per, "coordinator_wall_us": coord_wall * per,
         "coordinator_commit_wall_us": commits["commit_wall_s"] * per,
         "commits": commits["durable_commits"], "statements_per_delta": commits["statements"] / (n - 1),
         "profiled": "no" if args.plain else "cProfile, thread CPU time (includes its overhead)",
         "coordinator_top": [] if args.plain else _top(coord, args.top, n - 1),
         "worker_top": [] if args.plain else _top(worker, args.top, n)}
    rows = [(side, name, f"{us:.1f}", calls) for side, key in (("coordinator", "coordinator_top"),
                                                                ("worker", "worker_top"))
            for name, us, calls in r[key]]
    if args.plain:
        rows = [(k, "", f"{v:.1f}", "") for k, v in r.items() if k.endswith("_us")]
    emit(r, rows, ("side", "function", "own µs/delta", "calls"))


if __name__ == "__main__":
    main()
