"""A device's private samples checked against the training plan before it trains on them.

:func:`prepare` takes what a user hands the agent (``x``, ``y`` arrays) and returns the plan's input form (int8
quantized with the plan's input scale, or int32 token ids) with int32 labels, or raises :class:`SampleError`
saying what the plan expects and what arrived: labels that are not integers or not class indices of the plan,
inputs of another shape, NaN/Inf, token ids outside the embedding table, no samples at all. :func:`check_batch`
is the cheap per-batch form the protocol runs before every training round. It never repairs data: nothing is
dropped, rounded or clamped silently (only float inputs are quantized, which saturates at the int8 range as
every int8 input does; :func:`prepare` reports how many values saturated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_agent.engine import ir


class SampleError(ValueError):
    """Samples that do not fit the plan; the message names what was expected and what arrived."""


@dataclass(frozen=True)
class InputSpec:
    """What the plan trains on: ``x`` (N, *shape) of ``dtype``, labels in ``[0, classes)``."""

    shape: tuple[int, ...]
    dtype: ir.DType  # INT8 (quantized features) or INT32 (token ids)
    classes: int
    vocab: int | None  # token ids: rows of the embedding table reading the input; None otherwise
    scale: float  # INT8 input: real value = scale * (q - zero_point)
    zero_point: int


def input_spec(plan: ir.Plan) -> InputSpec:
    """What ``plan`` trains on."""
    inp = plan.tensors[plan.input_id]
    vocab = None
    for op in plan.ops:
        if op.type == ir.OpType.EMBEDDING and op.inputs[0] == plan.input_id:
            vocab = plan.tensors[op.inputs[1]].shape[0]
    return InputSpec(tuple(inp.shape), inp.dtype, plan.tensors[plan.logits_id].shape[0], vocab,
                     float(np.ravel(inp.scale)[0]), int(inp.zero_point))


def prepare(plan: ir.Plan, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(x, y, saturated)``: samples in the plan's input form and int32 labels, checked; ``saturated`` counts
    float input values quantized beyond the int8 range. Raises :class:`SampleError`."""
    spec = input_spec(plan)
    x, y = np.asarray(x), np.asarray(y)
    _check_labels(spec, y, len(x) if x.ndim else 0)
    want = f"(N, {', '.join(map(str, spec.shape))})"
    if x.ndim == 0 or x.shape[1:] != spec.shape:
        raise SampleError(f"x must be {want} for this plan's input, got shape {x.shape}")
    if x.shape[0] == 0:
        raise SampleError(f"no samples: x is {x.shape}, at least one sample is needed to train")
    if x.dtype.kind not in "iuf":
        raise SampleError(f"x must hold numbers (int8, or floats to quantize), got dtype {x.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        raise SampleError(f"x holds NaN or Inf in {bad.size} of {len(x)} samples (first: sample {int(bad[0])})")
    saturated = 0
    if spec.dtype == ir.DType.INT32:
        x = _token_ids(spec, x)
    elif x.dtype != np.int8:  # quantize with the plan's input parameters
        q = np.round(x.astype(np.float64) / spec.scale) + spec.zero_point
        saturated = int(np.count_nonzero((q < -128) | (q > 127)))
        x = np.clip(q, -128, 127).astype(np.int8)
    return x, y.reshape(-1).astype(np.int32), saturated


def check_batch(spec: InputSpec, x: np.ndarray, y: np.ndarray) -> None:
    """What a training step needs of one batch (already quantized: integers, as the engine takes them).
    Raises :class:`SampleError`."""
    if x.ndim != len(spec.shape) + 1 or x.shape[1:] != spec.shape or len(x) == 0 or x.dtype.kind not in "iu":
        raise SampleError(f"x must be quantized integers (N >= 1, {', '.join(map(str, spec.shape))}), got {x.shape} "
                          f"{x.dtype}")
    _check_labels(spec, y, len(x))
    if spec.dtype == ir.DType.INT32:
        _token_ids(spec, x)
    elif x.dtype != np.int8 and x.size and (int(x.min()) < -128 or int(x.max()) > 127):
        raise SampleError(f"x must fit int8 for this plan's input, got range [{int(x.min())}, {int(x.max())}]")


def _check_labels(spec: InputSpec, y: np.ndarray, n: int) -> None:
    if y.dtype.kind not in "iu":
        raise SampleError(f"labels y must be integer class indices in [0, {spec.classes}), got dtype {y.dtype}")
    if y.shape not in ((n,), (n, 1)):
        raise SampleError(f"labels y must be ({n},): one per sample, got shape {y.shape}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= spec.classes):
        bad = int(np.count_nonzero((y < 0) | (y >= spec.classes)))
        raise SampleError(f"labels y must be class indices in [0, {spec.classes}), got range "
                          f"[{int(y.min())}, {int(y.max())}] ({bad} of {y.size} outside)")


def _token_ids(spec: InputSpec, x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "iu":
        raise SampleError(f"x must be integer token ids for this plan (int32 input), got dtype {x.dtype}")
    top = spec.vocab if spec.vocab is not None else 2**31
    if x.size and (int(x.min()) < 0 or int(x.max()) >= top):
        raise SampleError(f"token ids must be in [0, {top}), got range [{int(x.min())}, {int(x.max())}]")
    return x.astype(np.int32)
