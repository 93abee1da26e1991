"""Pure aggregation of sparse deltas: FedAvg over each coordinate's contributors, robust variants, int application.

Every function takes flat arrays and returns new arrays; none does I/O, keeps state or looks at a plan (the one
stateful helper, :class:`RunningSums`, is :func:`weighted_sums` fed one device at a time). The
caller flattens the plan's uploaded (non-personal) trainable tensors into one vector of ``D`` coordinates; each
device contributes ``values (D,)`` and a ``mask (D,)`` of the coordinates it votes on (every coordinate of each
tensor it sent a record for, a top-k record voting 0 where it is silent: see
:func:`device_agent.wire.delta.delta_to_flat`; none of a tensor it left out). A coordinate nobody voted on is
*not* a zero vote: it keeps its value.

Conventions: ``values (n, D)`` int64 (integer weight units, exact) or float64; ``masks (n, D)`` bool;
``weights (n,)`` positive ints (sample counts). Results are a float64 mean plus a ``covered (D,)`` mask, then
:func:`to_int_delta` rounds half up (``floor(x + 0.5)``, deterministic) and :func:`apply_int_delta` clamps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT8_LIMIT = 127  # symmetric int8 weights: [-127, 127]
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_EXACT = 2**53  # integers below this are exact in float64


class AggregationError(ValueError):
    """Inputs that cannot be aggregated (shape mismatch, non-positive weight, non-finite value...)."""


@dataclass(frozen=True)
class Mean:
    """Aggregate over contributors: ``value[j]`` is meaningful only where ``covered[j]``."""

    value: np.ndarray  # (D,) float64, 0.0 where not covered
    covered: np.ndarray  # (D,) bool: at least one device contributed to coordinate j


def _check(values: np.ndarray, masks: np.ndarray, weights: np.ndarray | None = None) -> None:
    if values.ndim != 2 or masks.shape != values.shape:
        raise AggregationError(f"values and masks must both be (n, D), got {values.shape} and {masks.shape}")
    if masks.dtype != np.bool_:
        raise AggregationError(f"masks must be bool, got {masks.dtype}")
    if values.dtype.kind == "f" and not np.isfinite(values[masks]).all():
        raise AggregationError("values contain NaN or Inf")
    if weights is not None:
        if weights.shape != (values.shape[0],):
            raise AggregationError(f"weights must be ({values.shape[0]},), got {weights.shape}")
        if weights.dtype.kind not in "iu" or (weights <= 0).any():
            raise AggregationError(f"weights must be positive integers (sample counts), got {weights!r}")


def weighted_sums(values: np.ndarray, masks: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``num[j] = sum_i w_i v_ij [m_ij]``, ``den[j] = sum_i w_i [m_ij]``.

    Integer ``values`` give exact int64 sums, so the result is independent of device order (which is what lets a
    restarted coordinator resume a round from any subset of its stored deltas and end bit-identical).
    """
    values, masks, weights = np.asarray(values), np.asarray(masks), np.asarray(weights)
    _check(values, masks, weights)
    acc = np.int64 if values.dtype.kind in "iu" else np.float64
    wm = masks * weights.astype(np.int64)[:, None]  # (n, D) int64
    num = (values.astype(acc) * wm).sum(axis=0, dtype=acc)
    den = wm.sum(axis=0, dtype=np.int64)
    return num, den


def mean_from_sums(num: np.ndarray, den: np.ndarray) -> Mean:
    """Weighted mean ``num / den`` where ``den > 0``. Refuses int sums beyond float64's exact range."""
    if num.dtype.kind in "iu" and np.abs(num).max(initial=0) >= _EXACT:
        raise AggregationError("weighted sum exceeds 2**53: not exact in float64 (too many samples?)")
    covered = den > 0
    value = np.zeros(num.shape, np.float64)
    value[covered] = num[covered].astype(np.float64) / den[covered].astype(np.float64)
    return Mean(value, covered)


