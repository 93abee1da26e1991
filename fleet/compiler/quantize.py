"""Quantization helpers shared by the importers: real scales and ranges -> int8 / int32 values and fixed-point attrs.

Everything here runs once, at compile time, on floats; the results are the integers docs/engine.md consumes.
It refuses silent saturation: a bias that does not fit int32, or a scale that is not finite and positive, raises.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from device_agent.engine import ir, qmath

ACT_MIN, ACT_MAX = qmath.INT8_MIN, qmath.INT8_MAX
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def quantize_weight(w: np.ndarray, fallback_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 quantization.

    Parameters
    ----------
    w : np.ndarray
        Float weights, output channel first, e.g. ``(C_out, C_in/groups, KH, KW)``.
    fallback_scale : float, optional
        Scale for an all-zero channel; default: the largest scale of the other channels (1/127 if all are zero).

    Returns
    -------
    (np.ndarray, np.ndarray)
        ``q`` int8 in [-127, 127], same shape as ``w``; ``scale`` float32 ``(C_out,)`` with ``w ~= q * scale``.
    """
    w = np.asarray(w, dtype=np.float64)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) if w.size else np.zeros(w.shape[0])
    scale = (amax / qmath.WEIGHT_MAX).astype(np.float32)
    if not np.all(np.isfinite(scale)):
        raise ValueError("weights contain NaN or Inf")
    if np.any(scale <= 0):
        fb = fallback_scale if fallback_scale is not None else float(scale.max()) if scale.max() > 0 else 1 / 127
        scale[scale <= 0] = np.float32(fb)
    bshape = (-1,) + (1,) * (w.ndim - 1)
    q = np.clip(np.round(w / scale.astype(np.float64).reshape(bshape)), qmath.WEIGHT_MIN, qmath.WEIGHT_MAX)
    return q.astype(np.int8), scale


def quantize_bias(b: np.ndarray | None, s_x: float, s_w: np.ndarray, name: str = "bias") -> np.ndarray:
    """Float bias -> int32 with scale ``s_x * s_w[c]``; ``None`` gives zeros. Raises if a value overflows int32."""
    s_w = np.asarray(s_w, dtype=np.float64)
    if b is None:
        return np.zeros(s_w.shape[0], dtype=np.int32)
    q = np.round(np.asarray(b, dtype=np.float64) / (float(s_x) * s_w))
    if not np.all(np.isfinite(q)) or q.min(initial=0) < INT32_MIN or q.max(initial=0) > INT32_MAX:
        raise ValueError(f"{name}: quantized bias does not fit int32 (max |b/(s_x*s_w)| = {np.abs(q).max():.3g})")
    return q.astype(np.int32)


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 parameters for a real range (widened to include 0).

    Returns
    -------
    (float, int)
        ``(scale, zero_point)`` with ``real = scale * (q - zero_point)``; ``lo`` maps near -128, ``hi`` near 127.

    >>> activation_qparams(0.0, 6.0)
    (0.023529411764705882, -128)
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"activation range must be finite, got [{lo}, {hi}]")
    if hi - lo < 1e-8:  # a constant-zero tensor: any positive scale represents it exactly
        hi = lo + 1e-3
    scale = (hi - lo) / (ACT_MAX - ACT_MIN)
    zp = int(np.clip(round(ACT_MIN - lo / scale), ACT_MIN, ACT_MAX))
    return scale, zp


def conv_multipliers(s_x: float, s_w: np.ndarray, s_y: float) -> tuple[np.ndarray, np.ndarray]:
    """CONV2D ``mult, shift`` per output channel from ``s_x * s_w[c] / s_y`` (int32 arrays)."""
    pairs = [qmath.quantize_multiplier(float(s_x) * float(s) / float(s_y)) for s in np.asarray(s_w).ravel()]
    return np.array([m for m, _ in pairs], np.int32), np.array([s for _, s in pairs], np.int32)


def add_multipliers(s_a: float, s_b: float, s_y: float) -> tuple[int, int, int]:
    """ADD ``(mult_a, mult_b, shift)``: ``mult/2**shift = s/s_y`` with the larger multiplier just below 2**30."""
    ra, rb = float(s_a) / float(s_y), float(s_b) / float(s_y)
    for r in (ra, rb):
        if not math.isfinite(r) or r <= 0:
            raise ValueError(f"ADD scale ratio must be finite and > 0, got {r!r}")
    _, e = math.frexp(max(ra, rb))
    shift = 30 - e
    if round(max(ra, rb) * 2.0**shift) >= 1 << 30:
        shift -= 1
    if not 1 <= shift <= 62:
        raise ValueError(f"ADD scale ratios {ra:.3g}, {rb:.3g} out of the representable range")
    return round(ra * 2.0**shift), round(rb * 2.0**shift), shift


