"""Differential privacy: RDP accountant against closed forms and a reference library, clipping, noise, budget."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fleet import aggregate as agg
from fleet.security.dp import (
    DPError,
    PrivacyBudgetExceeded,
    RDPAccountant,
    clip_deltas,
    dp_mean,
    noise_for_budget,
    rdp_gaussian,
    rdp_to_epsilon,
    sample_rate,
    support_units,
)
from tests.fixtures.tiny import tiny_plan

PLAN = tiny_plan()
UNITS = support_units(PLAN)
D = UNITS.size


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.7])
@pytest.mark.parametrize("order", [2, 3, 10, 64])
def test_unsampled_gaussian_rdp_is_the_closed_form(sigma, order):
    assert rdp_gaussian(1.0, sigma, order) == pytest.approx(order / (2 * sigma**2), rel=1e-12)


@pytest.mark.parametrize("q, sigma", [(0.01, 1.0), (0.2, 0.8), (0.5, 2.0)])
def test_sampled_gaussian_order_2_closed_form(q, sigma):
    # a = 2: A = (1-q)^2 + 2q(1-q) + q^2 e^{1/sigma^2} = 1 + q^2 (e^{1/sigma^2} - 1)
    assert rdp_gaussian(q, sigma, 2) == pytest.approx(math.log1p(q * q * math.expm1(1 / sigma**2)), rel=1e-12)


# (q, sigma, rounds, delta) -> epsilon from dp-accounting 0.6.0's RdpAccountant (Poisson-sampled Gaussian,
# ADD_OR_REMOVE_ONE) with this module's DEFAULT_ORDERS; computed once, outside the test suite.
REFERENCE = [
    ((0.01, 1.1, 1000, 1e-5), 1.7252908180449444),
    ((256 / 60000, 1.1, 14062, 1e-5), 2.5969811785948815),
    ((1.0, 5.0, 10, 1e-6), 3.1345027119221234),
    ((0.1, 1.0, 100, 1e-5), 7.972921510380539),
    ((0.3, 2.0, 50, 1e-5), 5.956242684147724),
]


@pytest.mark.parametrize("params, want", REFERENCE)
def test_accountant_matches_reference_library_values(params, want):
    q, sigma, rounds, delta = params
    acc = RDPAccountant(delta, rounds=[(q, sigma)] * rounds)
    assert acc.epsilon() == pytest.approx(want, rel=1e-9)


def test_epsilon_is_monotone_in_rounds_noise_and_sampling_rate():
    def eps(q, sigma, rounds):
        return RDPAccountant(1e-5, rounds=[(q, sigma)] * rounds).epsilon()

    by_rounds = [eps(0.1, 1.0, r) for r in (1, 2, 5, 20, 100)]
    by_sigma = [eps(0.1, s, 20) for s in (0.7, 1.0, 1.5, 3.0, 10.0)]
    by_q = [eps(q, 1.0, 20) for q in (0.01, 0.05, 0.1, 0.5, 1.0)]
    assert all(a < b for a, b in itertools.pairwise(by_rounds)), by_rounds
    assert all(a > b for a, b in itertools.pairwise(by_sigma)), by_sigma
    assert all(a < b for a, b in itertools.pairwise(by_q)), by_q
    assert RDPAccountant(1e-5).epsilon() == 0.0 and eps(0.0, 1.0, 10) == 0.0


def test_round_over_budget_is_refused_and_nothing_is_spent():
    acc = RDPAccountant(1e-5, budget=4.0)
    reports = []
    with pytest.raises(PrivacyBudgetExceeded) as e:
        while True:
            reports.append(acc.spend(q=0.1, noise_multiplier=1.0))
    spent = len(acc.rounds)
    assert spent == len(reports) > 1 and e.value.rounds_spent == spent
    assert reports[-1].epsilon <= 4.0 < e.value.epsilon_after and "budget" in str(e.value)
    assert acc.epsilon() == pytest.approx(reports[-1].epsilon)  # the refused round left no trace
    assert [r.round_index for r in reports] == list(range(1, spent + 1))
    assert all(a.epsilon < b.epsilon for a, b in itertools.pairwise(reports))
    assert len({round(r.epsilon_round, 12) for r in reports}) == 1  # same parameters, same per-round cost
    again = RDPAccountant.from_json(acc.to_json())
    assert again.epsilon() == acc.epsilon() and again.rounds == acc.rounds
    with pytest.raises(PrivacyBudgetExceeded):
        again.spend(0.1, 1.0)


def test_noise_calibration_and_parameter_errors():
    sigma = noise_for_budget(3.0, 1e-5, q=0.2, rounds=50)
    assert RDPAccountant(1e-5, rounds=[(0.2, sigma)] * 50).epsilon() <= 3.0
    assert RDPAccountant(1e-5, rounds=[(0.2, sigma - 0.01)] * 50).epsilon() > 3.0
    assert sample_rate(13, 100) == 0.13
    for bad in (lambda: rdp_gaussian(1.5, 1.0, 2), lambda: rdp_gaussian(0.5, 1.0, 1.5),
                lambda: RDPAccountant(0.0), lambda: rdp_to_epsilon(np.zeros(1), (2,), 1.0),
                lambda: sample_rate(0, 10), lambda: RDPAccountant(1e-5, budget=-1)):
        with pytest.raises(DPError):
            bad()


def _deltas(n=10, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.integers(-254, 255, (n, D)) * np.where(UNITS < 1e-3, 40, 1)  # biases move more integer steps
    masks = rng.random((n, D)) < 0.4
    masks[0] = True
    return np.where(masks, values, 0).astype(np.int64), masks


def test_clipping_bound_holds_in_real_units_over_each_devices_support():
    values, masks = _deltas()
    clip = 0.05

    clipped, norms = clip_deltas(values, masks, clip, UNITS)

    after = np.sqrt((clipped**2).sum(axis=1))
    assert (after <= clip * (1 + 1e-12)).all()
    big = norms > clip
    assert big.any() and np.allclose(after[big], clip)
    assert not clipped[~masks].any()  # coordinates a device did not send stay unsent
    # a delta already inside the ball passes through unchanged (in real units)
    small, _ = clip_deltas(values[:1], masks[:1], float(norms[0]) * 2, UNITS)
    assert np.allclose(small[0], values[0] * UNITS)
    # integer units (units=None) are the same code with unit 1
    _ci, ni = clip_deltas(values, masks, 100.0)
    assert np.allclose(ni, np.sqrt((values.astype(float) ** 2).sum(axis=1)))


def test_noise_std_matches_sigma_clip_over_n_on_the_whole_support():
    n, sigma, clip = 10, 1.3, 0.05
    zeros, none_sent = np.zeros((n, D), np.int64), np.zeros((n, D), bool)
    samples = np.concatenate([
        dp_mean(zeros, none_sent, clip=clip, noise_multiplier=sigma, denominator=n,
                rng=np.random.default_rng(s), units=UNITS).value * UNITS
        for s in range(100)])  # 70,000 real-unit noise values

    assert samples.std() == pytest.approx(sigma * clip / n, rel=0.02)
    assert abs(samples.mean()) < 4 * sigma * clip / n / math.sqrt(samples.size)
    m = dp_mean(zeros, none_sent, clip=clip, noise_multiplier=sigma, denominator=n, rng=np.random.default_rng(0))
    assert m.covered.all()  # noise lands on every coordinate of the fixed support, sent or not


def test_dp_mean_without_noise_is_the_clipped_mean_and_seeded_noise_repeats():
    values, masks = _deltas()
    clip = 0.05
    clipped, _ = clip_deltas(values, masks, clip, UNITS)

    m0 = dp_mean(values, masks, clip=clip, noise_multiplier=0.0, denominator=10, rng=np.random.default_rng(1),
                 units=UNITS)
    a = dp_mean(values, masks, clip=clip, noise_multiplier=1.0, denominator=10, rng=np.random.default_rng(7),
                units=UNITS)
    b = dp_mean(values, masks, clip=clip, noise_multiplier=1.0, denominator=10, rng=np.random.default_rng(7),
                units=UNITS)

    assert np.allclose(m0.value * UNITS, clipped.sum(axis=0) / 10)
    assert np.array_equal(agg.to_int_delta(a), agg.to_int_delta(b))
    state = {t.id: t.data for t in PLAN.trainable}
    step, pos = agg.to_int_delta(a), 0
    for t in PLAN.trainable:  # the result plugs into the coordinator's integer path unchanged
        new = agg.apply_int_delta(np.asarray(state[t.id]), step[pos:pos + t.numel])
        assert new.dtype == np.asarray(state[t.id]).dtype
        pos += t.numel
