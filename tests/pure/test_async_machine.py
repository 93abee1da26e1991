"""Async buffered rounds: the machine's table, and the coordinator's exactly-once rules on a simulated clock.

Scripted devices answer each task after their own delay with a delta that is a function of (device, task), so a
coordinator killed at any store transaction, rebuilt from its file and fed the unacknowledged message again, can be
compared with an uninterrupted run bit for bit.
"""

from __future__ import annotations

import heapq
import json
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest

from device_agent.wire.delta import encode_delta
from device_agent.wire.messages import Hello, Publish
from fleet import coordinator as co
from fleet import round as rnd
from fleet.coordinator import async_round as ar
from fleet.round import Reject, RoundConfig, RoundState
from fleet.store import Store, StoreError
from tests.fixtures.tiny import tiny_plan

PLAN = tiny_plan()
CODEC = co.WireCodec(PLAN)
DELAYS = {"d0": 1.0, "d1": 1.5, "d2": 2.0, "d3": 3.0, "d4": 7.0, "d5": 16.0}


def _config(k=3, max_staleness=2, **kw) -> co.CoordinatorConfig:
    return co.CoordinatorConfig(round=RoundConfig(goal=k), mode="async",
                                asynchronous=ar.AsyncConfig(buffer_size=k, max_staleness=max_staleness,
                                                            task_timeout_s=40.0), **kw)


def _up(d="d0", rid=1, base="h1", counter=1, n=5, content="c", plan="p") -> rnd.Upload:
    return rnd.Upload(d, rid, plan, base, counter, n, content)


# --- the machine alone ----------------------------------------------------------------------------------------


def test_machine_offers_once_commits_every_k_and_refuses_too_stale():
    m = ar.AsyncMachine(ar.AsyncConfig(buffer_size=2, max_staleness=1), "p")
    with pytest.raises(rnd.IllegalTransition):
        m.handle(ar.Published(2, "h2", 0.0))
    m.handle(ar.OpenAsync(1, "h1", 0.0))
    assert m.handle(rnd.Eligible(("d1", "d0", "d2"), 0.0)) == [ar.Assign(1, (d,), 60.0, 1, "h1")
                                                               for d in ("d0", "d1", "d2")]
    assert m.handle(rnd.Eligible(("d0", "d1", "d2"), 1.0)) == []  # busy devices get no second task
    assert m.handle(rnd.DeltaArrived(_up("d0", 1, "h1", 1), 2.0)) == [rnd.Accepted(_up("d0", 1, "h1", 1))]
    assert m.handle(rnd.DeltaArrived(_up("d0", 1, "h1", 1), 2.0)) == [rnd.Duplicate(_up("d0", 1, "h1", 1))]
    assert m.handle(rnd.Eligible(("d0",), 2.0)) == []  # in the buffer: waits for the commit
    out = m.handle(rnd.DeltaArrived(_up("d1", 1, "h1", 4), 3.0))
    assert out[-1] == rnd.Commit(1, ("d0", "d1")) and m.state == RoundState.COMMITTING
    assert m.handle(rnd.Eligible(("d0", "d1"), 3.0)) == []  # nothing handed out while committing
    m.handle(ar.Published(2, "h2", 3.0))
    assert m.state == RoundState.COLLECTING and m.buffer == {} and m.round_id == 2
    assert m.handle(rnd.Eligible(("d0", "d1", "d2"), 4.0)) == [ar.Assign(2, (d,), 64.0, 2, "h2")
                                                               for d in ("d0", "d1")]
    # d2's task is on v1, one version behind: counts (staleness 1)
    assert isinstance(m.handle(rnd.DeltaArrived(_up("d2", 1, "h1", 1), 5.0))[0], rnd.Accepted)
    assert m.buffer["d2"].base_version == 1 and m.staleness(1) == 1
    m.handle(rnd.DeltaArrived(_up("d0", 2, "h2", 2), 5.0))
    assert m.state == RoundState.COMMITTING
    m.handle(ar.Published(3, "h3", 5.0))
    # d1's task 2 on v2 is now one behind; two more versions from d0 and d2 make it two behind
    for v in (3, 4):
        for d in ("d0", "d2"):
            (a,) = m.handle(rnd.Eligible((d,), 6.0))
            m.handle(rnd.DeltaArrived(_up(d, a.round_id, f"h{v}", 10 * v), 6.0))
        m.handle(ar.Published(v + 1, f"h{v + 1}", 6.0))
    (r,) = m.handle(rnd.DeltaArrived(_up("d1", 2, "h2", 9), 7.0))
    assert r.reason == Reject.TOO_STALE and r.detail == "3 versions behind, max 1"
    assert "d1" not in m.tasks  # its task is over: it can be offered a new one on the newest version
    assert m.handle(rnd.Eligible(("d1",), 7.0)) == [ar.Assign(3, ("d1",), 67.0, 5, "h5")]


