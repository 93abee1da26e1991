"""Fixed-point atoms of the int8 training step: every rounding rule the engine and firmware share.

This module is the arithmetic spec (see docs/engine.md). It refuses floats on the training path: floats appear
only where the compiler turns a real scale into an integer (mantissa, exponent) pair, once, at compile time.
All functions are vectorized numpy on int64 and match the C firmware bit for bit.
"""

from __future__ import annotations

import math

import numpy as np

INT8_MIN, INT8_MAX = -128, 127
WEIGHT_MIN, WEIGHT_MAX = -127, 127  # symmetric int8 weights
MANT_BITS = 15  # mantissas are integers in [2^14, 2^15]
# Largest |exponent| a plan attribute (qas_*_e, wscale_p) or a learning rate's lr_e may carry (the firmware's
# TF_EXP_LIMIT): a float's mant_exp is within +-1100; the device sums these in int32 and refuses beyond.
EXP_LIMIT = 4096


def check_exps(what: str, e) -> None:
    """Raise ValueError unless every exponent in ``e`` is within +-EXP_LIMIT (as the firmware refuses)."""
    a = np.asarray(e, np.int64)
    if a.size and int(np.abs(a).max()) > EXP_LIMIT:
        raise ValueError(f"{what}: exponent {int(a.flat[np.abs(a).argmax()])} outside +-{EXP_LIMIT}")


def quantize_multiplier(real: float) -> tuple[int, int]:
    """Requantization multiplier: ``real ~= m * 2**-s`` with ``2**30 <= m < 2**31`` and ``s >= 1``.

    Used as ``y = (acc * m + 2**(s-1)) >> s`` (round half up). Refuses non-finite or non-positive input.

    >>> quantize_multiplier(0.5)
    (1073741824, 31)
    """
    if not math.isfinite(real) or real <= 0:
        raise ValueError(f"requantization scale must be finite and > 0, got {real!r}")
    frac, exp = math.frexp(real)  # real = frac * 2**exp, frac in [0.5, 1)
    m = round(frac * (1 << 31))
    if m == 1 << 31:
        m //= 2
        exp += 1
    s = 31 - exp
    if s < 1:
        raise ValueError(f"requantization scale {real!r} too large (>= 2**30)")
    if s > 62:  # scale below ~2^-31: the output is always the zero point
        return 0, 62
    return m, s


def mant_exp(real: float) -> tuple[int, int]:
    """A positive real as ``m * 2**e`` with integer ``m`` in ``[2**14, 2**15]`` (QAS factors, learning rates).

    >>> mant_exp(1.0)
    (16384, -14)
    """
    if not math.isfinite(real) or real <= 0:
        raise ValueError(f"expected a finite value > 0, got {real!r}")
    frac, exp = math.frexp(real)
    m = round(frac * (1 << MANT_BITS))
    return m, exp - MANT_BITS


