"""A personalization scenario run twice with the same seed gives the same metrics, to the last bit.

What made runs differ (session 8, measured on a small sensor-watch run: two runs, different participation and
round-1 accuracy): with ``over_selection`` > 1 a round commits at its ``goal``-th accepted delta, so WHICH
selected devices count depends on thread/process timing. Everything else is a function of the seed (selection:
fleet/round.py:select; device steps: rng of (seed, round); aggregation: exact int64 sums in any order; the
replays and baselines run sequentially). The scenario configs therefore select exactly ``goal`` devices
(``over_selection: 1.0``), and this test runs one such fleet (selection smaller than the fleet, so it matters)
twice and compares everything the run reports.
"""

from __future__ import annotations

from tests.conftest import ROOT, require, require_cmd


def _run():
    from fleet.sim.config import load_sim_config
    from fleet.sim.runner import run_simulation

    cfg = load_sim_config(ROOT / "configs" / "medical-heart.yaml", devices=8, rounds=2, goal=4, over_selection=1.0,
                          local_steps=10, new_users=1, deadline=600)
    cfg.model.pretrain_epochs = 3
    cfg.personalization.steps = 5
    cfg.personalization.new_user_steps = 5
    cfg.personalization.compare = ["ditto", "bias"]
    cfg.continual.prequential = False
    return run_simulation(cfg, progress=False)


def test_same_seed_same_metrics_bit_for_bit():
    require_cmd("mosquitto")
    try:
        from fleet.scenarios.heart import load_heart_scenario

        load_heart_scenario(4)
    except FileNotFoundError as e:
        require(False, str(e))

    a, b = _run(), _run()

    assert a.errors == [] and a.round_status == ["committed", "committed"]
    assert a.devices_per_round == [4, 4] and a.devices == 7  # 4 of 7 fleet devices: the selection matters
    assert a.accuracy_per_round == b.accuracy_per_round
    assert a.accuracy_mean_per_device == b.accuracy_mean_per_device
    assert a.accuracy_personalized_per_round == b.accuracy_personalized_per_round
    assert a.per_device == b.per_device  # participation and every model's accuracy, per device
