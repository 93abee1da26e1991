"""The int8 graph IR shared by compiler, reference engine, plan format and firmware.

A :class:`Plan` is a flat, ordered op list over a tensor table: forward ops, then (for training) the loss and
the backward/update ops the compiler kept for the sparse scheme. Every op attribute is an int32 scalar or an
int32 array, declared once in :data:`OP_ATTRS`, so the plan writer/reader and the C runtime share one layout.
This module holds data only; it refuses to compute (kernels live in ``forward.py`` / ``backward.py`` /
``update.py``, execution in ``trainer.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


class DType(IntEnum):
    INT8 = 1
    INT16 = 2
    INT32 = 3
    MASK = 4  # bit-packed booleans, ceil(numel / 8) bytes, LSB first


DTYPE_NUMPY = {DType.INT8: np.int8, DType.INT16: np.int16, DType.INT32: np.int32, DType.MASK: np.uint8}


class Kind(IntEnum):
    INPUT = 1  # the sample (int8 activations, or int32 token ids for an embedding)
    LABEL = 2  # int32 class index, shape (1,)
    ACTIVATION = 3  # arena: forward activations, saved channel slices
    GRADIENT = 4  # arena: int8 error gradient w.r.t. the *real* value, scale 2**exp (exp set at run time)
    MASK = 5  # arena: 1 where the forward clamp let the value through
    CONST = 6  # flash: frozen weights / biases
    TRAINABLE = 7  # SRAM: updated in place by the plan (int8 weights, int32 biases)


class OpType(IntEnum):
    # forward
    CONV2D = 1  # in [x, w, b] out [y] or [y, mask]; conv1d is H=1, linear is H=W=1 with K=1
    ADD = 2  # in [a, b] out [y] or [y, mask]
    AVGPOOL = 3  # global average pool, in [x (C,H,W)] out [y (C,1,1)]
    RESHAPE = 4  # in [x] out [y], same bytes, new shape
    EMBEDDING = 5  # in [ids (L,) int32, table (V, D) int8] out [y (D,1,L)]
    CLAMP = 6  # in [x] out [y] or [y, mask] (a standalone ReLU/ReLU6)
    SAVE_CHANNELS = 7  # in [x (C,H,W)] out [x_saved (k,H,W)]: the first k channels, kept for a weight update
    PWDW = 8  # in [x, w_pw, b_pw, w_dw, b_dw] out [y]: 1x1 expansion fused with the next depthwise conv,
    #           computed one expanded channel at a time (an HxW buffer, not the whole tensor); same numbers
    #           as CONV2D(pw) then CONV2D(dw). Frozen layers only (nothing saved for backward).
    PATCH = 9  # in [x, (w, b) per conv layer] out [y]: a frozen prefix of convs / fused conv+depthwise / adds run
    #            tile by tile (engine/patch.py); same numbers as the unpatched ops, scratch = one tile's buffers.
    # loss
    SOFTMAX_CE = 16  # in [logits (K,1,1), label] out [g_logits]
    # backward (gradients are int8 with a per-sample power-of-two exponent)
    APPLY_MASK = 17  # in [g, mask] out [g] (in place)
    CONV2D_BWD_INPUT = 18  # in [g_y, w] out [g_x]
    CONV2D_UPDATE = 19  # in [g_y, x_saved, w, b]: per output channel compute dW/db, update, discard
    GRAD_ACCUM = 20  # in [g1, g2] out [g]: sum of two gradient branches (a tensor with two consumers)
    AVGPOOL_BWD = 21  # in [g_y (C,1,1)] out [g_x (C,H,W)]
    RESHAPE_BWD = 22  # in [g_y] out [g_x], same bytes
    EMBEDDING_UPDATE = 23  # in [g_y, ids, table]


# Attribute layout per op type: (name, is_array). Order is the wire order; all values are int32.
OP_ATTRS: dict[OpType, tuple[tuple[str, bool], ...]] = {
    OpType.CONV2D: (
        ("stride_h", False), ("stride_w", False), ("pad_h", False), ("pad_w", False), ("groups", False),
        ("act_min", False), ("act_max", False), ("mult", True), ("shift", True),
    ),
    OpType.ADD: (("mult_a", False), ("mult_b", False), ("shift", False), ("act_min", False), ("act_max", False)),
    OpType.AVGPOOL: (("mult", False), ("shift", False)),
    OpType.RESHAPE: (),
    OpType.EMBEDDING: (),
    OpType.CLAMP: (("act_min", False), ("act_max", False)),
    OpType.SAVE_CHANNELS: (("k", False),),
    OpType.PWDW: (
        ("pw_act_min", False), ("pw_act_max", False), ("pw_mult", True), ("pw_shift", True),
        ("mid_zero_point", False),
        ("dw_stride_h", False), ("dw_stride_w", False), ("dw_pad_h", False), ("dw_pad_w", False),
        ("dw_act_min", False), ("dw_act_max", False), ("dw_mult", True), ("dw_shift", True),
    ),
    OpType.PATCH: (
        ("tiles_h", False), ("tiles_w", False), ("kind", True), ("in_a", True), ("in_b", True), ("stride_h", True),
        ("stride_w", True), ("pad_h", True), ("pad_w", True), ("groups", True), ("act_min", True), ("act_max", True),
        ("zero_point", True), ("add_mult_a", True), ("add_mult_b", True), ("add_shift", True), ("fused", True),
        ("buf_off", True), ("mult", True), ("shift", True),
    ),
    OpType.SOFTMAX_CE: (("exp_lut", True),),  # 256 entries: round(2**20 * exp(-j * s_logits))
    OpType.APPLY_MASK: (),
    OpType.CONV2D_BWD_INPUT: (
        ("stride_h", False), ("stride_w", False), ("pad_h", False), ("pad_w", False), ("groups", False),
        ("wscale_q", True), ("wscale_p", False),
    ),
    OpType.CONV2D_UPDATE: (
        ("stride_h", False), ("stride_w", False), ("pad_h", False), ("pad_w", False), ("groups", False),
        ("k", False), ("update_weight", False), ("update_bias", False),
        ("qas_w_m", True), ("qas_w_e", True), ("qas_b_m", True), ("qas_b_e", True),
    ),
    OpType.GRAD_ACCUM: (),
    OpType.AVGPOOL_BWD: (("inv_hw", False),),  # round(2**16 / (H*W))
    OpType.RESHAPE_BWD: (),
    OpType.EMBEDDING_UPDATE: (("qas_m", False), ("qas_e", False)),
}

BACKWARD_OPS = frozenset(
    {OpType.SOFTMAX_CE, OpType.APPLY_MASK, OpType.CONV2D_BWD_INPUT, OpType.CONV2D_UPDATE, OpType.GRAD_ACCUM,
     OpType.AVGPOOL_BWD, OpType.RESHAPE_BWD, OpType.EMBEDDING_UPDATE}
)
TRAIN_ONLY_OPS = BACKWARD_OPS | {OpType.SAVE_CHANNELS}


@dataclass
class Tensor:
    """One entry of the tensor table. Activation shapes exclude the batch dimension: (C, H, W)."""

    id: int
    name: str
    shape: tuple[int, ...]
    dtype: DType
    kind: Kind
    scale: np.ndarray = field(default_factory=lambda: np.ones(1, np.float32))  # (1,) or per-channel (C_out,)
    zero_point: int = 0
    data: np.ndarray | None = None  # CONST / TRAINABLE values
    offset: int = -1  # arena byte offset (arena kinds), set by the memory planner
    personal: bool = False  # trained on the device but never uploaded

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))  # NOTE: not np.prod, whose call overhead showed in per-delta decoding

    @property
    def nbytes(self) -> int:
        if self.dtype == DType.MASK:
            return (self.numel + 7) // 8
        return self.numel * np.dtype(DTYPE_NUMPY[self.dtype]).itemsize


@dataclass
class Op:
    type: OpType
    inputs: list[int]
    outputs: list[int]
    attrs: dict[str, int | np.ndarray] = field(default_factory=dict)
    name: str = ""

    def check(self) -> None:
        """Raise ValueError if attrs do not match OP_ATTRS for this type."""
        want = dict(OP_ATTRS[self.type])
        got = set(self.attrs)
        if got != set(want):
            raise ValueError(f"op {self.name or self.type.name}: attrs {sorted(got)} != {sorted(want)}")


@dataclass
class Graph:
    """A forward int8 graph as produced by the importers (no backward ops, no arena offsets)."""

    tensors: list[Tensor]
    ops: list[Op]
    input_id: int
    output_id: int  # logits, (K, 1, 1) int8
    name: str = ""

    def add_tensor(self, **kw) -> Tensor:
        t = Tensor(id=len(self.tensors), **kw)
        self.tensors.append(t)
        return t


@dataclass
class SparseScheme:
    """Which parameters train. Conv indices count every conv of the backbone in forward order
    (0 = first conv); the classifier (last conv/linear) is not counted and always trains."""

    name: str = "custom"
    n_bias_update: int = 0  # biases of the last n backbone convs
    weight_ratio: dict[int, float] = field(default_factory=dict)  # conv index -> ratio in {1/8,1/4,1/2,1}
    classifier_weight: bool = True
    classifier_bias: bool = True


@dataclass
class Plan:
    """A compiled training plan: forward + loss + backward/update ops over one tensor table."""

    tensors: list[Tensor]
    ops: list[Op]
    input_id: int
    label_id: int
    logits_id: int
    arena_bytes: int = 0
    scheme: SparseScheme = field(default_factory=SparseScheme)
    name: str = ""

    @property
    def trainable(self) -> list[Tensor]:
        return [t for t in self.tensors if t.kind == Kind.TRAINABLE]

    @property
    def forward_ops(self) -> list[Op]:
        return [op for op in self.ops if op.type not in TRAIN_ONLY_OPS]
