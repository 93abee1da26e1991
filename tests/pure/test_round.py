"""The round state machine alone: selection, goal, quorum, deadline, dedup and every rejection code."""

from __future__ import annotations

import pytest

from fleet import round as rnd
from fleet.round import Reject, RoundState

PLAN = "ab" * 32
BASE = "cd" * 32
DEVS = tuple(f"d{i:02d}" for i in range(10))


def machine(goal=10, quorum=0.5, over=1.3, deadline=60.0) -> rnd.RoundMachine:
    return rnd.RoundMachine(rnd.RoundConfig(goal=goal, quorum=quorum, over_selection=over, deadline_s=deadline),
                            PLAN)


def opened(m: rnd.RoundMachine, devices=DEVS, round_id=1, now=0.0) -> rnd.Dispatch:
    m.handle(rnd.StartRound(round_id, 3, BASE, now))
    (cmd,) = m.handle(rnd.Eligible(devices, now))
    assert isinstance(cmd, rnd.Dispatch)
    return cmd


def up(dev, round_id=1, counter=1, base=BASE, plan=PLAN, n=5, h=None):
    return rnd.Upload(dev, round_id, plan, base, counter, n, h or f"{dev}-{round_id}-{counter}".encode().hex())


def test_selection_is_deterministic_with_over_selection():
    m1, m2 = machine(goal=4), machine(goal=4)
    d1, d2 = opened(m1), opened(m2, devices=tuple(reversed(DEVS)))
    assert d1.device_ids == d2.device_ids and len(d1.device_ids) == 6  # ceil(4 * 1.3)
    assert d1.deadline == 60.0 and m1.state == RoundState.TRAINING


def test_goal_reached_commits():
    m = machine(goal=3)
    sel = opened(m).device_ids
    out = []
    for d in sel[:3]:
        out += m.handle(rnd.DeltaArrived(up(d), 1.0))
    assert isinstance(out[-1], rnd.Commit) and out[-1].device_ids == tuple(sorted(sel[:3]))
    assert m.state == RoundState.COMMITTING
    m.handle(rnd.Closed(2.0))
    assert m.state == RoundState.IDLE


def test_deadline_quorum_commit_or_abandon():
    m = machine()
    opened(m)
    for d in DEVS[:5]:
        m.handle(rnd.DeltaArrived(up(d), 1.0))
    assert m.state == RoundState.COLLECTING
    assert m.handle(rnd.Tick(59.0)) == []
    (cmd,) = m.handle(rnd.Tick(61.0))
    assert isinstance(cmd, rnd.Commit) and len(cmd.device_ids) == 5

    m = machine()
    opened(m)
    for d in DEVS[:4]:
        m.handle(rnd.DeltaArrived(up(d), 1.0))
    (cmd,) = m.handle(rnd.Tick(61.0))
    assert isinstance(cmd, rnd.Abandon) and m.state == RoundState.ABANDONED


def test_everyone_answered_or_lost_closes_early():
    m = machine()
    opened(m)
    for d in DEVS[:7]:
        m.handle(rnd.DeltaArrived(up(d), 1.0))
    out = []
    for d in DEVS[7:]:
        out += m.handle(rnd.DeviceLost(d, 2.0))
    assert isinstance(out[-1], rnd.Commit) and len(out[-1].device_ids) == 7


def test_too_few_eligible_abandons_at_selection():
    m = machine()
    m.handle(rnd.StartRound(1, 0, BASE, 0.0))
    (cmd,) = m.handle(rnd.Eligible(DEVS[:4], 0.0))
    assert isinstance(cmd, rnd.Abandon) and m.state == RoundState.ABANDONED


@pytest.mark.parametrize("upload, reason", [
    (up("d00", round_id=2), Reject.WRONG_ROUND),
    (up("d00", plan="ee" * 32), Reject.WRONG_PLAN),
    (up("zz"), Reject.NOT_SELECTED),
    (up("d00", base="00" * 32), Reject.STALE_BASE),
    (up("d00", n=0), Reject.BAD_SAMPLES),
])
def test_rejections_leave_state_unchanged(upload, reason):
    m = machine()
    opened(m)
    before = (m.snapshot(), dict(m.accepted), dict(m.counters))
    (cmd,) = m.handle(rnd.DeltaArrived(upload, 1.0))
    assert isinstance(cmd, rnd.Rejected) and cmd.reason == reason
    assert (m.snapshot(), m.accepted, m.counters) == before


def test_duplicate_replay_and_second_delta():
    m = machine()
    opened(m)
    first = up("d00", counter=4)
    assert isinstance(m.handle(rnd.DeltaArrived(first, 1.0))[0], rnd.Accepted)
    assert isinstance(m.handle(rnd.DeltaArrived(first, 1.5))[0], rnd.Duplicate)  # QoS 1 redelivery
    (cmd,) = m.handle(rnd.DeltaArrived(up("d00", counter=5), 1.5))
    assert cmd.reason == Reject.ALREADY_CONTRIBUTED
    m.handle(rnd.Tick(100.0))  # abandon (1 < quorum)
    m.handle(rnd.Closed(100.0))
    opened(m, round_id=2, now=200.0)
    (cmd,) = m.handle(rnd.DeltaArrived(up("d00", round_id=2, counter=4), 201.0))
    assert cmd.reason == Reject.REPLAYED_COUNTER
    (cmd,) = m.handle(rnd.DeltaArrived(up("d01", round_id=2), 300.0))
    assert cmd.reason == Reject.LATE


