"""QAS-scaled SGD updates: gradient direction vs torch, unbiased stochastic rounding, first-k and flag semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from device_agent.engine import attrs as A
from device_agent.engine.conv import ConvGeom, conv_weight_acc
from device_agent.engine.qmath import mant_exp, rshift_round, scaled_update
from device_agent.engine.update import align_sum, conv_update, embedding_update, lr_mant_exp

RNG = np.random.default_rng(2)


def _setup(cin=6, cout=5, groups=1, k=3, stride=2, pad=1, h=7, w=7, n=1):
    geom = ConvGeom(stride, stride, pad, pad, groups)
    wq, sw = A.quantize_weights(RNG.standard_normal((cout, cin // groups, k, k)))
    oh, ow = geom.out_hw(h, w, k, k)
    x = RNG.integers(-128, 128, (n, cin, h, w)).astype(np.int8)
    g = RNG.integers(-127, 128, (n, cout, oh, ow)).astype(np.int8)
    return geom, wq, sw, x, g


def _torch_grads(x, zx, sx, wq, sw, g, e, geom):
    """dL/dW_real and dL/dB_real of the float conv for output gradient g * 2**e."""
    wr = torch.tensor(wq.astype(np.float64) * sw.astype(np.float64)[:, None, None, None], requires_grad=True)
    br = torch.zeros(wq.shape[0], dtype=torch.float64, requires_grad=True)
    xr = torch.tensor(sx * (x.astype(np.float64) - zx))
    y = F.conv2d(xr, wr, br, stride=geom.stride_h, padding=geom.pad_h, groups=geom.groups)
    y.backward(torch.tensor(g.astype(np.float64) * 2.0 ** e))
    return wr.grad.numpy(), br.grad.numpy()


@pytest.mark.parametrize("groups,cin,cout", [(1, 6, 5), (6, 6, 6), (2, 6, 4)])
def test_weight_update_direction_matches_torch_before_rounding(groups, cin, cout):
    # Prepare
    geom, wq, sw, x, g = _setup(cin=cin, cout=cout, groups=groups)
    sx, zx, e, lr = np.float32(0.05), -7, -12, 0.01
    gw, _ = _torch_grads(x, zx, float(sx), wq, sw, g, e, geom)
    qas = A.qas(sx, sw)
    lr_m, lr_e = lr_mant_exp(lr)
    m = rshift_round(lr_m * qas["qas_w_m"].astype(np.int64), 15)
    ex = lr_e + qas["qas_w_e"] + 15 + e
    # Execute: the exact pre-rounding update acc * M * 2**E
    acc = conv_weight_acc(g, x.astype(np.int64) - zx, wq.shape, geom)[0]
    dw = acc * (m * np.exp2(ex.astype(np.float64)))[:, None, None, None]
    # Assert: QAS makes dw = lr * dL/dW / s_w (fp32 SGD on the real weights)
    want = lr * gw / sw.astype(np.float64)[:, None, None, None]
    cos = float((dw * want).sum() / (np.linalg.norm(dw) * np.linalg.norm(want)))
    assert cos > 0.99
    assert np.abs(dw - want).max() <= 2e-3 * np.abs(want).max()


def test_stochastic_rounding_is_unbiased():
    # Prepare: values whose exact result is fractional, many independent draws
    acc = np.array([1, 3, -5, 7, -1000, 12345], np.int64)
    m, e = 16384, -17  # acc * 2**-3
    draws = 4000
    rnd = RNG.integers(0, 1 << 32, (draws, acc.size), dtype=np.uint64).astype(np.uint32)
    # Execute
    out = scaled_update(acc[None, :], m, e, rnd, 1 << 20)
    # Assert: mean is the exact value, each draw is floor or ceil of it
    exact = acc * m * 2.0 ** e
    assert np.abs(out.mean(axis=0) - exact).max() < 0.03
    assert ((out == np.floor(exact)) | (out == np.ceil(exact))).all()


def test_conv_update_is_unbiased_qas_sgd_over_steps():
    # Prepare: small lr so |dw| < 1 for every weight (pure stochastic rounding, no clipping)
    geom, wq, sw, x, g = _setup()
    sx, zx, e = np.float32(0.05), 3, -14
    gw, _gb = _torch_grads(x, zx, float(sx), wq, sw, g, e, geom)
    want_w = gw / sw.astype(np.float64)[:, None, None, None]
    lr = 0.5 / np.abs(want_w).max()
    qas = A.qas(sx, sw)
    b = np.zeros(wq.shape[0], np.int32)
    w0 = np.zeros_like(wq)  # NOTE: dL/dW does not depend on W; starting at 0 keeps w - dw away from the clamp
    steps = 400
    # Execute
    dws = np.zeros((steps, *wq.shape))
    for s in range(steps):
        w_new, _ = conv_update(g, np.array([e]), x, zx, w0, b, geom, 6, (7, 7), qas, lr, s, 11, 12)
        dws[s] = -w_new.astype(np.int64)
    # Assert
    mean = dws.mean(axis=0)
    assert np.abs(mean - lr * want_w).max() < 0.1  # 4 sigma of 400 draws
    assert np.corrcoef(mean.ravel(), (lr * want_w).ravel())[0, 1] > 0.98


def test_conv_update_bias_qas_matches_real_gradient():
    # Prepare
    geom, wq, sw, x, g = _setup(n=1)
    sx, e = np.float32(0.05), -10
    _, gb = _torch_grads(x, 0, float(sx), wq, sw, g, e, geom)
    b = RNG.integers(-1000, 1000, wq.shape[0]).astype(np.int32)
    lr = 0.01
    # Execute
    _, b_new = conv_update(g, np.array([e]), None, 0, wq, b, geom, 0, (7, 7), A.qas(sx, sw), lr, 0, 11, 12,
                           update_weight=False)
    # Assert: db = lr * dL/dB / (s_x s_w), each element within one stochastic rounding step
    want = lr * gb / (float(sx) * sw.astype(np.float64))
    assert np.abs((b.astype(np.int64) - b_new) - want).max() <= 1 + 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("groups,cin,cout", [(1, 6, 5), (6, 6, 6), (2, 6, 4)])
def test_conv_update_touches_only_first_k_input_channels(groups, cin, cout):
    # Prepare
    geom, wq, sw, x, g = _setup(cin=cin, cout=cout, groups=groups)
    k = 3
    b = np.zeros(cout, np.int32)
    cin_g = cin // groups
    glob = (np.arange(cout) // (cout // groups))[:, None] * cin_g + np.arange(cin_g)[None, :]
    # Execute
    w_new, b_new = conv_update(g, np.array([-6]), x[:, :k], 0, wq, b, geom, k, (7, 7), A.qas(0.05, sw), 0.05, 0,
                               11, 12)
    # Assert
    changed = (w_new != wq).any(axis=(2, 3))
    assert not changed[glob >= k].any()
    assert changed[glob < k].any()
    assert (b_new != b).any()


def test_conv_update_flags_and_missing_saved_input():
    # Prepare
    geom, wq, sw, x, g = _setup()
    b = np.zeros(wq.shape[0], np.int32)
    qas = A.qas(0.05, sw)
    # Execute
    w1, b1 = conv_update(g, np.array([-6]), x, 0, wq, b, geom, 6, (7, 7), qas, 0.05, 0, 11, 12, update_bias=False)
    # Assert
    assert (b1 == b).all() and (w1 != wq).any()
    with pytest.raises(ValueError, match="needs x_saved"):
        conv_update(g, np.array([-6]), x[:, :2], 0, wq, b, geom, 6, (7, 7), qas, 0.05, 0, 11, 12)
    with pytest.raises(ValueError, match="learning rate"):
        conv_update(g, np.array([-6]), x, 0, wq, b, geom, 6, (7, 7), qas, 0.0, 0, 11, 12)


def test_align_sum_hand_example():
    # Prepare
    acc = np.array([[40, -8], [7, 7]])
    e = np.array([-5, -2])
    # Execute
    total, e_max = align_sum(acc, e)
    # Assert: sample 0 shifted right by 3 with round half up: 40 -> 5, -8 -> -1
    assert total.tolist() == [12, 6] and e_max == -2


def test_batch_of_duplicates_equals_single_sample_update():
    # Prepare: two copies of one sample with lr give exactly the update of one sample (lr / 2 is exact in mant_exp)
    geom, wq, sw, x, g = _setup()
    b = np.zeros(wq.shape[0], np.int32)
    qas = A.qas(0.05, sw)
    # Execute
    w1, b1 = conv_update(g, np.array([-9]), x, 0, wq, b, geom, 6, (7, 7), qas, 0.03, 5, 11, 12)
    w2, b2 = conv_update(np.repeat(g, 2, 0), np.array([-9, -9]), np.repeat(x, 2, 0), 0, wq, b, geom, 6, (7, 7), qas,
                         0.03, 5, 11, 12)
    # Assert
    assert mant_exp(0.03 / 2)[0] == mant_exp(0.03)[0]
    assert (w1 == w2).all() and (b1 == b2).all()


def test_embedding_update_moves_only_used_rows_against_gradient():
    # Prepare
    table = np.zeros((10, 4), np.int8)
    ids = np.array([[2, 5, 2]])
    g = np.zeros((1, 4, 1, 3), np.int8)
    g[0, :, 0, 0], g[0, :, 0, 2], g[0, :, 0, 1] = [100, -100, 50, 0], [100, -100, 50, 0], [-96, 96, 0, 0]
    qm, qe = mant_exp(1 / 0.05)
    # Execute
    out = embedding_update(g, np.array([-4]), ids, table, qm, qe, 0.01, 0, 9)
    # Assert: row 2 got twice the gradient; rows never looked up stay 0
    unused = np.setdiff1d(np.arange(10), [2, 5])
    assert (out[unused] == 0).all()
    assert out[2, 0] < 0 < out[2, 1] and out[5, 0] > 0 > out[5, 1]
    want = 0.01 * 200 * 2.0 ** -4 / 0.05  # 2.5
    assert abs(-int(out[2, 0]) - want) <= 1