def test_machine_verdicts_in_order():
    m = ar.AsyncMachine(ar.AsyncConfig(buffer_size=5), "p")
    m.handle(ar.OpenAsync(1, "h1", 0.0))
    m.handle(rnd.Eligible(("d0", "d1", "d2", "d3"), 0.0))
    m.counters["d1"] = 7

    def verdict(up, now=1.0):
        return m.handle(rnd.DeltaArrived(up, now))[0]

    assert verdict(_up("d0", 2)).reason == Reject.WRONG_ROUND  # not its task
    assert "d0" in m.tasks  # a delta for another task does not end this one
    assert verdict(_up("d0", 1, plan="q")).reason == Reject.WRONG_PLAN
    assert verdict(_up("d1", 1, counter=7)).reason == Reject.REPLAYED_COUNTER
    assert verdict(_up("d2", 1, base="hX")).reason == Reject.STALE_BASE
    assert verdict(_up("d3", 1, n=0)).reason == Reject.BAD_SAMPLES
    assert not {"d1", "d2", "d3"} & m.tasks.keys()  # refused answers end their tasks
    (a,) = m.handle(rnd.Eligible(("d0",), 1.0))
    assert verdict(_up("d0", a.round_id), now=61.5).reason == Reject.LATE
    m.handle(rnd.Eligible(("d0",), 62.0))
    m.handle(rnd.Tick(62.0 + 61.0))
    assert m.tasks == {}  # past the deadline: dropped
    with pytest.raises(rnd.IllegalTransition):
        m.handle(rnd.StartRound(9, 1, "h1", 0.0))


def test_concurrency_caps_open_tasks_of_online_devices():
    m = ar.AsyncMachine(ar.AsyncConfig(buffer_size=2, concurrency=2), "p", seed=3)
    m.handle(ar.OpenAsync(1, "h1", 0.0))
    online = ("d0", "d1", "d2", "d3")
    first = m.handle(rnd.Eligible(online, 0.0))
    assert len(first) == 2 and m.task_seq == 1  # two of four, drawn
    again = ar.AsyncMachine(ar.AsyncConfig(buffer_size=2, concurrency=2), "p", seed=3)
    again.handle(ar.OpenAsync(1, "h1", 0.0))
    assert again.handle(rnd.Eligible(online, 0.0)) == first  # deterministic
    assert m.handle(rnd.Eligible(online, 1.0)) == []  # full
    busy = sorted(m.tasks)
    rest = tuple(d for d in online if d not in busy)
    (a,) = m.handle(rnd.Eligible((busy[1], *rest), 2.0))  # busy[0] went offline: its slot frees, its task stays
    assert a.device_ids[0] in rest and busy[0] in m.tasks and len(m.tasks) == 3