def test_closed_round_answers_late_deltas():
    m = machine(goal=1)
    a, b = opened(m).device_ids
    first = up(a)
    m.handle(rnd.DeltaArrived(first, 1.0))
    assert m.state == RoundState.COMMITTING
    assert isinstance(m.handle(rnd.DeltaArrived(first, 1.0))[0], rnd.Duplicate)
    (cmd,) = m.handle(rnd.DeltaArrived(up(b), 1.0))
    assert cmd.reason == Reject.ROUND_CLOSED


def test_illegal_transitions_raise():
    m = machine()
    with pytest.raises(rnd.IllegalTransition):
        m.handle(rnd.Eligible(DEVS, 0.0))
    opened(m)
    with pytest.raises(rnd.IllegalTransition):
        m.handle(rnd.StartRound(2, 0, BASE, 0.0))
    with pytest.raises(rnd.IllegalTransition):
        m.handle(rnd.Closed(0.0))


def test_every_table_row_names_a_handler():
    for (state, event), (name, allowed) in rnd.TRANSITIONS.items():
        assert callable(getattr(rnd.RoundMachine, name)), (state, event)
        assert allowed <= set(RoundState)


def test_snapshot_restore_roundtrip():
    m = machine()
    opened(m)
    m.handle(rnd.DeltaArrived(up("d00"), 1.0))
    m.handle(rnd.DeviceLost("d01", 1.0))
    m2 = machine()
    m2.restore(m.snapshot(), m.accepted, m.counters)
    assert m2.snapshot() == m.snapshot() and m2.state == RoundState.COLLECTING
    assert m2.handle(rnd.DeltaArrived(up("d00"), 2.0))[0] == rnd.Duplicate(up("d00"))


def test_registry_eligibility_last_will_and_heartbeat():
    from device_agent.wire.messages import Hello, Status
    from fleet.registry import Registry

    reg = Registry(heartbeat_timeout=30.0)
    reg.on_hello(Hello("big", "stm32f746", 320_000, 10**6, (PLAN,)), 0.0)
    reg.on_hello(Hello("small", "m0", 32_000, 10**5), 0.0)
    reg.on_hello(Hello("gone", "stm32f746", 320_000, 10**6), 0.0)
    assert reg.eligible(100_000) == ["big", "gone"]
    assert reg.eligible(100_000, plan_hash=PLAN) == ["big"]
    reg.on_status(Status("gone", "offline"), 1.0)  # Last Will
    assert reg.eligible(0) == ["big", "small"]
    reg.on_status(Status("big", "online", 3, 40), 25.0)
    assert reg.expire(40.0) == ["small"] and reg.eligible(0) == ["big"]
    assert reg.on_status(Status("stranger", "online"), 1.0) is None


def test_a_selected_device_that_says_hello_again_is_asked_again_until_it_contributed():
    # Prepare
    m = machine(goal=3, over=1.0)
    sel = opened(m).device_ids
    outsider = next(d for d in DEVS if d not in sel)
    # Execute
    again = m.handle(rnd.Rejoined(sel[0], 1.0))
    m.handle(rnd.DeltaArrived(up(sel[0]), 2.0))
    after = m.handle(rnd.Rejoined(sel[0], 3.0))
    other = m.handle(rnd.Rejoined(outsider, 3.0))
    # Assert: the table decides re-sends: one Dispatch with the round's own deadline, none once it counted
    assert again == [rnd.Dispatch(1, (sel[0],), 60.0)]
    assert after == [] and other == [] and m.state == RoundState.COLLECTING
    idle = machine()
    assert idle.handle(rnd.Rejoined(sel[0], 0.0)) == [] and idle.state == RoundState.IDLE


def test_a_late_last_will_of_an_older_connection_does_not_take_a_reconnected_device_offline():
    # Prepare: connection 1's will, then connection 2's hello and status (the broker delivers the will late)
    from device_agent.wire.messages import Hello, Status
    from fleet.registry import Registry

    reg = Registry()
    hello = lambda s: Hello("d1", "stm32f746", 320_000, 1_000_000, (), "", s).to_json()
    status = lambda state, s: Status("d1", state, 0 if state != "offline" else None,
                                     0 if state != "offline" else None, session=s).to_json()
    reg.receive("hello", "d1", hello(1), 0.0)
    reg.receive("hello", "d1", hello(2), 1.0)
    reg.receive("status", "d1", status("online", 2), 1.0)
    # Execute
    late = reg.receive("status", "d1", status("offline", 1), 2.0)
    old_hello = reg.receive("hello", "d1", hello(1), 2.0)
    real = reg.receive("status", "d1", status("offline", 2), 3.0)
    # Assert: the stale will and hello change nothing; the current connection's will does
    assert late.stale and not late.lost and old_hello.stale
    assert real.lost and not real.stale and not reg.is_online("d1")
