"""Forward int8 kernels (CONV2D, ADD, AVGPOOL, RESHAPE, EMBEDDING, CLAMP, SAVE_CHANNELS, PWDW; PATCH in patch.py)
and run_forward.

Every kernel takes batch-first int8 arrays (N, C, H, W) and returns int8 outputs (plus a bool mask where the op
has one), following docs/engine.md to the bit. It refuses training ops: those live in backward.py / update.py.
"""

from __future__ import annotations

import numpy as np

from . import ir
from .conv import ConvGeom, conv_acc
from .qmath import INT8_MAX, INT8_MIN, requantize

Store = dict[int, np.ndarray]


def _chan(a) -> np.ndarray:
    """Per-channel attribute (C,) as an int64 array broadcastable over (N, C, H, W)."""
    return np.asarray(a, dtype=np.int64).reshape(1, -1, 1, 1)


def _clamp_mask(pre: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """``clamp(pre, lo, hi)`` as int8 and the mask ``lo <= pre <= hi``."""
    if not INT8_MIN <= lo <= hi <= INT8_MAX:
        raise ValueError(f"activation range must satisfy -128 <= act_min <= act_max <= 127, got [{lo}, {hi}]")
    return np.clip(pre, lo, hi).astype(np.int8), (pre >= lo) & (pre <= hi)


def conv2d(x: np.ndarray, zx: int, w: np.ndarray, b: np.ndarray, zy: int, geom: ConvGeom, mult, shift,
           act_min: int, act_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantized conv: ``clamp(requantize(b + sum (x-zx) w, mult, shift) + zy)``.

    Parameters
    ----------
    x : (N, C_in, H, W) int8, zero point ``zx``.
    w : (C_out, C_in/groups, KH, KW) int8; b : (C_out,) int32.
    mult, shift : (C_out,) requantization multipliers and shifts.

    Returns
    -------
    y : (N, C_out, OH, OW) int8 and mask : same shape, bool (``act_min <= pre <= act_max``).
    """
    acc = conv_acc(x.astype(np.int64) - zx, w, geom) + _chan(b)
    pre = requantize(acc, _chan(mult), _chan(shift)) + zy
    return _clamp_mask(pre, act_min, act_max)


def add(a: np.ndarray, za: int, b: np.ndarray, zb: int, zy: int, mult_a: int, mult_b: int, shift: int,
        act_min: int, act_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantized add of two same-shape int8 tensors; returns (y int8, mask bool)."""
    if a.shape != b.shape:
        raise ValueError(f"ADD expects two tensors of one shape, got {a.shape} and {b.shape}")
    acc = (a.astype(np.int64) - za) * mult_a + (b.astype(np.int64) - zb) * mult_b
    pre = ((acc + (np.int64(1) << np.int64(shift - 1))) >> np.int64(shift)) + zy
    return _clamp_mask(pre, act_min, act_max)


def avgpool(x: np.ndarray, zx: int, zy: int, mult: int, shift: int) -> np.ndarray:
    """Global average pool: (N, C, H, W) int8 -> (N, C, 1, 1) int8."""
    acc = (x.astype(np.int64) - zx).sum(axis=(2, 3), keepdims=True)
    return np.clip(requantize(acc, mult, shift) + zy, INT8_MIN, INT8_MAX).astype(np.int8)


def embedding(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Table lookup: ids (N, L) int -> (N, D, 1, L) int8 with ``y[n, :, 0, l] = table[ids[n, l]]``."""
    v = table.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= v):
        raise ValueError(f"EMBEDDING ids must be in [0, {v}), got range [{ids.min()}, {ids.max()}]")
    return np.ascontiguousarray(table[ids].transpose(0, 2, 1)[:, :, None, :])


def _const(store: Store, tid: int) -> np.ndarray:
    if tid not in store:
        raise KeyError(f"tensor {tid} has no value: a CONST/TRAINABLE tensor without data, or an op out of order")
    return store[tid]


def forward_op(op: ir.Op, tensors: dict[int, ir.Tensor], store: Store) -> None:
    """Run one forward op on batch-first values in ``store`` (tensor id -> array), writing its outputs there."""
    a, t = op.attrs, op.type
    ins = [_const(store, i) for i in op.inputs]
    zp = [tensors[i].zero_point for i in op.inputs]
    zy = tensors[op.outputs[0]].zero_point
    if t == ir.OpType.CONV2D:
        outs: tuple[np.ndarray, ...] = conv2d(ins[0], zp[0], ins[1], ins[2], zy, ConvGeom.from_attrs(a), a["mult"], a["shift"],
                      int(a["act_min"]), int(a["act_max"]))
    elif t == ir.OpType.ADD:
        outs = add(ins[0], zp[0], ins[1], zp[1], zy, int(a["mult_a"]), int(a["mult_b"]), int(a["shift"]),
                   int(a["act_min"]), int(a["act_max"]))
    elif t == ir.OpType.AVGPOOL:
        outs = (avgpool(ins[0], zp[0], zy, int(a["mult"]), int(a["shift"])),)
    elif t == ir.OpType.RESHAPE:
        shape = tensors[op.outputs[0]].shape
        if int(np.prod(shape)) != int(np.prod(ins[0].shape[1:])):
            raise ValueError(f"RESHAPE {op.name}: cannot view {ins[0].shape[1:]} as {shape}")
        outs = (ins[0].reshape(ins[0].shape[0], *shape),)
    elif t == ir.OpType.EMBEDDING:
        outs = (embedding(ins[0], ins[1]),)
    elif t == ir.OpType.CLAMP:
        outs = _clamp_mask(ins[0].astype(np.int64), int(a["act_min"]), int(a["act_max"]))
    elif t == ir.OpType.SAVE_CHANNELS:
        outs = (ins[0][:, :int(a["k"])].copy(),)
    elif t == ir.OpType.PWDW:
        mid, _ = conv2d(ins[0], zp[0], ins[1], ins[2], int(a["mid_zero_point"]), ConvGeom(), a["pw_mult"],
                        a["pw_shift"], int(a["pw_act_min"]), int(a["pw_act_max"]))
        geom = ConvGeom.from_attrs(a, "dw_")
        geom = ConvGeom(geom.stride_h, geom.stride_w, geom.pad_h, geom.pad_w, groups=mid.shape[1])
        outs = conv2d(mid, int(a["mid_zero_point"]), ins[3], ins[4], zy, geom, a["dw_mult"], a["dw_shift"],
                      int(a["dw_act_min"]), int(a["dw_act_max"]))[:1]
    elif t == ir.OpType.PATCH:
        # NOTE: patch.py builds on conv2d/add above, so it imports this module: imported here, not at the top
        from .patch import patch_forward

        outs = (patch_forward(op, tensors, ins[0], ins[1:]),)
    else:
        raise ValueError(f"op {op.name or t.name} is not a forward op (forward_op runs {_FORWARD_NAMES})")
    for tid, val in zip(op.outputs, outs):
        store[tid] = val


_FORWARD_NAMES = ", ".join(t.name for t in ir.OpType if t not in ir.TRAIN_ONLY_OPS)


def check_input(t: ir.Tensor, x: np.ndarray, what: str = "input") -> np.ndarray:
    """Validate a batch-first sample array against tensor ``t``; return it as int8 (or int32 ids)."""
    x = np.asarray(x)
    if x.shape[1:] != tuple(t.shape) or x.ndim != len(t.shape) + 1:
        raise ValueError(f"{what} must be batch-first (N, {', '.join(map(str, t.shape))}), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{what} must be integer (quantized), got dtype {x.dtype}")
    if t.dtype == ir.DType.INT8:
        if x.size and (x.min() < INT8_MIN or x.max() > INT8_MAX):
            raise ValueError(f"{what} values must fit int8, got range [{x.min()}, {x.max()}]")
        return x.astype(np.int8)
    return x.astype(np.int32)


def constants(model: ir.Graph | ir.Plan) -> Store:
    """Values of every CONST / TRAINABLE tensor of a model (views of ``Tensor.data``, not copies)."""
    return {t.id: t.data for t in model.tensors if t.data is not None}


def _output_id(model: ir.Graph | ir.Plan) -> int:
    return model.output_id if isinstance(model, ir.Graph) else model.logits_id


def forward_activations(model: ir.Graph | ir.Plan, x: np.ndarray, params: Store | None = None) -> Store:
    """Every value the forward pass computes (tensor id -> batch-first array), for debugging importers.

    Parameters
    ----------
    model : an ir.Graph, or an ir.Plan (its train-only ops are skipped).
    x : (N, *input shape) int8 activations or int32 token ids.
    params : optional overrides of CONST/TRAINABLE values by tensor id (e.g. a trainer's current weights).

    Returns
    -------
    dict tensor id -> array (inputs, activations, masks; constants excluded).
    """
    tensors = {t.id: t for t in model.tensors}
    store = constants(model)
    if params:
        store.update(params)
    n_const = set(store)
    store[model.input_id] = check_input(tensors[model.input_id], x)
    ops = model.ops if isinstance(model, ir.Graph) else model.forward_ops
    for op in ops:
        forward_op(op, tensors, store)
    return {k: v for k, v in store.items() if k not in n_const}


def run_forward(model: ir.Graph | ir.Plan, x: np.ndarray, params: Store | None = None) -> np.ndarray:
    """Logits of a batch: ``x`` (N, *input shape) -> (N, K, 1, 1) int8.

    Parameters
    ----------
    model : an ir.Graph (importers) or an ir.Plan (forward ops only).
    x : (N, C, H, W) int8 (or (N, L) int32 token ids for an embedding model).
    params : optional overrides of CONST/TRAINABLE values by tensor id.
    """
    return forward_activations(model, x, params)[_output_id(model)]