class RunningSums:
    """:func:`weighted_sums` one device at a time, so a coordinator folds each delta in as it is accepted.

    After adding rows in any order, ``num, den`` equal ``weighted_sums`` of the same rows stacked, bit for bit:
    integer sums are exact (and int64 wraps the same way in any order). Integer values only, for that reason.
    """

    def __init__(self, size: int):
        self.num = np.zeros(size, np.int64)
        self.den = np.zeros(size, np.int64)
        self.count = 0

    def add(self, values: np.ndarray, mask: np.ndarray, weight: int) -> None:
        values, mask = np.asarray(values), np.asarray(mask)
        if values.shape != self.num.shape or mask.shape != self.num.shape:
            raise AggregationError(f"values and mask must both be {self.num.shape}, got {values.shape} and "
                                   f"{mask.shape}")
        if values.dtype.kind not in "iu" or mask.dtype != np.bool_:
            raise AggregationError(f"integer values and a bool mask expected, got {values.dtype} and {mask.dtype}")
        if isinstance(weight, bool) or int(weight) != weight or weight <= 0:
            raise AggregationError(f"weight must be a positive integer (sample count), got {weight!r}")
        wm = mask * np.int64(weight)
        self.num += values.astype(np.int64, copy=False) * wm
        self.den += wm
        self.count += 1

    def merge(self, other: RunningSums) -> None:
        """Add ``other``'s rows (a partial sum of other devices, e.g. from an aggregation worker): exact, so the
        result equals adding its rows here one by one, in any order."""
        if other.num.shape != self.num.shape or other.den.shape != self.den.shape:
            raise AggregationError(f"partial sums of size {other.num.shape} cannot merge into {self.num.shape}")
        self.num += other.num
        self.den += other.den
        self.count += other.count

    def mean(self) -> Mean:
        """The sparse FedAvg of every row added so far (what :func:`fedavg` gives for them stacked)."""
        return mean_from_sums(self.num, self.den)


def fedavg(values: np.ndarray, masks: np.ndarray, weights: np.ndarray) -> Mean:
    """Sparse FedAvg: per coordinate, the sample-weighted mean over the devices that sent it."""
    return mean_from_sums(*weighted_sums(values, masks, weights))


def fedavg_reference(deltas: list[tuple[np.ndarray, np.ndarray, int]]) -> Mean:
    """The float64 oracle for :func:`fedavg`, written as a plain loop over ``(values, mask, weight)``.

    Kept deliberately naive (one device at a time, float64 throughout) so tests can check the vectorized,
    integer path against it.
    """
    if not deltas:
        raise AggregationError("no deltas to aggregate")
    d = deltas[0][0].shape[0]
    num, den = np.zeros(d, np.float64), np.zeros(d, np.float64)
    for v, m, w in deltas:
        num += np.where(m, np.asarray(v, np.float64) * float(w), 0.0)
        den += np.where(m, float(w), 0.0)
    covered = den > 0
    return Mean(np.divide(num, den, out=np.zeros(d), where=covered), covered)