def requantize(acc: np.ndarray, mult: np.ndarray | int, shift: np.ndarray | int) -> np.ndarray:
    """``(acc * mult + 2**(shift-1)) >> shift`` on int64 (round half up). ``acc`` must stay below 2**32."""
    acc = np.asarray(acc, dtype=np.int64)
    mult = np.asarray(mult, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    return (acc * mult + (np.int64(1) << (shift - 1))) >> shift


def rshift_round(x: np.ndarray | int, shift: np.ndarray | int) -> np.ndarray:
    """Arithmetic right shift with round half up; ``shift <= 0`` shifts left.

    Right shifts above 62 act as 62 (the result is 0 for ``|x| < 2**61``), so no shift is undefined in C.
    """
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    pos = np.clip(shift, 0, 62)
    half = np.where(pos > 0, np.int64(1) << np.maximum(pos - 1, 0), 0)
    right = (x + half) >> pos
    return np.where(shift > 0, right, x << np.maximum(-shift, 0))


def rshift_round_even(x: np.ndarray | int, shift: np.ndarray | int) -> np.ndarray:
    """Arithmetic right shift with round half to even (unbiased on exact halves); ``shift <= 0`` shifts left.

    ``q = x >> s``, ``r = x - (q << s)``; ``q + 1`` when ``r > 2**(s-1)`` or (``r == 2**(s-1)`` and ``q`` odd).
    Right shifts above 62 act as 62, as in :func:`rshift_round`.
    """
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    pos = np.clip(shift, 0, 62)
    q = x >> pos
    r = x - (q << pos)
    half = np.where(pos > 0, np.int64(1) << np.maximum(pos - 1, 0), 0)
    up = (pos > 0) & ((r > half) | ((r == half) & ((q & 1) == 1)))
    return np.where(shift > 0, q + up, x << np.maximum(-shift, 0))


def dyn_requant(acc: np.ndarray, exp: np.ndarray | int, per_sample: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Error gradient ``acc * 2**exp`` (int64) -> int8 values and a new power-of-two exponent.

    The shift is the smallest ``sh >= 0`` with ``round(max|acc| / 2**sh) <= 127``, taken per sample
    (axis 0) when ``per_sample``; rounding half to even (:func:`rshift_round_even`: ties are exact and common on
    small gradients, and half up would bias them; docs/engine.md "Diagnosis at 10k"). Returns ``(int8 array,
    int64 exponents of shape (N,))``.
    """
    rnd = rshift_round_even
    acc = np.asarray(acc, dtype=np.int64)
    n = acc.shape[0] if per_sample else 1
    flat = acc.reshape(n, -1)
    m = np.abs(flat).max(axis=1) if flat.size else np.zeros(n, dtype=np.int64)
    sh = np.zeros(n, dtype=np.int64)
    # bit_length(m) - 7 is exact or one short; fix up with one rounding check.
    bl = np.array([int(v).bit_length() for v in m], dtype=np.int64)
    sh = np.maximum(bl - 7, 0)
    too_big = rnd(m, sh) > INT8_MAX
    sh = sh + too_big
    out = rnd(flat, sh[:, None]).astype(np.int8).reshape(acc.shape)
    return out, np.asarray(exp, dtype=np.int64) + sh


def rng_u32(step: int, tensor_id: int, idx: np.ndarray) -> np.ndarray:
    """Counter-based uniform uint32 per element: a stateless hash of (step, tensor, element index).

    ``x = idx*0x9E3779B1 ^ step*0x85EBCA77 ^ tensor_id*0xC2B2AE3D`` (mod 2**32), then the
    "lowbias32" mix: ``x ^= x>>16; x *= 0x7FEB352D; x ^= x>>15; x *= 0x846CA68B; x ^= x>>16``.
    """
    with np.errstate(over="ignore"):
        x = np.asarray(idx, dtype=np.uint32) * np.uint32(0x9E3779B1)
        x ^= np.uint32((step * 0x85EBCA77) & 0xFFFFFFFF)
        x ^= np.uint32((tensor_id * 0xC2B2AE3D) & 0xFFFFFFFF)
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def stochastic_shift(v: np.ndarray, shift: np.ndarray | int, rnd: np.ndarray) -> np.ndarray:
    """``floor((v + r) / 2**shift)`` with ``r`` uniform in ``[0, 2**shift)`` drawn from ``rnd`` (uint32).

    ``shift`` is clamped to [0, 62]; ``r = rnd >> (32-shift)`` for shift <= 32, else ``rnd << (shift-32)``.
    For ``shift < 0`` the caller multiplies instead (see :func:`scaled_update`).
    """
    v = np.asarray(v, dtype=np.int64)
    s = np.clip(np.asarray(shift, dtype=np.int64), 0, 62)
    r = np.asarray(rnd, dtype=np.uint32).astype(np.int64)
    r = np.where(s <= 32, r >> np.maximum(32 - s, 0), r << np.maximum(s - 32, 0))
    return (v + r) >> s


def scaled_update(acc: np.ndarray, mult: np.ndarray, exp: np.ndarray, rnd: np.ndarray, limit: int) -> np.ndarray:
    """Stochastically rounded ``acc * mult * 2**exp``, saturated to ``[-limit, limit]``.

    ``acc`` int64 (|acc| < 2**40), ``mult`` integer mantissa (< 2**16), ``exp`` integer exponent; all broadcast.
    """
    v = np.clip(np.asarray(acc, dtype=np.int64) * np.asarray(mult, dtype=np.int64), -(1 << 56), 1 << 56)
    exp = np.asarray(exp, dtype=np.int64)
    down = stochastic_shift(v, -exp, rnd)
    up = np.clip(v, -(1 << 40), 1 << 40) << np.clip(exp, 0, 20)
    return np.clip(np.where(exp < 0, down, up), -limit, limit)