def test_config_validation_names_keys():
    assert ar.AsyncConfig().validate() == []
    errs = ar.AsyncConfig(buffer_size=0, staleness="cubic", exponent=-1.0, max_staleness=-2, concurrency=3,
                          task_timeout_s=0.0).validate()
    assert [e.split(":")[0] for e in errs] == ["buffer_size", "staleness", "exponent", "max_staleness",
                                                "task_timeout_s"]
    assert ar.AsyncConfig(buffer_size=4, concurrency=3).validate("a.")[0].startswith("a.concurrency")
    assert co.CoordinatorConfig(mode="asynchronous").validate()[0].startswith("mode:")
    f = ar.AsyncConfig(staleness="hinge", hinge=2, exponent=0.5)
    assert [f.weight(s) for s in (0, 2, 4)] == [1.0, 1.0, 0.5]
    assert ar.AsyncConfig().weight(3) == 0.5


# --- the coordinator on a simulated clock, scripted devices ----------------------------------------------------


def _payload(d: str, rid: int, base_hash: str) -> bytes:
    seed = int(d[1:]) * 1000 + rid
    rng = np.random.default_rng(seed)
    old = {t.id: t.data for t in PLAN.trainable}
    new = {k: np.clip(v.astype(np.int64) + rng.integers(-6, 7, v.shape), -127, 127) for k, v in old.items()}
    return encode_delta(PLAN, old, new, device_id=d, round_id=rid, base_hash=bytes.fromhex(base_hash), counter=rid,
                        sample_count=3 + seed % 5, top_k=None if seed % 2 else 25).to_bytes()


class Crash(Exception):
    pass


class FastStore(Store):
    """A file store without fsync (the tests kill the connection, not the machine)."""

    def __init__(self, path):
        super().__init__(path)
        self._db.execute("PRAGMA synchronous=OFF")


class CrashingStore(FastStore):
    """Dies inside its ``crash_at``-th transaction once ``armed`` (after the coordinator was built), before it
    commits."""

    def __init__(self, path, crash_at: int):
        self.crash_at, self.count, self.armed = crash_at, 0, False
        super().__init__(path)

    @contextmanager
    def _tx(self):
        self.count += self.armed
        if not self.armed or self.count != self.crash_at:
            with super()._tx() as db:
                yield db
            return
        self._db.execute("BEGIN IMMEDIATE")
        yield self._db
        self._db.close()
        raise Crash


def _run(path, cfg, crash_at=0, until=150.0, dup=False):
    """Six scripted devices; a Tick every 5 s; a delta ``DELAYS[d]`` after each task (again after a repeated task:
    the same bytes). On a crash: rebuild from the file, boot, replay the hellos, redeliver the crashed message."""
    now = [0.0]
    queue: list = []
    seq = [0]

    def push(t, ev):
        seq[0] += 1
        heapq.heappush(queue, (t, seq[0], ev))

    def route(outs):
        for o in outs:
            if isinstance(o, Publish) and o.topic.endswith("/task"):
                d, task = o.topic.split("/")[1], json.loads(o.payload)
                body = _payload(d, task["round_id"], task["model_hash"])
                for _ in range(2 if dup else 1):
                    push(now[0] + DELAYS[d], co.Received("delta", d, body))
            elif not isinstance(o, Publish):
                infos.append(o)

    infos: list = []
    hellos = [co.Received("hello", d, Hello(d, "stm32f746", 320_000, 1_000_000).to_json()) for d in DELAYS]
    coord = co.Coordinator(PLAN, CrashingStore(path, crash_at), cfg, lambda: now[0], CODEC)
    route(coord.handle(co.Boot()))
    for h in hellos:
        route(coord.handle(h))
    route(coord.handle(co.StartRound()))
    coord.store.armed = True  # NOTE: crash points from here on: every message the loop below delivers
    for k in range(1, int(until / 5)):
        push(5.0 * k, co.Tick())
    crashed = False
    while queue:
        t, _, ev = heapq.heappop(queue)
        if t > until:
            break
        now[0] = t
        try:
            route(coord.handle(ev))
        except Crash:
            crashed = True
            coord = co.Coordinator(PLAN, FastStore(path), cfg, lambda: now[0], CODEC)
            route(coord.handle(co.Boot()))
            for h in hellos:
                route(coord.handle(h))
            route(coord.handle(ev))  # never acknowledged: the broker delivers it again
    return coord, crashed, infos


def _versions(store: Store, n: int) -> list:
    return [store.version(v) for v in range(1, n + 1)]


