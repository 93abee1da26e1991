"""Op attributes from real scales: the compile-time float -> integer step, done once, exactly as docs/engine.md says.

The compiler and the hand-built examples both call these, so a plan's integers always follow from its float32
scales. This module only converts numbers; it refuses to build ops or touch tensors.
"""

from __future__ import annotations

import math

import numpy as np

from .qmath import mant_exp, quantize_multiplier


def f32(s) -> np.ndarray:
    """Scales as stored in a plan (float32, at least 1-d); attributes must be computed from these values."""
    return np.atleast_1d(np.asarray(s, dtype=np.float32))


def _i32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int32)


def conv_requant(s_x: float, s_w: np.ndarray, s_y: float) -> dict[str, np.ndarray]:
    """``mult, shift`` (C_out,) with ``mult * 2**-shift ~= s_x * s_w[c] / s_y`` (CONV2D)."""
    pairs = [quantize_multiplier(float(s_x) * float(s) / float(s_y)) for s in f32(s_w)]
    return {"mult": _i32([m for m, _ in pairs]), "shift": _i32([s for _, s in pairs])}


def add_requant(s_a: float, s_b: float, s_y: float) -> dict[str, int]:
    """ADD: ``shift = 29 - frexp(max(s_a, s_b) / s_y).exp`` so the larger mantissa lies in [2**28, 2**29]."""
    _, e = math.frexp(max(float(s_a), float(s_b)) / float(s_y))
    shift = 29 - e
    if shift < 1 or shift > 62:
        raise ValueError(f"ADD scale ratio {max(s_a, s_b) / s_y!r} out of range (shift {shift} not in [1, 62])")
    return {"mult_a": round(float(s_a) / float(s_y) * 2.0 ** shift),
            "mult_b": round(float(s_b) / float(s_y) * 2.0 ** shift), "shift": shift}


def avgpool_requant(s_x: float, s_y: float, h: int, w: int) -> dict[str, int]:
    """AVGPOOL: ``mult * 2**-shift ~= s_x / (s_y * H * W)``."""
    m, s = quantize_multiplier(float(s_x) / (float(s_y) * h * w))
    return {"mult": m, "shift": s}


def exp_lut(s_logits: float) -> np.ndarray:
    """SOFTMAX_CE: 256 entries ``round(2**20 * exp(-j * s_logits))``."""
    return _i32(np.round(2.0 ** 20 * np.exp(-np.arange(256) * float(f32(s_logits)[0]))))


def wscale(s_w: np.ndarray) -> dict[str, np.ndarray | int]:
    """CONV2D_BWD_INPUT: ``wscale_p = frexp(max s_w).exp``, ``wscale_q[c] = round(s_w[c] * 2**(15 - p))``."""
    s = f32(s_w).astype(np.float64)
    p = math.frexp(float(s.max()))[1]
    return {"wscale_q": _i32(np.round(s * 2.0 ** (15 - p))), "wscale_p": p}


def qas(s_x: float, s_w: np.ndarray) -> dict[str, np.ndarray]:
    """CONV2D_UPDATE QAS factors: ``qas_w[c] = s_x / s_w[c]``, ``qas_b[c] = 1 / (s_x * s_w[c])`` as (m, e)."""
    sx = float(f32(s_x)[0])
    w = [mant_exp(sx / float(s)) for s in f32(s_w)]
    b = [mant_exp(1.0 / (sx * float(s))) for s in f32(s_w)]
    return {"qas_w_m": _i32([m for m, _ in w]), "qas_w_e": _i32([e for _, e in w]),
            "qas_b_m": _i32([m for m, _ in b]), "qas_b_e": _i32([e for _, e in b])}


def inv_hw(h: int, w: int) -> int:
    """AVGPOOL_BWD: ``round(2**16 / (H * W))``."""
    return round(2.0 ** 16 / (h * w))


def quantize_weights(wf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: float (C_out, ...) -> (int8 weights in [-127, 127], float32 scales)."""
    amax = np.abs(wf.reshape(wf.shape[0], -1)).max(axis=1)
    s = f32(np.where(amax > 0, amax / 127.0, 1.0))
    q = np.clip(np.round(wf / s.reshape(-1, *([1] * (wf.ndim - 1)))), -127, 127).astype(np.int8)
    return q, s
