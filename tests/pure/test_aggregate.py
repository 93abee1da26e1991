"""Pure aggregation: sparse FedAvg against its float64 oracle, robust variants over contributors only."""

from __future__ import annotations

import numpy as np
import pytest

from fleet import aggregate as agg


def _random_deltas(n=7, d=50, k=20, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.integers(-40, 41, size=(n, d)).astype(np.int64)
    masks = np.zeros((n, d), bool)
    for i in range(n):
        masks[i, rng.choice(d, size=k, replace=False)] = True
    weights = rng.integers(1, 200, size=n).astype(np.int64)
    return values, masks, weights


def test_fedavg_matches_float64_reference_exactly():
    values, masks, weights = _random_deltas()
    got = agg.fedavg(values, masks, weights)
    ref = agg.fedavg_reference([(values[i], masks[i], int(weights[i])) for i in range(len(weights))])
    assert np.array_equal(got.covered, ref.covered)
    assert np.array_equal(got.value, ref.value)  # bit-exact, not approx
    assert np.array_equal(agg.to_int_delta(got), agg.to_int_delta(ref))


def test_fedavg_weights_only_contributors_of_each_coordinate():
    # device 0 (10 samples) sends coordinate 0 only; device 1 (30 samples) sends both
    values = np.array([[4, 0], [8, 2]], np.int64)
    masks = np.array([[True, False], [True, True]])
    m = agg.fedavg(values, masks, np.array([10, 30]))
    assert m.value[0] == (4 * 10 + 8 * 30) / 40
    assert m.value[1] == 2.0  # not (0*10 + 2*30)/40: device 0 did not vote on it
    assert m.covered.all()


def test_uncovered_coordinates_keep_their_value():
    values = np.array([[5, 7]], np.int64)
    masks = np.array([[True, False]])
    m = agg.fedavg(values, masks, np.array([3]))
    assert m.covered.tolist() == [True, False]
    assert agg.to_int_delta(m).tolist() == [5, 0]


def test_fedavg_is_order_independent():
    values, masks, weights = _random_deltas(seed=3)
    perm = np.random.default_rng(1).permutation(len(weights))
    a, b = agg.fedavg(values, masks, weights), agg.fedavg(values[perm], masks[perm], weights[perm])
    assert np.array_equal(a.value, b.value)


def test_round_half_up_and_clamp():
    m = agg.Mean(np.array([0.5, -0.5, 1.49, -2.5, 300.0]), np.ones(5, bool))
    d = agg.to_int_delta(m)
    assert d.tolist() == [1, 0, 1, -2, 300]
    old = np.array([0, 0, 126, -126, 100], np.int8)
    assert agg.apply_int_delta(old, d).tolist() == [1, 0, 127, -127, 127]
    big = np.array([2**31 - 2], np.int32)
    assert agg.apply_int_delta(big, np.array([10])).tolist() == [2**31 - 1]


def test_trimmed_mean_ignores_non_contributors():
    # 5 devices, coordinate 0 sent by 3 of them; Flower's FedTrimmedAvg would count the two absent as zeros
    values = np.array([[10, 1], [12, 1], [100, 1], [0, 1], [0, 1]], np.int64)
    masks = np.array([[True, True], [True, True], [True, True], [False, True], [False, True]])
    m = agg.trimmed_mean(values, masks, beta=0.34)  # trims floor(0.34*3) = 1 from each end of coordinate 0
    assert m.value[0] == 12.0
    m0 = agg.trimmed_mean(values, masks, beta=0.0)
    assert m0.value[0] == pytest.approx(122 / 3)


def test_trimmed_mean_sparse_deltas_are_not_zero():
    values, masks, _weights = _random_deltas(n=10, d=40, k=4, seed=5)
    values = np.abs(values) + 1  # all positive where sent
    m = agg.trimmed_mean(values, masks, beta=0.2)
    assert (m.value[m.covered] > 0).all()


def test_coordinate_median_over_contributors():
    values = np.array([[1, 5], [3, 0], [9, 7], [100, 0]], np.int64)
    masks = np.array([[True, True], [True, False], [True, True], [False, False]])
    m = agg.coordinate_median(values, masks)
    assert m.value.tolist() == [3.0, 6.0]


def test_clipped_mean_bounds_each_device():
    values = np.array([[3, 4], [300, 400]], np.int64)  # norms 5 and 500
    masks = np.ones((2, 2), bool)
    m = agg.clipped_mean(values, masks, np.array([1, 1]), clip=5.0)
    assert np.allclose(m.value, [3.0, 4.0])


def test_bad_inputs_raise_aggregation_error():
    values, masks, weights = _random_deltas(n=2, d=3, k=2)
    with pytest.raises(agg.AggregationError):
        agg.fedavg(values, masks, np.array([1, 0]))
    with pytest.raises(agg.AggregationError):
        agg.fedavg(values, masks.astype(int), weights)
    with pytest.raises(agg.AggregationError):
        agg.aggregate("krum", values, masks, weights)
    with pytest.raises(agg.AggregationError):
        agg.apply_int_delta(np.zeros(3, np.float32), np.zeros(3, np.int64))
