"""DP inside real rounds: the coordinator clips, adds seeded noise, spends epsilon with the commit, refuses past budget."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fleet import aggregate as agg
from fleet import coordinator as co
from fleet.config import ConfigError
from fleet.schema import load_fleet_config
from fleet.security.dp import DPConfig, RDPAccountant, dp_mean, round_rng, support_units
from fleet.store import Store
from tests.pure.test_fleet_inmemory import PLAN, Fleet, config, state_bytes

SIGMA = 0.8


def dp_fleet(store: Store, budget: float | None = None, n: int = 5) -> Fleet:
    cfg = config(goal=n, dp=DPConfig(clip=0.5, noise_multiplier=SIGMA, delta=1e-5, epsilon_budget=budget))
    f = Fleet(n=n, store=store, cfg=cfg)
    f.boot()
    return f


def test_dp_round_equals_the_pure_clipped_noisy_mean_and_reports_epsilon():
    f = dp_fleet(Store())
    before = {k: v.copy() for k, v in f.coord.state.items()}
    f.round()
    closed = f.closed()[-1]
    assert closed.committed and len(closed.accepted) == 5

    values, masks, _ = f.coord.stacked(1)
    noise = round_rng(f.store.secret("dp_noise"), 1)
    mean = dp_mean(values, masks, clip=0.5, noise_multiplier=SIGMA, denominator=5, rng=noise,
                   units=support_units(PLAN))
    step, pos = agg.to_int_delta(mean), 0
    for t in [t for t in PLAN.trainable if not t.personal]:
        want = agg.apply_int_delta(before[t.id], step[pos:pos + t.numel])
        assert np.array_equal(f.coord.state[t.id], want), t.name
        pos += t.numel
    assert closed.epsilon == pytest.approx(RDPAccountant(1e-5).spend(1.0, SIGMA).epsilon)


def test_without_the_secret_the_noise_differs():
    f = dp_fleet(Store())
    f.round()
    values, masks, _ = f.coord.stacked(1)
    kw = {"clip": 0.5, "noise_multiplier": SIGMA, "denominator": 5, "units": support_units(PLAN)}
    ours = dp_mean(values, masks, rng=round_rng(f.store.secret("dp_noise"), 1), **kw).value
    guess = dp_mean(values, masks, rng=round_rng(b"\0" * 32, 1), **kw).value
    assert not np.allclose(ours, guess)


def test_round_past_the_budget_is_refused_and_the_refusal_survives_a_restart(tmp_path):
    two = RDPAccountant(1e-5, rounds=[(1.0, SIGMA)] * 2).epsilon()
    three = RDPAccountant(1e-5, rounds=[(1.0, SIGMA)] * 3).epsilon()
    budget = (two + three) / 2
    path = tmp_path / "fleet.db"
    f = dp_fleet(Store(path), budget=budget)
    f.round()
    f.round()
    version, round_id = f.coord.version, f.coord.machine.round_id
    assert [c.epsilon for c in f.closed()][-1] == pytest.approx(two)

    refused = [o for o in f.send(co.StartRound()) if isinstance(o, co.RoundRefused)]
    assert len(refused) == 1 and "privacy budget" in refused[0].detail
    assert (f.coord.version, f.coord.machine.round_id) == (version, round_id)

    f.restart_coordinator(Store(path))  # the spent rounds were committed with the model
    assert len(f.coord.accountant.rounds) == 2
    assert any(isinstance(o, co.RoundRefused) for o in f.send(co.StartRound()))


@pytest.mark.parametrize("cut", [2, 6])
def test_restart_mid_round_gives_the_same_noisy_model(tmp_path, cut):
    seed_store = tmp_path / "seed.db"
    seed = Store(seed_store)
    secret = seed.secret("dp_noise")  # both runs share the coordinator's secret, as one deployment would
    seed.close()
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    shutil.copy(seed_store, a)
    shutil.copy(seed_store, b)

    clean = dp_fleet(Store(a))
    clean.round()
    clean.round()

    f = dp_fleet(Store(b))
    f.round()
    f.now += 10.0
    f.send(co.StartRound())
    f.pump(max_coord=cut)
    f.restart_coordinator(Store(b))
    f.pump()
    f.now += 100.0
    f.send(co.Tick())
    f.pump()
    assert f.store.secret("dp_noise") == clean.store.secret("dp_noise") == secret
    assert f.coord.version == clean.coord.version == 3
    assert state_bytes(f.coord.state) == state_bytes(clean.coord.state)
    assert f.closed()[-1].epsilon == pytest.approx(clean.closed()[-1].epsilon)


def test_dp_with_a_robust_aggregator_is_a_config_error(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("devices: 4\ndp: {clip: -1, noise_multiplier: 1.0, delta: 2}\naggregator: trimmed\n")
    with pytest.raises(ConfigError) as e:
        load_fleet_config(path)
    text = str(e.value)
    assert "dp.clip: must be a finite number > 0" in text and "dp.delta: must be in (0, 1)" in text
    assert "dp: replaces the aggregator" in text
