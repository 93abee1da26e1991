"""The device behaviour model (fleet/sim/behaviour.py) and its simulate config section (fleet/sim/config.py)."""

from __future__ import annotations

import pytest

from fleet.config import ConfigError
from fleet.sim.behaviour import BehaviourModel, DeviceBehaviour, awake_intervals
from fleet.sim.config import load_sim_config


def test_training_pauses_while_the_device_sleeps():
    # Prepare: awake 10 s of every 40 s from t = 0 (phase 0)
    d = DeviceBehaviour(step_s=0.5, period_s=40.0, duty=0.25)

    # Execute: 15 s of work started at t = 5 (5 s before it sleeps)
    done = d.finish(5.0, 15.0)

    # Assert: 5 s now, sleeps 10..40, 10 s more after waking at 40
    assert done == pytest.approx(50.0)
    assert awake_intervals(d, 100.0) == [(0.0, 10.0), (40.0, 50.0), (80.0, 90.0)]
    assert not d.awake(10.0) and d.next_wake(10.0) == pytest.approx(40.0)


def test_a_seed_draws_the_same_fleet_and_board_speeds_centre_it():
    m = BehaviourModel(speed_sigma=0.0, stragglers=0.25, straggler_factor=4.0, sleepers=0.5)

    a, b = m.draw(8, seed=3, base_step_s=[0.01] * 4 + [0.1] * 4), m.draw(8, seed=3, base_step_s=[0.01] * 4 + [0.1] * 4)

    assert a == b and a != m.draw(8, seed=4, base_step_s=[0.01] * 4 + [0.1] * 4)
    # no spread: each device runs at its board's speed, 2 of 8 four times slower
    assert sorted(round(d.step_s / base, 6) for d, base in zip(a, [0.01] * 4 + [0.1] * 4)) == [1.0] * 6 + [4.0] * 2
    assert sum(d.duty < 1.0 for d in a) == 4
    with pytest.raises(ValueError, match="base_step_s"):
        m.draw(2, seed=0, base_step_s=[0.01, -1.0])


def test_the_behaviour_section_reports_every_problem_with_its_key_path(tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("name: t\ndevices: 4\nbehaviour: {enabled: true, time_scale: 0, sleepers: 1.5, sleeper_duty: 0,"
                   " delay_s: [0.5, 0.1], instructions_per_step: many, clock_hz: {stm32f746: -1}}\n")

    with pytest.raises(ConfigError) as e:
        load_sim_config(cfg)

    text = str(e.value)
    for msg in ("behaviour.time_scale: must be > 0", "behaviour.sleepers: must be a fraction in [0, 1], got 1.5",
                "behaviour.sleeper_duty: must be in (0, 1]", "behaviour.delay_s: expected [lo, hi]",
                "behaviour.instructions_per_step: expected auto or an integer >= 1, got 'many'",
                "behaviour.clock_hz.stm32f746: must be > 0 Hz"):
        assert msg in text, text


def test_a_board_speed_is_instructions_over_its_clock(tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("name: t\ndevices: 4\nbehaviour: {enabled: true, clock_hz: {my-board: 48000000}}\n")

    c = load_sim_config(cfg).behaviour

    assert c.clock("my-board") == 48e6 and c.clock("stm32f746") == 216e6
    with pytest.raises(KeyError, match="no clock known for board 'other'"):
        c.clock("other")


def test_a_wake_instant_rounded_short_of_its_period_still_moves_time_forward():
    # Prepare: a wake instant whose phase computes to just below the period (float rounding), so awake() says no
    d = DeviceBehaviour(step_s=0.5, period_s=600.0, duty=0.5, phase_s=0.1)
    t = 599.9 - 1e-13
    assert not d.awake(t)

    # Execute / Assert: the next sleep is half a period after the wake, never in the past (a simulator flipping
    # sleep/wake at such an instant used to loop forever and ran out of memory)
    assert d.next_sleep(t) == pytest.approx(t + 300.0)
    assert d.next_wake(t) >= t and d.finish(t, 1.0) == pytest.approx(t + 1.0, abs=1e-9)