def capped_weights(weights: np.ndarray) -> np.ndarray:
    """``weights`` capped at their lower median: what a device may claim to count for, at most.

    Sample counts are self-reported. Capping at the median keeps FedAvg's weighting among the devices at or below
    it, while a device claiming 10^6 samples counts as much as a median one, as long as fewer than half lie.
    E.g. ``[40, 48, 50, 10**6]`` -> ``[40, 48, 48, 48]``.
    """
    weights = np.asarray(weights)
    if weights.size == 0:
        return weights
    cap = np.sort(weights)[(weights.size - 1) // 2]
    return np.minimum(weights, cap)


def clipped_mean(values: np.ndarray, masks: np.ndarray, weights: np.ndarray, clip: float) -> Mean:
    """FedAvg after scaling each device's delta to L2 norm at most ``clip`` (norm over its sent coordinates),
    with the sample-count weights capped at their median (:func:`capped_weights`): clipping bounds how far one
    device can push, the cap how much it counts."""
    if not np.isfinite(clip) or clip <= 0:
        raise AggregationError(f"clip norm must be finite and > 0, got {clip!r}")
    values, masks, weights = np.asarray(values), np.asarray(masks), np.asarray(weights)
    _check(values, masks, weights)
    v = np.where(masks, values.astype(np.float64), 0.0)
    norms = np.sqrt((v * v).sum(axis=1))
    factor = np.minimum(1.0, clip / np.maximum(norms, np.finfo(np.float64).tiny))
    return fedavg(v * factor[:, None], masks, capped_weights(weights))


def _sorted_contributors(values: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise sort with non-contributors pushed to the end: ``(sorted (n, D), count (D,))``."""
    _check(values, masks)
    v = np.where(masks, values.astype(np.float64), np.inf)
    return np.sort(v, axis=0), masks.sum(axis=0)


def coordinate_median(values: np.ndarray, masks: np.ndarray) -> Mean:
    """Per coordinate, the median of the values its contributors sent (mean of the two middles if even)."""
    values, masks = np.asarray(values), np.asarray(masks)
    s, count = _sorted_contributors(values, masks)
    covered = count > 0
    lo = np.take_along_axis(s, np.maximum((count - 1) // 2, 0)[None, :], axis=0)[0]
    hi = np.take_along_axis(s, np.maximum(count // 2, 0)[None, :], axis=0)[0]
    value = np.zeros(s.shape[1], np.float64)
    value[covered] = (lo[covered] + hi[covered]) / 2.0
    return Mean(value, covered)


def trimmed_mean(values: np.ndarray, masks: np.ndarray, beta: float) -> Mean:
    """Per coordinate, drop the ``floor(beta * n_j)`` lowest and highest of its ``n_j`` contributors, average the rest.

    ``beta`` in ``[0, 0.5)``. Unweighted (as trimmed means are): the trimming is what bounds a bad device.
    """
    if not 0.0 <= beta < 0.5:
        raise AggregationError(f"trim fraction must be in [0, 0.5), got {beta!r}")
    values, masks = np.asarray(values), np.asarray(masks)
    s, count = _sorted_contributors(values, masks)
    t = np.floor(beta * count).astype(np.int64)
    rank = np.arange(s.shape[0])[:, None]
    keep = (rank >= t[None, :]) & (rank < (count - t)[None, :])
    kept = keep.sum(axis=0)
    total = np.where(keep, s, 0.0).sum(axis=0)
    covered = kept > 0
    value = np.zeros(s.shape[1], np.float64)
    value[covered] = total[covered] / kept[covered]
    return Mean(value, covered)


def to_int_delta(mean: Mean) -> np.ndarray:
    """Round half up to integer weight units (``floor(x + 0.5)``); 0 where no device contributed. int64 (D,)."""
    out = np.zeros(mean.value.shape, np.int64)
    out[mean.covered] = np.floor(mean.value[mean.covered] + 0.5).astype(np.int64)
    return out


def apply_int_delta(old: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``old + delta`` clamped to the tensor's range: int8 weights to [-127, 127], int32 biases to int32.

    Returns a new array of ``old``'s dtype and shape; ``delta`` is any integer array of the same size.
    """
    delta = np.asarray(delta)
    if delta.dtype.kind not in "iu":
        raise AggregationError(f"integer delta expected, got {delta.dtype}")
    if delta.size != old.size:
        raise AggregationError(f"delta has {delta.size} values, tensor has {old.size}")
    if old.dtype == np.int8:
        lo, hi = -INT8_LIMIT, INT8_LIMIT
    elif old.dtype == np.int32:
        lo, hi = INT32_MIN, INT32_MAX
    else:
        raise AggregationError(f"trainable tensors are int8 or int32, got {old.dtype}")
    new = old.astype(np.int64) + delta.reshape(old.shape).astype(np.int64)
    return np.clip(new, lo, hi).astype(old.dtype)


# --- asynchronous buffers: staleness weights -------------------------------------------------------------------

Q16 = 1 << 16  # staleness factors are fixed point: q = floor(f * 2^16 + 0.5), so buffered sums stay exact integers


def staleness_q16(factors: np.ndarray) -> np.ndarray:
    """Staleness factors ``f`` in (0, 1] as int64 ``floor(f * 2^16 + 0.5)``, at least 1 (a counted delta never
    weighs nothing)."""
    f = np.asarray(factors, np.float64)
    if f.ndim != 1 or not np.isfinite(f).all() or (f <= 0).any() or (f > 1).any():
        raise AggregationError(f"staleness factors must be a (n,) vector in (0, 1], got {factors!r}")
    return np.maximum(np.floor(f * Q16 + 0.5).astype(np.int64), 1)


def buffered_fedavg(values: np.ndarray, masks: np.ndarray, weights: np.ndarray, q16: np.ndarray) -> Mean:
    """A buffer's staleness-weighted FedAvg: per coordinate over its voters,
    ``sum_i n_i q_i d_ij / (2^16 sum_i n_i)`` (``q_i`` = :func:`staleness_q16` of the delta's factor).

    A stale delta's factor scales its step, not the normalisation (as FedBuff's ``1/K sum f(s_i) d_i``), so a
    buffer of stale deltas moves the model less. Integer sums: exact, independent of order. With every factor 1
    it is :func:`fedavg`.
    """
    values, masks, weights, q16 = (np.asarray(values), np.asarray(masks), np.asarray(weights),
                                   np.asarray(q16))
    _check(values, masks, weights)
    if values.dtype.kind not in "iu":
        raise AggregationError(f"integer values expected, got {values.dtype}")
    if q16.shape != weights.shape or q16.dtype.kind not in "iu" or (q16 <= 0).any() or (q16 > Q16).any():
        raise AggregationError(f"q16 must be ({weights.shape[0]},) integers in [1, {Q16}], got {q16!r}")
    num, _ = weighted_sums(values, masks, weights.astype(np.int64) * q16.astype(np.int64))
    _, den = weighted_sums(values, masks, weights)
    mean = mean_from_sums(num, den * Q16)
    return mean


def buffered_aggregate(kind: str, values: np.ndarray, masks: np.ndarray, weights: np.ndarray, q16: np.ndarray, *,
                       clip: float = 0.0, beta: float = 0.0) -> Mean:
    """A buffer through any aggregator: ``fedavg`` is :func:`buffered_fedavg`; the robust ones run over the
    staleness-scaled deltas ``d_i * q_i / 2^16`` (float64), so a stale delta also moves a median less."""
    if kind == "fedavg":
        return buffered_fedavg(values, masks, weights, q16)
    scaled = np.asarray(values, np.float64) * (np.asarray(q16, np.float64) / Q16)[:, None]
    return aggregate(kind, scaled, masks, weights, clip=clip, beta=beta)


AGGREGATORS = ("fedavg", "clipped", "median", "trimmed")


def aggregate(kind: str, values: np.ndarray, masks: np.ndarray, weights: np.ndarray, *, clip: float = 0.0,
              beta: float = 0.0) -> Mean:
    """Dispatch by name (``fedavg`` | ``clipped`` | ``median`` | ``trimmed``); the coordinator calls only this."""
    if kind == "fedavg":
        return fedavg(values, masks, weights)
    if kind == "clipped":
        return clipped_mean(values, masks, weights, clip)
    if kind == "median":
        return coordinate_median(values, masks)
    if kind == "trimmed":
        return trimmed_mean(values, masks, beta)
    raise AggregationError(f"unknown aggregator {kind!r} (expected one of {', '.join(AGGREGATORS)})")
