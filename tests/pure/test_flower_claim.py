"""One ServerApp per fleet (flower/lock) and continuing a fleet (flower/state, the held model), pure."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.wire.messages import Task, parse
from device_agent.wire.update import model_hash
from fleet.coordinator import Boot, Tick
from fleet.flower import (
    LOCK_TOPIC,
    STATE_TOPIC,
    GridCore,
    Lock,
    Release,
    SetModel,
    State,
    shared_tensors,
    winner,
)
from tests.fixtures.tiny import tiny_plan

PLAN = tiny_plan()


def test_lock_and_state_round_trip_and_refuse_garbage():
    lock = Lock("tinyfleet-f-flower-abc", 7, 100.0, 130.0)
    assert Lock.from_bytes(lock.to_bytes()) == lock and Lock.from_bytes(b"") is None
    assert State.from_bytes(State(4, 6).to_bytes()) == State(4, 6)
    for bad in (b"[1]", b"{\"holder\": 1}", b"\xff"):
        with pytest.raises(ValueError, match="flower/lock"):
            Lock.from_bytes(bad)
    with pytest.raises(ValueError, match="negative"):
        State.from_bytes(b'{"last_round": -1, "version": 0}')


def test_the_first_live_claim_wins_and_a_live_retained_lock_beats_every_claim():
    a, b = Lock("a", 1, 0.0, 100.0), Lock("b", 2, 0.0, 100.0)
    assert winner(None, [a, b], now=10.0) == a
    assert winner(None, [None, b, a], now=10.0) == b
    assert winner(b, [a], now=10.0) == b
    assert winner(Lock("old", 0, 0.0, 5.0), [a], now=10.0) == a  # an expired lock is free
    assert winner(None, [], now=10.0) is None


def test_a_resumed_grid_names_the_held_model_and_continues_round_ids():
    shared = shared_tensors(PLAN)
    held = {t.id: (np.asarray(t.data).astype(np.int64) + 1).clip(-127, 127).astype(np.asarray(t.data).dtype)
            .reshape(t.shape) for t in shared}
    core = GridCore(PLAN, lambda: 0.0, first_round=6, start_version=5, start_state=held,
                    lock=Lock("me", 3, 0.0, 30.0))
    assert core.version == 5 and core.hash == model_hash(PLAN, held, 5).hex()  # the same version, not a new one
    out = {p.topic: p.payload for p in core.handle(Boot())}
    assert Lock.from_bytes(out[LOCK_TOPIC]).holder == "me"
    assert State.from_bytes(out[STATE_TOPIC]) == State(5, 5)
    assert core.machine.round_id + 1 == 6
    # no held tensors (a DIFF was retained): the plan's values as the next version
    assert GridCore(PLAN, lambda: 0.0, start_version=5).version == 6


def test_the_lock_is_refreshed_on_ticks_and_released_once():
    now = [0.0]
    core = GridCore(PLAN, lambda: now[0], lock=Lock("me", 3, 0.0, 30.0))
    core.handle(Boot())
    assert core.handle(Tick()) == []
    now[0] = 11.0
    (p,) = core.handle(Tick())
    assert p.topic == LOCK_TOPIC and Lock.from_bytes(p.payload).expires == 41.0
    out = {p.topic: p.payload for p in core.handle(Release())}
    assert out[LOCK_TOPIC] == b"" and STATE_TOPIC in out
    now[0] = 100.0
    assert core.handle(Tick()) == [] and LOCK_TOPIC not in {p.topic for p in core.handle(Boot())}


def test_set_model_publishes_a_new_version_only_when_it_differs():
    core = GridCore(PLAN, lambda: 0.0)
    assert core.handle(SetModel(dict(core.state))) == []
    new = {tid: (v.astype(np.int64) // 2).astype(v.dtype) for tid, v in core.state.items()}
    out = {p.topic: p.payload for p in core.handle(SetModel(new))}
    assert core.version == 2 and "model/current" in out and State.from_bytes(out[STATE_TOPIC]).version == 2


def test_task_carries_topk_from_the_config():
    from flwr.app import ConfigRecord, RecordDict

    core = GridCore(PLAN, lambda: 0.0)
    task, _ = core._task(1, RecordDict({"config": ConfigRecord({"topk-permille": 125})}), 10.0)
    assert parse(task.to_json(), Task).topk_permille == 125
