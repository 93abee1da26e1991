"""SQLite store: rows round-trip, and a coordinator killed at every step of a scripted run ends bit-identical."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager

import numpy as np
import pytest

from device_agent.wire.delta import encode_delta
from device_agent.wire.messages import Hello
from fleet import coordinator as co
from fleet.round import RoundConfig
from fleet.store import DeltaRow, Store, StoreError
from tests.fixtures.tiny import tiny_plan

PLAN = tiny_plan()
CODEC = co.WireCodec(PLAN)
DEVS = [f"d{i}" for i in range(5)]


def test_versions_rounds_deltas_roundtrip(tmp_path):
    s = Store(tmp_path / "a.db")
    s.bind_plan("aa" * 32)
    assert s.init_model(1, "h1", b"\x01\x02").version == 1
    assert s.init_model(1, "other", b"").hash == "h1"  # idempotent: the first model stays
    snap = {"round_id": 1, "state": "collecting", "selected": ["x"], "deadline": 5.0}
    s.save_round(snap)
    s.accept_delta(DeltaRow(1, "x", "c1", 7, 10, b"payload"), "collecting")
    s.commit_round({**snap, "state": "idle"}, 2, "h2", b"\x03\x04")
    s2 = Store(tmp_path / "a.db")  # reopened without closing the first
    assert s2.latest_version().state == b"\x03\x04" and s2.version(1).hash == "h1"
    assert s2.deltas(1) == [DeltaRow(1, "x", "c1", 7, 10, b"payload")]
    assert s2.counters() == {"x": 7} and s2.has_delta(1, "x", "c1") and not s2.has_delta(1, "x", "c2")
    assert s2.last_round()[1] == "idle" and s2.round_outcome(1) == ("idle", "committed", 2)
    with pytest.raises(StoreError, match="belongs to plan"):
        s2.bind_plan("bb" * 32)


def test_failed_transaction_leaves_nothing(tmp_path):
    s = Store(tmp_path / "b.db")
    s.save_round({"round_id": 1, "state": "training"})
    s.accept_delta(DeltaRow(1, "x", "c1", 1, 1, b"p"), "collecting")
    with pytest.raises(sqlite3.IntegrityError):
        s.accept_delta(DeltaRow(1, "x", "c2", 2, 1, b"q"), "committing")
    with pytest.raises(StoreError, match="never saved"):
        s.accept_delta(DeltaRow(7, "x", "c3", 3, 1, b"r"), "collecting")
    assert [d.content_hash for d in s.deltas(1)] == ["c1"] and s.last_round()[1] == "collecting"


def test_round_state_known_to_the_connection_is_forgotten_on_rollback(tmp_path):
    # Prepare: accept_delta skips its round statements when this connection knows the row holds (round, state)
    s = Store(tmp_path / "c.db")
    s.save_round({"round_id": 1, "state": "training"})
    # Execute: a batch that moved the round to collecting rolls back; then the same state is asked again
    with pytest.raises(RuntimeError), s.batch():
        s.accept_delta(DeltaRow(1, "x", "c1", 1, 1, b"p"), "collecting")
        raise RuntimeError("the batch fails after the step")
    assert s.last_round()[1] == "training" and s.deltas(1) == []
    s.accept_delta(DeltaRow(1, "y", "c2", 1, 1, b"q"), "collecting")
    s.accept_delta(DeltaRow(1, "z", "c3", 1, 1, b"r"), "collecting")  # the known state: no round statements
    # Assert: the state written after the rollback, a round written since is seen again, an unsaved round refused
    assert s.last_round()[1] == "collecting"
    s.save_round({"round_id": 1, "state": "training"})
    s.accept_delta(DeltaRow(1, "w", "c4", 1, 1, b"s"), "collecting")
    assert s.last_round()[1] == "collecting"
    with pytest.raises(StoreError, match="never saved"):
        s.accept_delta(DeltaRow(2, "x", "c5", 2, 1, b"t"), "collecting")
    assert [d.device_id for d in Store(tmp_path / "c.db").deltas(1)] == ["w", "y", "z"]


# --- kill at every step ----------------------------------------------------------------------------------------


class Crash(Exception):
    """The process dies here."""


class CrashingStore(Store):
    """Dies inside its ``crash_at``-th transaction, after the statements and before COMMIT."""

    def __init__(self, path, crash_at: int):
        self.crash_at, self.count = crash_at, 0
        super().__init__(path)

    @contextmanager
    def _tx(self):
        self.count += 1
        if self.count != self.crash_at:
            with super()._tx() as db:
                yield db
            return
        self._db.execute("BEGIN IMMEDIATE")
        yield self._db
        self._db.close()  # the process is gone: the open transaction never commits
        raise Crash


def _hello(d: str) -> co.Received:
    return co.Received("hello", d, Hello(d, "stm32f746", 320_000, 1_000_000).to_json())


def _delta(d: str, round_id: int, base_hash: str, seed: int) -> co.Received:
    rng = np.random.default_rng(seed)
    old = {t.id: t.data for t in PLAN.trainable}
    new = {k: np.clip(v.astype(np.int64) + rng.integers(-3, 4, v.shape), -127, 127) for k, v in old.items()}
    payload = encode_delta(PLAN, old, new, device_id=d, round_id=round_id, base_hash=bytes.fromhex(base_hash),
                           counter=round_id, sample_count=5 + seed % 7, top_k=20).to_bytes()
    return co.Received("delta", d, payload)


def _config() -> co.CoordinatorConfig:
    return co.CoordinatorConfig(round=RoundConfig(goal=5, quorum=0.5, over_selection=1.0, deadline_s=60.0))


def _script() -> list[tuple[float, object]]:
    """(time, event): hellos, round 1 reaching its goal, round 2 closed by its deadline with 3 of 5 deltas."""
    now = [0.0]
    c = co.Coordinator(PLAN, Store(), _config(), lambda: now[0], CODEC)
    v1 = c.hash
    events: list[tuple[float, object]] = [(0.0, co.Boot()), *[(1.0, _hello(d)) for d in DEVS],
                                          (2.0, co.StartRound())]
    events += [(3.0 + i, _delta(d, 1, v1, i)) for i, d in enumerate(DEVS)]
    for t, ev in events:
        now[0] = t
        c.handle(ev)
    v2 = c.hash
    more = [(20.0, co.StartRound()), *[(21.0 + i, _delta(d, 2, v2, 10 + i)) for i, d in enumerate(DEVS[:3])],
            (21.5, events[9][1]),  # a redelivered round-1 delta
            (50.0, co.Tick()), (100.0, co.Tick())]
    return events + more


def _run(path, crash_at: int | None):
    """Run the script; on a crash, rebuild from the file and redeliver (retained hellos + the in-flight event)."""
    script = _script()
    now = [0.0]
    crashed, i = False, 0
    store: Store | None = None
    coord = None
    while i < len(script):
        try:
            if store is None:
                store = CrashingStore(path, crash_at or 0) if not crashed else Store(path)
            if coord is None:
                coord = co.Coordinator(PLAN, store, _config(), lambda: now[0], CODEC)
                if crashed:  # a restarted coordinator boots and gets the broker's retained hellos again
                    coord.handle(co.Boot())
                    for _, ev in script[:i]:
                        if isinstance(ev, co.Received) and ev.kind == "hello":
                            coord.handle(ev)
            now[0], ev = script[i]
            coord.handle(ev)
            i += 1
        except Crash:
            crashed, coord, store = True, None, None
    return coord, crashed


def _count_transactions(path) -> int:
    store = CrashingStore(path, 0)
    now = [0.0]
    coord = co.Coordinator(PLAN, store, _config(), lambda: now[0], CODEC)
    for t, ev in _script():
        now[0] = t
        coord.handle(ev)
    return store.count


def test_killed_at_every_step_resumes_to_the_same_model(tmp_path):
    ref, _ = _run(tmp_path / "ref.db", None)
    assert ref.version == 3  # both rounds committed
    total = _count_transactions(tmp_path / "count.db")
    assert total > 10
    for k in range(1, total + 1):
        coord, crashed = _run(tmp_path / f"k{k}.db", k)
        assert crashed, k
        assert coord.version == ref.version and coord.hash == ref.hash, k
        assert all(np.array_equal(coord.state[t], ref.state[t]) for t in ref.state), k
