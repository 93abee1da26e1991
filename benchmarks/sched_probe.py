"""Where a process's wall time goes, from Linux's own scheduler counters: CPU, waiting for a core, the rest blocked.

``/proc/<pid>/task/<tid>/schedstat`` holds, per thread, nanoseconds on a CPU, nanoseconds runnable but waiting in a
run queue (a core was busy with something else) and the number of time slices. A thread's wall time over a window
is then CPU + run-queue wait + blocked (I/O such as an fsync, a lock, the GIL, an empty queue). Used by
``fleet_python.py`` to say what the coordinator's and the aggregation workers' time is made of; also a SQLite
connection wrapper that counts and times the store's commits (each durable commit is one fsync of the WAL with
``synchronous=FULL``), and a peak-memory sampler that runs in a process of its own so that its reads of /proc (seconds
of CPU over a 10,000-device round) do not compete with the measured coordinator for its interpreter. Linux only;
it refuses nothing and reads only /proc.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path


def thread_sched(tid: int | None = None, pid: int | None = None) -> tuple[float, float]:
    """``(cpu_s, runqueue_wait_s)`` of one thread (default: the calling one); zeros if it is gone."""
    path = "/proc/thread-self/schedstat" if tid is None else f"/proc/{pid or os.getpid()}/task/{tid}/schedstat"
    try:
        cpu, wait, _ = Path(path).read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(cpu) / 1e9, int(wait) / 1e9


def process_sched(pid: int) -> tuple[float, float]:
    """``(cpu_s, runqueue_wait_s)`` summed over every live thread of ``pid``."""
    cpu = wait = 0.0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for t in tids:
        c, w = thread_sched(int(t), pid)
        cpu, wait = cpu + c, wait + w
    return cpu, wait


def threads_sched(named: dict[int, str]) -> dict[str, tuple[float, float]]:
    """``name -> (cpu_s, runqueue_wait_s)`` for this process's threads given as ``native_id -> name`` (summed by
    name prefix up to the first digit, so ``tinyfleet-agg0-claims`` and ``-agg1-`` add up)."""
    out: dict[str, tuple[float, float]] = {}
    for tid, name in named.items():
        c, w = thread_sched(tid)
        key = name.rstrip("0123456789-") or name
        a, b = out.get(key, (0.0, 0.0))
        out[key] = (a + c, b + w)
    return out


class CountingConnection:
    """A ``sqlite3.Connection`` stand-in that counts statements and times every ``COMMIT`` (the fsync)."""

    def __init__(self, db):
        self._db = db
        self.statements = 0
        self.commits = 0  # COMMITs that wrote something (a durable commit: one WAL fsync)
        self.empty_commits = 0  # COMMITs of a transaction that changed nothing (no fsync)
        self.commit_s = 0.0
        self._changes_at_begin = 0

    def execute(self, sql: str, *args):
        self.statements += 1
        if sql.startswith("BEGIN"):
            self._changes_at_begin = self._db.total_changes
        if sql == "COMMIT":
            wrote = self._db.total_changes != self._changes_at_begin
            t0 = time.perf_counter()
            cur = self._db.execute(sql, *args)
            if wrote:
                self.commits += 1
                self.commit_s += time.perf_counter() - t0
            else:
                self.empty_commits += 1
            return cur
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, rows):
        self.statements += 1
        return self._db.executemany(sql, rows)

    def counts(self) -> dict:
        return {"statements": self.statements, "durable_commits": self.commits, "empty_commits": self.empty_commits,
                "commit_wall_s": self.commit_s}

    def __getattr__(self, name):
        return getattr(self._db, name)


def _mem_loop(conn, parent: int, period: float) -> None:
    """The sampler process: sum of PSS of ``parent`` and the pids it is given, every ``period`` s; peak on stop."""
    from benchmarks.fleet_qemu import pss_kb

    os.nice(5)  # NOTE: a meter, not part of what is measured: it yields the cores first
    pids: list[int] = []
    peak = 0
    while True:
        if conn.poll(period):
            cmd, arg = conn.recv()
            if cmd == "stop":
                conn.send(peak)
                return
            pids = list(arg)
        peak = max(peak, pss_kb(parent) + sum(pss_kb(p) for p in pids))


class MemProbe:
    """Peak of (this process's PSS + the PSS of ``pids``), sampled every ``period`` s by a child process."""

    def __init__(self, period: float = 1.0):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_mem_loop, args=(child, os.getpid(), period), daemon=True,
                                 name="tinyfleet-memprobe")
        self._pids: list[int] = []
        self.peak_kb = 0

    def start(self) -> MemProbe:
        self._proc.start()
        return self

    @property
    def pids(self) -> list[int]:
        return list(self._pids)

    @pids.setter
    def pids(self, pids: list[int]) -> None:
        self._pids = list(pids)
        self._conn.send(("pids", self._pids))

    def stop(self) -> None:
        self._conn.send(("stop", None))
        self.peak_kb = self._conn.recv() if self._conn.poll(30) else 0
        self._proc.join(10)
