"""Loss and gradient kernels against torch autograd on dequantized tensors, plus dyn_requant edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from device_agent.engine import attrs as A
from device_agent.engine.backward import apply_mask, avgpool_bwd, conv_bwd_input, grad_accum, softmax_ce
from device_agent.engine.conv import ConvGeom
from device_agent.engine.qmath import dyn_requant, rshift_round

RNG = np.random.default_rng(1)


def _real(g: np.ndarray, e: np.ndarray) -> np.ndarray:
    return g.astype(np.float64) * np.exp2(e.astype(np.float64)).reshape(-1, *([1] * (g.ndim - 1)))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("cin,cout,groups,k,stride,pad,h,w", [
    (3, 8, 1, 3, 1, 1, 8, 8), (8, 8, 8, 3, 2, 1, 9, 7), (4, 6, 2, 3, 2, 0, 10, 9), (16, 10, 1, 1, 1, 0, 1, 1),
    (8, 16, 8, 5, 2, 2, 11, 11),
])
def test_conv_bwd_input_matches_torch_autograd(cin, cout, groups, k, stride, pad, h, w):
    # Prepare
    geom = ConvGeom(stride, stride, pad, pad, groups)
    wq, sw = A.quantize_weights(RNG.standard_normal((cout, cin // groups, k, k)) * np.linspace(0.5, 2, cout)[:, None,
                                                                                                            None, None])
    oh, ow = geom.out_hw(h, w, k, k)
    g = RNG.integers(-127, 128, (2, cout, oh, ow)).astype(np.int8)
    e = np.array([-9, -3])
    ws = A.wscale(sw)
    xr = torch.zeros((2, cin, h, w), dtype=torch.float64, requires_grad=True)
    wr = torch.tensor(wq.astype(np.float64) * sw.astype(np.float64)[:, None, None, None])
    F.conv2d(xr, wr, stride=stride, padding=pad, groups=groups).backward(torch.tensor(_real(g, e)))
    # Execute
    gx, ex = conv_bwd_input(g, e, wq, geom, (h, w), ws["wscale_q"], ws["wscale_p"])
    # Assert: int8 with its own exponents; relative error bounded by int8 rounding (2^-7 of the max) per sample
    got, want = _real(gx, ex), xr.grad.numpy()
    assert gx.dtype == np.int8 and gx.shape == want.shape and ex.shape == (2,)
    for n in range(2):
        assert np.abs(got[n] - want[n]).max() <= 2.0 ** -6 * np.abs(want[n]).max()
        assert _cos(got[n], want[n]) > 0.999


def test_softmax_ce_matches_torch_gradient_and_loss():
    # Prepare
    s = 0.0625
    logits = RNG.integers(-128, 128, (5, 7, 1, 1)).astype(np.int8)
    labels = np.array([0, 3, 6, 2, 2])
    lut = A.exp_lut(s)
    zr = torch.tensor(logits.reshape(5, 7).astype(np.float64) * s, requires_grad=True)
    loss_t = F.cross_entropy(zr, torch.tensor(labels), reduction="none")
    loss_t.sum().backward()
    # Execute
    g, e, loss, correct = softmax_ce(logits, labels, lut, s)
    # Assert
    assert np.abs(_real(g, e).reshape(5, 7) - zr.grad.numpy()).max() < 2.0 ** -7
    assert np.allclose(loss, loss_t.detach().numpy(), atol=1e-9)
    assert (correct == (logits.reshape(5, 7).argmax(1) == labels)).all()
    assert (e >= -15).all()


def test_softmax_ce_first_max_wins_and_rejects_bad_labels():
    # Prepare
    logits = np.array([[5, 9, 9, 1]], np.int8).reshape(1, 4, 1, 1)
    lut = A.exp_lut(0.1)
    # Execute
    _, _, _, right = softmax_ce(logits, np.array([1]), lut, 0.1)
    _, _, _, wrong = softmax_ce(logits, np.array([2]), lut, 0.1)
    # Assert
    assert right[0] and not wrong[0]
    with pytest.raises(ValueError, match=r"labels in \[0, 4\)"):
        softmax_ce(logits, np.array([4]), lut, 0.1)


def test_apply_mask_zeroes_saturated_positions():
    # Prepare
    g = np.array([[3, -4, 5, 127]], np.int8)
    mask = np.array([[True, False, True, False]])
    # Execute
    out = apply_mask(g, mask)
    # Assert
    assert out.tolist() == [[3, 0, 5, 0]] and out.dtype == np.int8


def test_grad_accum_aligns_exponents_per_sample():
    # Prepare
    g1 = np.array([[100, -50], [10, 20]], np.int8)
    g2 = np.array([[3, 4], [-100, 60]], np.int8)
    e1, e2 = np.array([-5, -10]), np.array([-8, -4])
    # Execute
    g, e = grad_accum(g1, e1, g2, e2)
    # Assert: sample 0 aligns g2 to -5 (>> 3: 4/8 is a tie, to the even 0), sample 1 aligns g1 to -4 (>> 6)
    assert g.tolist() == [[100, -50], [-100, 60]] and e.tolist() == [-5, -4]
    assert np.abs(_real(g, e) - (_real(g1, e1) + _real(g2, e2))).max() <= 2.0 ** -4


def test_avgpool_bwd_spreads_gradient_evenly():
    # Prepare
    g = np.array([[[[100]], [[-64]]]], np.int8)
    e = np.array([-3])
    # Execute
    gx, ex = avgpool_bwd(g, e, A.inv_hw(3, 5), (3, 5))
    # Assert
    assert gx.shape == (1, 2, 3, 5) and (gx[0, 0] == gx[0, 0, 0, 0]).all()
    assert np.allclose(_real(gx, ex)[0, :, 0, 0], np.array([100, -64]) * 2.0 ** -3 / 15, rtol=0.01)


def test_dyn_requant_edge_cases():
    # Prepare
    acc = np.array([[0, 0], [127, -127], [128, -1], [255, 3], [-255, 1], [-(1 << 62), 1]], np.int64)
    # Execute
    g, e = dyn_requant(acc, np.arange(6))
    # Assert
    assert g.tolist() == [[0, 0], [127, -127], [64, 0], [64, 1], [-64, 0], [-64, 0]]
    assert e.tolist() == [0, 1, 2 + 1, 3 + 2, 4 + 2, 5 + 56]
    assert np.abs(g).max() <= 127


def test_rshift_round_half_up_and_huge_shifts():
    # Prepare
    x = np.array([5, -5, 6, -6, 1 << 40, -(1 << 40), 3])
    sh = np.array([1, 1, 2, 2, 63, 200, -2])
    # Execute
    out = rshift_round(x, sh)
    # Assert: round half up (toward +inf on ties), shifts above 62 give 0, negative shifts multiply
    assert out.tolist() == [3, -2, 2, -1, 0, 0, 12]
