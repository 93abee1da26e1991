"""Append-only construction of a forward int8 ``ir.Graph`` from already-quantized values, shared by both importers.

The builder only records tensors and ops with attrs laid out as ``ir.OP_ATTRS`` says and checks that shapes
chain; it refuses to quantize (that is :mod:`fleet.compiler.quantize`) or to run anything.
"""

from __future__ import annotations

import numpy as np

from device_agent.engine import ir

from . import quantize as Q


def _scale(s: float | np.ndarray) -> np.ndarray:
    return np.atleast_1d(np.asarray(s, dtype=np.float32)).copy()


class GraphBuilder:
    """Builds one forward graph; every ``add_*`` returns the id of the new output tensor."""

    def __init__(self, name: str = ""):
        self.graph = ir.Graph(tensors=[], ops=[], input_id=-1, output_id=-1, name=name)

    def tensor(self, tid: int) -> ir.Tensor:
        return self.graph.tensors[tid]

    def _act(self, name: str, shape: tuple[int, ...], scale: float, zp: int) -> int:
        t = self.graph.add_tensor(name=name, shape=tuple(int(d) for d in shape), dtype=ir.DType.INT8,
                                  kind=ir.Kind.ACTIVATION, scale=_scale(scale), zero_point=int(zp))
        return t.id

    def _const(self, name: str, data: np.ndarray, dtype: ir.DType, scale: np.ndarray) -> int:
        t = self.graph.add_tensor(name=name, shape=tuple(data.shape), dtype=dtype, kind=ir.Kind.CONST,
                                  scale=_scale(scale), zero_point=0, data=data)
        return t.id

    def _op(self, type_: ir.OpType, inputs: list[int], outputs: list[int], name: str, **attrs) -> None:
        op = ir.Op(type=type_, inputs=inputs, outputs=outputs, attrs=attrs, name=name)
        op.check()
        self.graph.ops.append(op)

    def add_input(self, name: str, shape: tuple[int, ...], scale: float = 1.0, zp: int = 0,
                  dtype: ir.DType = ir.DType.INT8) -> int:
        """The graph input: int8 activations ``(C, H, W)`` or int32 token ids ``(L,)``."""
        t = self.graph.add_tensor(name=name, shape=tuple(shape), dtype=dtype, kind=ir.Kind.INPUT,
                                  scale=_scale(scale), zero_point=int(zp))
        self.graph.input_id = t.id
        return t.id

    def add_conv(self, name: str, x: int, w: np.ndarray, s_w: np.ndarray, b: np.ndarray, s_y: float, z_y: int,
                 stride: tuple[int, int], pad: tuple[int, int], groups: int,
                 act_min: int = Q.ACT_MIN, act_max: int = Q.ACT_MAX) -> int:
        """CONV2D. ``w`` (C_out, C_in/groups, KH, KW) int8 with scales ``s_w`` (C_out,); ``b`` (C_out,) int32."""
        xt = self.tensor(x)
        c_in, h, wd = xt.shape
        c_out, cpg, kh, kw = w.shape
        if c_in != cpg * groups or c_out % groups:
            raise ValueError(f"{name}: weight {w.shape} with groups={groups} does not fit input {xt.shape}")
        ho = (h + 2 * pad[0] - kh) // stride[0] + 1
        wo = (wd + 2 * pad[1] - kw) // stride[1] + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"{name}: kernel {kh}x{kw} larger than padded input {xt.shape}")
        s_x = float(xt.scale[0])
        wid = self._const(f"{name}.weight", np.ascontiguousarray(w, np.int8), ir.DType.INT8, s_w)
        bid = self._const(f"{name}.bias", np.ascontiguousarray(b, np.int32), ir.DType.INT32,
                          (s_x * np.asarray(s_w, np.float64)).astype(np.float32))
        y = self._act(f"{name}.out", (c_out, ho, wo), s_y, z_y)
        mult, shift = Q.conv_multipliers(s_x, s_w, s_y)
        self._op(ir.OpType.CONV2D, [x, wid, bid], [y], name, stride_h=int(stride[0]), stride_w=int(stride[1]),
                 pad_h=int(pad[0]), pad_w=int(pad[1]), groups=int(groups), act_min=int(act_min),
                 act_max=int(act_max), mult=mult, shift=shift)
        return y

    def add_add(self, name: str, a: int, b: int, s_y: float, z_y: int,
                act_min: int = Q.ACT_MIN, act_max: int = Q.ACT_MAX) -> int:
        """ADD of two int8 tensors of equal shape, requantized to ``(s_y, z_y)``."""
        at, bt = self.tensor(a), self.tensor(b)
        if at.shape != bt.shape:
            raise ValueError(f"{name}: cannot add shapes {at.shape} and {bt.shape}")
        ma, mb, sh = Q.add_multipliers(float(at.scale[0]), float(bt.scale[0]), s_y)
        y = self._act(f"{name}.out", at.shape, s_y, z_y)
        self._op(ir.OpType.ADD, [a, b], [y], name, mult_a=ma, mult_b=mb, shift=sh,
                 act_min=int(act_min), act_max=int(act_max))
        return y

    def add_avgpool(self, name: str, x: int, s_y: float, z_y: int) -> int:
        """Global average pool ``(C, H, W) -> (C, 1, 1)``."""
        xt = self.tensor(x)
        c, h, w = xt.shape
        mult, shift = Q.avgpool_multiplier(float(xt.scale[0]), s_y, h * w)
        y = self._act(f"{name}.out", (c, 1, 1), s_y, z_y)
        self._op(ir.OpType.AVGPOOL, [x], [y], name, mult=mult, shift=shift)
        return y

    def add_reshape(self, name: str, x: int, shape: tuple[int, ...]) -> int:
        """Same bytes, new shape (quantization kept)."""
        xt = self.tensor(x)
        if int(np.prod(shape)) != xt.numel:
            raise ValueError(f"{name}: cannot reshape {xt.shape} to {shape}")
        y = self._act(f"{name}.out", shape, float(xt.scale[0]), xt.zero_point)
        self._op(ir.OpType.RESHAPE, [x], [y], name)
        return y

    def add_clamp(self, name: str, x: int, act_min: int, act_max: int) -> int:
        """A standalone ReLU/ReLU6: clamp in the input's int8 domain (quantization kept)."""
        xt = self.tensor(x)
        y = self._act(f"{name}.out", xt.shape, float(xt.scale[0]), xt.zero_point)
        self._op(ir.OpType.CLAMP, [x], [y], name, act_min=int(act_min), act_max=int(act_max))
        return y

    def add_embedding(self, name: str, ids: int, table: np.ndarray, s_table: float) -> int:
        """EMBEDDING: ids ``(L,)`` int32, table ``(V, D)`` int8 (symmetric, zero point 0) -> ``(D, 1, L)``."""
        (length,) = self.tensor(ids).shape
        tid = self._const(f"{name}.weight", np.ascontiguousarray(table, np.int8), ir.DType.INT8, s_table)
        y = self._act(f"{name}.out", (table.shape[1], 1, length), s_table, 0)
        self._op(ir.OpType.EMBEDDING, [ids, tid], [y], name)
        return y

    def finish(self, output: int) -> ir.Graph:
        """Mark ``output`` as the logits and check the graph's contract (a final CONV2D to (K, 1, 1))."""
        self.graph.output_id = output
        t = self.tensor(output)
        if len(t.shape) != 3 or t.shape[1:] != (1, 1):
            raise ValueError(f"graph output {t.name!r} has shape {t.shape}, expected logits (K, 1, 1)")
        Q.classifier_op(self.graph)
        return self.graph


def backbone_convs(graph: ir.Graph) -> list[int]:
    """Op indices of the backbone convs in forward order: scheme conv index ``i`` is ``graph.ops[result[i]]``.

    Every CONV2D counts (index 0 = the first conv) except the classifier producing the logits, as in
    ``../shared/models/schemes.yaml``. Meant for importer graphs (before any PWDW fusion).
    """
    head = Q.classifier_op(graph)
    return [i for i, op in enumerate(graph.ops) if op.type == ir.OpType.CONV2D and i != head]