def avgpool_multiplier(s_x: float, s_y: float, hw: int) -> tuple[int, int]:
    """Global AVGPOOL ``(mult, shift)`` with ``mult/2**shift = s_x / (s_y * H * W)``."""
    return qmath.quantize_multiplier(float(s_x) / (float(s_y) * hw))


def act_range(act: str | None, s_y: float, z_y: int) -> tuple[int, int]:
    """``(act_min, act_max)`` in the output's int8 domain for ``None``, ``"relu"`` or ``"relu6"``."""
    if act is None:
        return ACT_MIN, ACT_MAX
    lo = max(ACT_MIN, int(z_y))
    if act == "relu":
        return lo, ACT_MAX
    if act == "relu6":
        return lo, int(min(ACT_MAX, z_y + round(6.0 / float(s_y))))
    raise ValueError(f"unknown activation {act!r} (expected None, 'relu' or 'relu6')")


def classifier_op(graph: ir.Graph) -> int:
    """Index of the CONV2D op producing the graph's logits (the classifier)."""
    for i, op in enumerate(graph.ops):
        if graph.output_id in op.outputs:
            if op.type != ir.OpType.CONV2D:
                raise ValueError(f"graph output is produced by {op.type.name} op {op.name!r}, not by a CONV2D")
            return i
    raise ValueError(f"no op produces the graph output tensor {graph.output_id}")


def new_classifier(graph: ir.Graph, num_classes: int, seed: int = 0, init: str = "zero") -> ir.Graph:
    """A copy of ``graph`` whose final classifier is a fresh ``num_classes``-way 1x1 conv (transfer learning).

    Parameters
    ----------
    graph : ir.Graph
        An imported forward graph; its output is a CONV2D on a ``(C, 1, 1)`` feature vector.
    num_classes : int
        K, the new number of classes.
    seed : int
        Seed for ``init="small"``.
    init : str
        ``"zero"`` (weights and bias 0: the first backward pass reaches the head only) or ``"small"`` (int8
        weights uniform in [-8, 8], bias 0).

    Returns
    -------
    ir.Graph
        New graph (the input graph is untouched). Quantization: weight scales = the median of the old head's
        per-channel scales (the features keep their scale, so trained weights land in a similar range); logits
        keep the old logits' scale with zero point 0 (a fresh head's logits start around 0 and grow both ways);
        int32 bias scale ``s_x * s_w``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if init not in ("zero", "small"):
        raise ValueError(f"init must be 'zero' or 'small', got {init!r}")
    g = copy.deepcopy(graph)
    op = g.ops[classifier_op(g)]
    x, w_old, b_old, y = (g.tensors[i] for i in (*op.inputs[:3], op.outputs[0]))
    if tuple(x.shape[1:]) != (1, 1) or tuple(w_old.shape[2:]) != (1, 1) or int(op.attrs["groups"]) != 1:
        raise ValueError(f"classifier {op.name!r} is not a 1x1 conv on a (C,1,1) vector: x {x.shape}, w {w_old.shape}")
    c_in = x.shape[0]
    s_w = np.full(num_classes, np.median(w_old.scale), np.float32)
    if init == "zero":
        wq = np.zeros((num_classes, c_in, 1, 1), np.int8)
    else:
        wq = np.random.default_rng(seed).integers(-8, 9, size=(num_classes, c_in, 1, 1)).astype(np.int8)
    w_old.shape, w_old.data, w_old.scale = wq.shape, wq, s_w
    b_old.shape, b_old.data = (num_classes,), np.zeros(num_classes, np.int32)
    b_old.scale = (float(x.scale[0]) * s_w).astype(np.float32)
    y.shape, y.zero_point = (num_classes, 1, 1), 0
    mult, shift = conv_multipliers(float(x.scale[0]), s_w, float(y.scale[0]))
    op.attrs.update(mult=mult, shift=shift, act_min=ACT_MIN, act_max=ACT_MAX)
    return g
