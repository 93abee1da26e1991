"""Loss and error-gradient kernels (SOFTMAX_CE, APPLY_MASK, CONV2D_BWD_INPUT, GRAD_ACCUM, AVGPOOL_BWD, RESHAPE_BWD).

A gradient is an int8 array (N, ...) plus one integer exponent per sample (N,): real value ``g * 2**e`` with
respect to the real activation. Every shift of a gradient rounds half to even (exact ties are common on small
integers; half up gave summed gradients a same-sign offset, docs/engine.md "Diagnosis at 10k"). Integer arithmetic only, as docs/engine.md specifies; weight updates live in
update.py, and this module refuses to touch weights.
"""

from __future__ import annotations

import numpy as np

from . import ir
from .conv import ConvGeom, conv_transpose_acc
from .qmath import check_exps, dyn_requant, rshift_round_even

Grad = tuple[np.ndarray, np.ndarray]  # (int8 (N, ...), int64 exponents (N,))


def softmax_ce(logits: np.ndarray, labels: np.ndarray, lut: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Integer softmax cross-entropy gradient of int8 logits.

    Parameters
    ----------
    logits : (N, K, 1, 1) int8; labels : (N,) int in [0, K).
    lut : (256,) ``round(2**20 * exp(-j * s_logits))``.
    scale : the logits' real scale, used only for the reported float loss.

    Returns
    -------
    g : (N, K, 1, 1) int8, e : (N,) int64, loss : (N,) float64 (not bit-exact), correct : (N,) bool.
    """
    n, k = logits.shape[:2]
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.shape != (n,) or (n and (labels.min() < 0 or labels.max() >= k)):
        raise ValueError(f"SOFTMAX_CE expects {n} labels in [0, {k}), got shape {labels.shape}"
                         f"{'' if not labels.size else f' range [{labels.min()}, {labels.max()}]'}")
    y = logits.reshape(n, k).astype(np.int64)
    d = y.max(axis=1, keepdims=True) - y  # (N, K) in [0, 255]
    e = np.asarray(lut, dtype=np.int64)[d]
    s = e.sum(axis=1, keepdims=True)
    p = (e * (1 << 15) + s // 2) // s  # Q15
    onehot = np.arange(k)[None, :] == labels[:, None]
    g, ex = dyn_requant((p - (onehot << 15)).reshape(logits.shape), np.full(n, -15, np.int64))
    df = d.astype(np.float64) * float(scale)
    loss = np.log(np.exp(-df).sum(axis=1)) + df[np.arange(n), labels]
    return g, ex, loss, y.argmax(axis=1) == labels


def apply_mask(g: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``g * mask``: zero the gradient where the forward clamp saturated. Shapes must match."""
    if g.shape != mask.shape:
        raise ValueError(f"APPLY_MASK expects gradient and mask of one shape, got {g.shape} and {mask.shape}")
    return np.where(mask, g, 0).astype(np.int8)


def conv_bwd_input(g: np.ndarray, e: np.ndarray, w: np.ndarray, geom: ConvGeom, in_hw: tuple[int, int],
                   wscale_q: np.ndarray, wscale_p: int) -> Grad:
    """Input gradient of a conv: ``dyn_requant(conv_transpose(rshift_round_even(g * wscale_q, 8), w), e + p - 7)``.

    Parameters
    ----------
    g : (N, C_out, OH, OW) int8 (already masked), e : (N,) exponents.
    w : (C_out, C_in/groups, KH, KW) int8; in_hw : forward input (H, W).
    wscale_q : (C_out,) weight scales as Q15 mantissas; wscale_p : their shared exponent.

    Returns
    -------
    (N, C_in, H, W) int8 gradient and (N,) exponents.
    """
    check_exps("wscale_p", wscale_p)
    q = np.asarray(wscale_q, dtype=np.int64).reshape(1, -1, 1, 1)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"wscale_q has {q.shape[1]} entries, expected one per output channel ({g.shape[1]})")
    gp = rshift_round_even(g.astype(np.int64) * q, 8)  # |g'| <= 16256
    acc = conv_transpose_acc(gp, w, geom, in_hw)
    return dyn_requant(acc, np.asarray(e, np.int64) + int(wscale_p) - 7)


def _per_sample(e: np.ndarray, ndim: int) -> np.ndarray:
    return np.asarray(e, dtype=np.int64).reshape(-1, *([1] * (ndim - 1)))


def grad_accum(g1: np.ndarray, e1: np.ndarray, g2: np.ndarray, e2: np.ndarray) -> Grad:
    """Sum of two gradient branches aligned to the larger exponent, then requantized."""
    if g1.shape != g2.shape:
        raise ValueError(f"GRAD_ACCUM expects two gradients of one shape, got {g1.shape} and {g2.shape}")
    e = np.maximum(e1, e2)
    rnd = rshift_round_even
    acc = rnd(g1, _per_sample(e - e1, g1.ndim)) + rnd(g2, _per_sample(e - e2, g2.ndim))
    return dyn_requant(acc, e)


def avgpool_bwd(g: np.ndarray, e: np.ndarray, inv_hw: int, hw: tuple[int, int]) -> Grad:
    """Global-pool gradient: (N, C, 1, 1) -> (N, C, H, W), ``dyn_requant(g * inv_hw, e - 16)``."""
    acc = np.broadcast_to(g.astype(np.int64) * int(inv_hw), (*g.shape[:2], *hw))
    return dyn_requant(acc, np.asarray(e, np.int64) - 16)


def backward_op(op: ir.Op, tensors: dict[int, ir.Tensor], store: dict[int, np.ndarray],
                exps: dict[int, np.ndarray], labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run one loss/gradient op: reads ``store``/``exps`` by tensor id, writes its output gradient there.

    Returns (loss (N,), correct (N,)) for SOFTMAX_CE and empty arrays otherwise.
    """
    t, a, ins, out = op.type, op.attrs, op.inputs, op.outputs[0]
    none = (np.empty(0), np.empty(0, bool))
    if t == ir.OpType.SOFTMAX_CE:
        lab = store[ins[1]] if labels is None else labels
        g, e, loss, ok = softmax_ce(store[ins[0]], np.asarray(lab), np.asarray(a["exp_lut"]),
                                    float(tensors[ins[0]].scale[0]))
        store[out], exps[out] = g, e
        return loss, ok
    if t == ir.OpType.APPLY_MASK:
        store[out], exps[out] = apply_mask(store[ins[0]], store[ins[1]]), exps[ins[0]]
    elif t == ir.OpType.CONV2D_BWD_INPUT:
        hw = (int(tensors[out].shape[1]), int(tensors[out].shape[2]))
        store[out], exps[out] = conv_bwd_input(store[ins[0]], exps[ins[0]], store[ins[1]], ConvGeom.from_attrs(a),
                                               hw, np.asarray(a["wscale_q"]), int(a["wscale_p"]))
    elif t == ir.OpType.GRAD_ACCUM:
        store[out], exps[out] = grad_accum(store[ins[0]], exps[ins[0]], store[ins[1]], exps[ins[1]])
    elif t == ir.OpType.AVGPOOL_BWD:
        store[out], exps[out] = avgpool_bwd(store[ins[0]], exps[ins[0]], int(a["inv_hw"]),
                                            (int(tensors[out].shape[1]), int(tensors[out].shape[2])))
    elif t == ir.OpType.RESHAPE_BWD:
        g = store[ins[0]]
        store[out], exps[out] = g.reshape(g.shape[0], *tensors[out].shape), exps[ins[0]]
    else:
        raise ValueError(f"op {op.name or t.name} is not a loss/gradient op")
    return none