def test_uninterrupted_run_commits_every_k_with_staleness_and_refusals(tmp_path):
    coord, _, infos = _run(tmp_path / "a.db", _config())
    closed = [i for i in infos if isinstance(i, co.RoundClosed)]
    assert len(closed) >= 8 and [c.version for c in closed] == list(range(2, len(closed) + 2))
    assert all(len(c.accepted) == 3 and c.committed for c in closed)
    verdicts = [v for v in infos if isinstance(v, co.Verdict)]
    ok = [v for v in verdicts if v.reason == "ok"]
    assert len(ok) == 3 * len(closed) + len(coord.machine.buffer)  # every accepted delta in exactly one buffer
    stale = [v for v in verdicts if v.reason == "too_stale"]
    assert stale and all(v.device_id in ("d4", "d5") and v.code == Reject.TOO_STALE for v in stale)
    assert any(c.detail != "staleness 0,0,0" for c in closed)
    # every stored delta is in one buffer, buffers hold distinct devices
    rows = [r for b in range(1, coord.version + 1) for r, _ in coord.store.buffered(b)]
    assert len(rows) == len(ok) and len({(r.round_id, r.device_id) for r in rows}) == len(rows)


def test_duplicated_uplinks_count_once(tmp_path):
    ref, _, _ = _run(tmp_path / "ref.db", _config())
    dup, _, infos = _run(tmp_path / "dup.db", _config(), dup=True)
    assert (dup.version, dup.hash) == (ref.version, ref.hash)
    reasons = [v.reason for v in infos if isinstance(v, co.Verdict)]
    assert reasons.count("duplicate") >= reasons.count("ok") - len(dup.machine.buffer)
    # a replay of an old, counted delta after its buffer committed: duplicate, nothing changes
    r, _ = dup.store.buffered(2)[0]
    before = (dup.version, dup.hash, dict(dup.machine.buffer))
    out = dup.handle(co.Received("delta", r.device_id, r.payload))
    assert [o.reason for o in out if isinstance(o, co.Verdict)] == ["duplicate"]
    assert (dup.version, dup.hash, dict(dup.machine.buffer)) == before


def test_killed_at_every_transaction_resumes_bit_identical(tmp_path):
    cfg = _config()
    ref, _, _ = _run(tmp_path / "ref.db", cfg, until=20.0)
    assert ref.version >= 10
    probe, _, _ = _run(tmp_path / "probe.db", cfg, crash_at=10**9, until=20.0)
    total = probe.store.count  # store transactions of the whole run: handing out tasks, accepting, committing
    assert total > 50
    for k in range(1, total + 1):
        coord, crashed, _ = _run(tmp_path / f"k{k}.db", cfg, crash_at=k, until=20.0)
        assert crashed, k
        assert (coord.version, coord.hash) == (ref.version, ref.hash), k
        assert _versions(coord.store, ref.version) == _versions(ref.store, ref.version), k
        assert coord.store.counters() == ref.store.counters(), k


def test_store_refuses_the_other_mode(tmp_path):
    path = tmp_path / "m.db"
    co.Coordinator(PLAN, Store(path), _config(), lambda: 0.0, CODEC)
    with pytest.raises(StoreError, match="holds async rounds"):
        co.Coordinator(PLAN, Store(path), replace(_config(), mode="sync"), lambda: 0.0, CODEC)


def test_dp_accounts_one_spend_per_published_version(tmp_path):
    from fleet.security.dp import DPConfig

    dp = DPConfig(clip=30.0, noise_multiplier=1.0, delta=1e-5, epsilon_budget=None)
    coord, _, infos = _run(tmp_path / "dp.db", _config(dp=dp), until=40.0)
    closed = [i for i in infos if isinstance(i, co.RoundClosed)]
    assert closed and all(c.epsilon is not None for c in closed)
    assert len(coord.accountant.rounds) == len(closed) == coord.version - 1
    eps = [c.epsilon for c in closed]
    assert eps == sorted(eps) and eps[0] < eps[-1]
