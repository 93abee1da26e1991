"""The spec's error-gradient rounding (half to even) and bias-buffer units (2**-12 LSB), from the 10k diagnosis."""

from __future__ import annotations

import numpy as np

from device_agent.engine.backward import avgpool_bwd, conv_bwd_input, grad_accum
from device_agent.engine.conv import ConvGeom
from device_agent.engine.qmath import dyn_requant, rshift_round, rshift_round_even
from device_agent.engine.recipe import ACC_BITS_B, apply_bias, fixed_delta


def test_rshift_round_even_by_hand():
    x = np.array([-7, -5, -3, -1, 1, 3, 5, 7, -4, 4, 6])
    # /2: -3.5 -2.5 -1.5 -0.5 0.5 1.5 2.5 3.5 -2 2 3 -> ties to the even neighbour
    assert rshift_round_even(x, 1).tolist() == [-4, -2, -2, 0, 0, 2, 2, 4, -2, 2, 3]
    assert rshift_round(x, 1).tolist() == [-3, -2, -1, 0, 1, 2, 3, 4, -2, 2, 3]  # half up: biased upwards
    assert rshift_round_even(np.array([6, -6]), 2).tolist() == [2, -2]  # 1.5 -> 2, -1.5 -> -2
    assert rshift_round_even(np.array([3, -3]), -2).tolist() == [12, -12]  # shift <= 0 shifts left
    assert rshift_round_even(np.array([-128, 128, -(1 << 61)]), np.array([8, 8, 70])).tolist() == [0, 0, 0]


def test_rshift_round_even_differs_from_half_up_only_on_ties_and_is_unbiased():
    rng = np.random.default_rng(0)
    x = rng.integers(-2**20, 2**20, 20000)
    for s in (1, 3, 7):
        a, b = rshift_round_even(x, s), rshift_round(x, s)
        ties = (x & ((1 << s) - 1)) == (1 << (s - 1))
        assert np.array_equal(a[~ties], b[~ties])
        assert np.all(np.abs(a[ties] - b[ties]) <= 1)
        v = np.arange(-(1 << 12), 1 << 12)  # every residue equally often: the mean error is 0 only for even
        assert (rshift_round_even(v, s) * (1 << s) - v).mean() == 0
        assert (rshift_round(v, s) * (1 << s) - v).mean() > 0


def test_dyn_requant_rounds_ties_to_even_and_keeps_the_range_rule():
    g, e = dyn_requant(np.array([[254, -254, 3, 1, 5, -5]], np.int64), 0)
    assert g.tolist() == [[127, -127, 2, 0, 2, -2]] and e.tolist() == [1]  # 1.5 -> 2, 0.5 -> 0, 2.5 -> 2
    g, e = dyn_requant(np.array([[255, 1]], np.int64), 3)  # 127.5 -> 128 would overflow: one more bit
    assert g.tolist() == [[64, 0]] and e.tolist() == [5]


def test_grad_accum_alignment_and_requant_are_unbiased():
    # e1 = 0, e2 = 1: g1 is shifted by 1 (ties 1/2, 3/2, 5/2 -> 0, 2, 2), g2 is not
    g, e = grad_accum(np.array([[1, 3, 5, -1]], np.int8), np.array([0]), np.array([[0, 0, 0, 0]], np.int8),
                      np.array([1]))
    assert g.tolist() == [[0, 2, 2, 0]] and e.tolist() == [1]
    # a sum above 127 is requantized by one bit: 129 / 2 = 64.5 -> 64, 131 / 2 = 65.5 -> 66
    g, e = grad_accum(np.array([[127, 127]], np.int8), np.array([0]), np.array([[2, 4]], np.int8), np.array([0]))
    assert g.tolist() == [[64, 66]] and e.tolist() == [1]
    # many small ties sum to zero mean, where half up gives +0.25 LSB each
    rng = np.random.default_rng(1)
    g1 = rng.integers(-6, 7, (1, 4000)).astype(np.int8)
    g, _ = grad_accum(g1, np.array([0]), np.zeros_like(g1), np.array([1]))
    assert abs(float(g.astype(np.int64).sum() * 2 - g1.astype(np.int64).sum())) < 0.02 * 4000


def test_conv_bwd_input_weight_scale_step_rounds_ties_to_even():
    # 1x1 conv, one in/out channel, w = 1: g_x = dyn_requant(rshift_round_even(g * q, 8))
    geom = ConvGeom(1, 1, 0, 0, 1)
    g = np.array([[[[1, 3, -1, 2]]]], np.int8)  # * 128 / 256 = 0.5, 1.5, -0.5, 1 -> 0, 2, 0, 1
    out, e = conv_bwd_input(g, np.array([0]), np.ones((1, 1, 1, 1), np.int8), geom, (1, 4), np.array([128]), 0)
    assert out.tolist() == [[[[0, 2, 0, 1]]]] and e.tolist() == [-7]


def test_avgpool_bwd_rounds_ties_to_even():
    # g * 3 with max 381 -> shift 2: 381/4 = 95.25, 6/4 = 1.5, 18/4 = 4.5, -6/4 = -1.5
    g, e = avgpool_bwd(np.array([[[[127]], [[2]], [[6]], [[-2]]]], np.int8), np.array([0]), 3, (1, 1))
    assert g.reshape(-1).tolist() == [95, 2, 4, -2] and e.tolist() == [-14]


def test_bias_buffers_keep_sub_sixteenth_lsb_steps():
    assert ACC_BITS_B == 12
    # a per-sample bias step of 1/32 LSB is 128 units of 2**-12 LSB (in 2**-4 units it was 0.5, rounded up to 1)
    d = fixed_delta(np.array([1]), np.array([1]), np.array([-5]), ACC_BITS_B)
    assert d.tolist() == [128]
    v = np.array([128 * 40], np.int64)  # 40 such steps: 1.25 LSB -> the bias moves by 1
    assert apply_bias(np.array([0], np.int32), v).tolist() == [-1]
