"""The coordinator's fast paths keep its guarantees: batches (group commit), deltas decoded once, running sums.

``handle_many`` must equal ``handle`` one event at a time; the sums folded in on arrival must equal what the store's
rows give when re-read; a coordinator killed inside or right after a batch, rebuilt from its file and fed the
unacknowledged messages again, must end bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager

import numpy as np
import pytest

from device_agent.wire.delta import encode_delta
from device_agent.wire.messages import Hello, Publish
from fleet import aggregate as agg
from fleet import coordinator as co
from fleet.round import RoundConfig
from fleet.store import DeltaRow, Store, StoreError
from tests.fixtures.tiny import tiny_plan

PLAN = tiny_plan()
CODEC = co.WireCodec(PLAN)
DEVS = [f"d{i}" for i in range(6)]


def _config(aggregator: str = "fedavg") -> co.CoordinatorConfig:
    extra = {"clip": 20.0} if aggregator == "clipped" else {"trim": 0.2} if aggregator == "trimmed" else {}
    return co.CoordinatorConfig(round=RoundConfig(goal=len(DEVS), quorum=0.5, over_selection=1.0, deadline_s=60.0),
                                aggregator=aggregator, **extra)


def _hello(d: str) -> co.Received:
    return co.Received("hello", d, Hello(d, "stm32f746", 320_000, 1_000_000).to_json())


def _delta(d: str, round_id: int, base_hash: str, seed: int) -> co.Received:
    rng = np.random.default_rng(seed)
    old = {t.id: t.data for t in PLAN.trainable}
    new = {k: np.clip(v.astype(np.int64) + rng.integers(-4, 5, v.shape), -127, 127) for k, v in old.items()}
    payload = encode_delta(PLAN, old, new, device_id=d, round_id=round_id, base_hash=bytes.fromhex(base_hash),
                           counter=round_id, sample_count=3 + seed % 5, top_k=None if seed % 2 else 25).to_bytes()
    return co.Received("delta", d, payload)


def _batches(aggregator: str = "fedavg") -> list[list[tuple[float, object]]]:
    """Batches of (time, event): hellos; round 1 reaching its goal inside a batch (with a QoS 1 redelivery);
    round 2 closed by its deadline with 4 of 6 deltas, plus a redelivered round-1 delta."""
    now = [0.0]
    c = co.Coordinator(PLAN, Store(), _config(aggregator), lambda: now[0], CODEC)
    v1 = c.hash
    r1 = [(3.0 + i, _delta(d, 1, v1, i)) for i, d in enumerate(DEVS)]
    first = [[(0.0, co.Boot())], [(1.0, _hello(d)) for d in DEVS], [(2.0, co.StartRound())], r1[:2],
             [r1[2], r1[0], *r1[3:]]]
    for batch in first:
        for t, ev in batch:
            now[0] = t
            c.handle(ev)
    v2 = c.hash
    r2 = [(21.0 + i, _delta(d, 2, v2, 10 + i)) for i, d in enumerate(DEVS[:4])]
    return first + [[(20.0, co.StartRound())], r2[:3], [r2[3], (21.5, r1[4][1])], [(50.0, co.Tick())],
                    [(100.0, co.Tick())]]


def _drive(c: co.Coordinator, now: list[float], batch: list[tuple[float, object]], many: bool) -> list:
    if not many:
        out = []
        for t, ev in batch:
            now[0] = t
            out += c.handle(ev)
        return out
    times = iter([t for t, _ in batch])
    c.clock = lambda: next(times)  # each event sees its own time, as with one handle per event
    try:
        return c.handle_many([ev for _, ev in batch])
    finally:
        c.clock = lambda: now[0]


def _rows(store: Store) -> list:
    return ([store.version(v) for v in (1, 2, 3)], store.deltas(1), store.deltas(2), store.counters(),
            store.round_outcome(1), store.round_outcome(2))


@pytest.mark.parametrize("aggregator", ["fedavg", "median"])
def test_handle_many_equals_handle_one_at_a_time(tmp_path, aggregator):
    runs = {}
    for many in (False, True):
        now = [0.0]
        store = Store(tmp_path / f"{many}.db")
        c = co.Coordinator(PLAN, store, _config(aggregator), lambda now=now: now[0], CODEC)
        outs = [_drive(c, now, b, many) for b in _batches(aggregator)]
        runs[many] = (outs, _rows(store), c.version, c.hash)
    assert runs[True] == runs[False]
    assert runs[True][2] == 3  # both rounds committed
    verdicts = [o.reason for outs in runs[True][0] for o in outs if isinstance(o, co.Verdict)]
    assert verdicts.count("duplicate") == 2 and verdicts.count("ok") == 10


@pytest.mark.parametrize("aggregator", agg.AGGREGATORS)
def test_sums_folded_on_arrival_equal_the_stored_rows(tmp_path, aggregator):
    now = [0.0]
    path = tmp_path / "s.db"
    c = co.Coordinator(PLAN, Store(path), _config(aggregator), lambda: now[0], CODEC)
    batches = _batches(aggregator)
    for b in batches[:4]:  # round 1 open, 2 deltas in
        _drive(c, now, b, many=True)
    rd = c.round_deltas
    values, masks, weights = c.stacked(1)  # re-read and re-decoded from the store
    assert rd is not None and rd.hashes == c.store.accepted_hashes(1) and len(rd.hashes) == 2
    num, den = agg.weighted_sums(values, masks, weights)
    assert np.array_equal(rd.sums.num, num) and np.array_equal(rd.sums.den, den)
    if aggregator != "fedavg":
        assert all(np.array_equal(a, b) for a, b in zip(rd.stacked(), (values, masks, weights)))
    # a coordinator restarted mid-round rebuilds the same from the file
    again = co.Coordinator(PLAN, Store(path), _config(aggregator), lambda: now[0], CODEC)
    assert again.round_deltas.hashes == rd.hashes and np.array_equal(again.round_deltas.sums.num, num)
    # the committed model is what the store's rows give, through the plain path
    old = {k: v.copy() for k, v in c.state.items()}
    _drive(c, now, batches[4], many=True)
    assert c.version == 2 and c.round_deltas is None
    mean = agg.aggregate(aggregator, *c.stacked(1), clip=c.config.clip, beta=c.config.trim)
    step, pos = agg.to_int_delta(mean), 0
    for t in c.shared:
        assert np.array_equal(c.state[t.id], agg.apply_int_delta(old[t.id], step[pos:pos + t.numel])), t.name
        pos += t.numel


def test_running_sums_refuse_what_weighted_sums_refuses():
    s = agg.RunningSums(3)
    s.add(np.array([1, -2, 3]), np.array([True, False, True]), 2)
    s.add(np.array([5, 0, 0]), np.array([True, True, False]), 3)
    assert s.num.tolist() == [17, 0, 6] and s.den.tolist() == [5, 3, 2]
    for bad in [(np.array([1.5, 0, 0]), np.ones(3, bool), 1), (np.zeros(3, np.int64), np.ones(3, bool), 0),
                (np.zeros(2, np.int64), np.ones(2, bool), 1), (np.zeros(3, np.int64), np.ones(3), 1)]:
        with pytest.raises(agg.AggregationError):
            s.add(*bad)


# --- killed inside or right after a batch -------------------------------------------------------------------


class Crash(Exception):
    """The process dies here."""


class CrashingStore(Store):
    """Dies at its ``crash_at``-th commit point: a transaction outside batches or a batch, about to commit (nothing
    of it is durable); with ``after=True``, the points are batches only and it dies right after the commit (before
    the batch's messages were acknowledged)."""

    def __init__(self, path, crash_at: int, after: bool = False):
        self.crash_at, self.after, self.count = crash_at, after, 0
        super().__init__(path)

    def _die(self):
        self._db.close()
        raise Crash

    @contextmanager
    def _tx(self):
        if self._batch_depth:  # joins the batch: its commit point is the batch's
            with super()._tx() as db:
                yield db
            return
        if self.after:
            with super()._tx() as db:
                yield db
            return
        self.count += 1
        if self.count != self.crash_at:
            with super()._tx() as db:
                yield db
            return
        self._db.execute("BEGIN IMMEDIATE")
        yield self._db
        self._die()

    @contextmanager
    def batch(self):
        if self._batch_depth:
            with super().batch():
                yield
            return
        self.count += 1
        with super().batch():
            yield
            if self.count == self.crash_at and not self.after:
                self._die()  # before COMMIT: the open transaction is lost with the connection
        if self.count == self.crash_at and self.after:
            self._die()


def _run_batched(path, crash_at: int | None, after: bool = False):
    """Feed the batches with ``handle_many``; on a crash, rebuild from the file, boot, replay the retained hellos,
    then redeliver what was never acknowledged: the whole batch if it had not committed, else its messages."""
    batches = _batches()
    now = [0.0]
    crashed, i = False, 0
    coord = None
    outputs: list = []
    while i < len(batches):
        try:
            if coord is None:
                store = Store(path) if crashed else CrashingStore(path, crash_at or 0, after)
                coord = co.Coordinator(PLAN, store, _config(), lambda: now[0], CODEC)
                if crashed:
                    coord.handle(co.Boot())
                    for b in batches[:i]:
                        for _, ev in b:
                            if isinstance(ev, co.Received) and ev.kind == "hello":
                                coord.handle(ev)
            outputs.append(_drive(coord, now, batches[i], many=True))
            i += 1
        except Crash:
            committed = after and coord.store.count == crash_at
            crashed, coord = True, None
            if committed:  # durable, but its messages were not acknowledged: the broker sends them again
                redeliver = [(t, ev) for t, ev in batches[i] if isinstance(ev, co.Received)]
                batches = [*batches[:i + 1], redeliver, *batches[i + 1:]]
                i += 1
    return coord, crashed, outputs


def _count_commit_points(path, after: bool) -> int:
    now = [0.0]
    store = CrashingStore(path, 0, after)
    c = co.Coordinator(PLAN, store, _config(), lambda: now[0], CODEC)
    for b in _batches():
        _drive(c, now, b, many=True)
    return store.count


@pytest.mark.parametrize("after", [False, True])
def test_killed_at_every_batch_resumes_to_the_same_model(tmp_path, after):
    ref, _, _ = _run_batched(tmp_path / "ref.db", None)
    assert ref.version == 3
    total = _count_commit_points(tmp_path / "count.db", after)
    assert total >= 9
    for k in range(1, total + 1):
        coord, crashed, _ = _run_batched(tmp_path / f"k{k}-{after}.db", k, after)
        assert crashed, k
        assert coord.version == ref.version and coord.hash == ref.hash, k
        assert all(np.array_equal(coord.state[t], ref.state[t]) for t in ref.state), k
        assert coord.store.counters() == ref.store.counters(), k


def test_no_output_of_a_batch_that_did_not_commit(tmp_path):
    path = tmp_path / "n.db"
    now = [0.0]
    batches = _batches()
    c = co.Coordinator(PLAN, CrashingStore(path, 8), _config(), lambda: now[0], CODEC)  # schema, plan, model, 5th batch
    got = []
    with pytest.raises(Crash):
        for b in batches:
            got.append(_drive(c, now, b, many=True))
    assert len(got) == 4  # the acks of the crashed batch never left
    fresh = Store(path)
    assert fresh.accepted_hashes(1).keys() == {"d0", "d1"} and fresh.latest_version().version == 1


# --- the store's batch ----------------------------------------------------------------------------------------


def test_store_batch_is_one_transaction_and_a_failed_step_fails_it(tmp_path):
    s = Store(tmp_path / "b.db")
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a commit is on disk when it returns
    s.save_round({"round_id": 1, "state": "training"})
    reader = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    with s.batch():
        s.accept_delta(DeltaRow(1, "x", "c1", 1, 1, b"p"), "collecting")
        with s.batch():  # nested: joins
            s.accept_delta(DeltaRow(1, "y", "c2", 1, 1, b"q"), "collecting")
        assert reader.execute("SELECT COUNT(*) FROM deltas").fetchone()[0] == 0  # nothing visible before COMMIT
    assert reader.execute("SELECT COUNT(*) FROM deltas").fetchone()[0] == 2
    with pytest.raises(StoreError, match="rolled back"), s.batch():
        s.accept_delta(DeltaRow(1, "z", "c3", 2, 1, b"r"), "collecting")
        with pytest.raises(sqlite3.IntegrityError):
            s.accept_delta(DeltaRow(1, "x", "c4", 3, 1, b"s"), "collecting")  # caught: still fails the batch
    with pytest.raises(RuntimeError), s.batch():
        s.accept_delta(DeltaRow(1, "w", "c5", 2, 1, b"t"), "collecting")
        raise RuntimeError("the adapter died mid-batch")
    assert s.accepted_hashes(1) == {"x": "c1", "y": "c2"} and s.counters() == {"x": 1, "y": 1}
    s.accept_delta(DeltaRow(1, "z", "c3", 2, 1, b"r"), "collecting")  # the store is usable again
    assert len(s.deltas(1)) == 3


def test_redelivered_counted_delta_is_answered_without_decoding():
    class Counting(co.WireCodec):
        calls = 0

        def decode_delta(self, payload, content_hash):
            Counting.calls += 1
            return super().decode_delta(payload, content_hash)

    now = [0.0]
    c = co.Coordinator(PLAN, Store(), _config(), lambda: now[0], Counting(PLAN))
    batches = _batches()
    for b in batches[:4]:
        _drive(c, now, b, many=True)
    before = Counting.calls
    out = c.handle(batches[3][0][1])
    assert Counting.calls == before
    (v,) = [o for o in out if isinstance(o, co.Verdict)]
    (ack,) = [o for o in out if isinstance(o, Publish)]
    assert v.reason == "duplicate" and v.round_id == 1 and b'"accepted":true' in ack.payload
