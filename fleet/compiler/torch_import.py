"""PyTorch importer: trace an ``nn.Module`` with torch.fx, calibrate on real data, emit a forward int8 graph.

Post-training quantization: float ranges per tensor from a calibration batch (min/max, widened to include 0)
give asymmetric int8 activations; weights are symmetric int8 per output channel; BatchNorm is folded into the
conv/linear before it; a ReLU/ReLU6 right after a conv, linear or add becomes that op's clamp. Supported:
Conv1d/Conv2d (standard, depthwise, grouped, pointwise), Linear, BatchNorm1d/2d, ReLU/ReLU6 (modules and
functions), residual add, global average pooling (adaptive pool or mean), flatten/view/reshape, Embedding (+ the
transpose that feeds it to a conv1d), Dropout/Identity (the table: docs/layers.md). Anything else raises
:class:`UnsupportedLayerError` naming every unsupported layer by module path and type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from device_agent.engine import ir

from . import quantize as Q
from .graph_builder import GraphBuilder
from .torch_trace import (
    UnsupportedLayerError,
    calibrate,
    fold_batchnorm,
    node_kind,
    trace,
    unsupported_modules,
    where,
)

__all__ = ["UnsupportedLayerError", "fold_batchnorm", "import_torch"]


@dataclass
class _Val:
    """A lowered torch value: its IR tensor, and whether torch sees it transposed ((L, D) over (D, 1, L) bytes)."""

    tid: int
    transposed: bool = False


def _pair(v, n: int = 2) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


class _Lowering:
    """Walks the fx graph once, in order, emitting IR ops; nodes folded into an earlier op are skipped."""

    def __init__(self, gm: fx.GraphModule, stats: dict, name: str):
        self.gm, self.stats = gm, stats
        self.b = GraphBuilder(name)
        self.env: dict[fx.Node, _Val | None] = {}

    # -- helpers ---------------------------------------------------------------------------------------------
    def _err(self, n: fx.Node, why: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(*where(self.gm, n), why)

    def _ours(self, n: fx.Node, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) == 3:
            return shape
        if len(shape) in (1, 2):
            return (shape[0], 1, shape[1] if len(shape) == 2 else 1)
        raise self._err(n, f"per-sample shape {shape} has no (C, H, W) layout")

    def _arg(self, n: fx.Node, i: int = 0, layout_ok: bool = False) -> _Val:
        a = n.args[i] if i < len(n.args) else None
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        if v is None:
            raise self._err(n, f"argument {i} is not a tensor computed by the model (got {a!r})")
        if v.transposed and not layout_ok:
            raise self._err(n, "input is an embedding output still in (L, D) order: add .transpose(1, 2) first")
        return v

    def _qparams(self, n: fx.Node) -> tuple[float, int]:
        st = self.stats[n.name]
        return Q.activation_qparams(st.lo, st.hi)

    def _fuse(self, n: fx.Node, kinds: tuple[str, ...]) -> tuple[fx.Node, str | None]:
        """The single user of ``n`` if it is one of ``kinds`` (to be folded into ``n``'s op), else ``(n, None)``."""
        if len(n.users) != 1:
            return n, None
        (u,) = n.users
        if u.op not in ("call_module", "call_function", "call_method"):
            return n, None
        try:
            k = node_kind(self.gm, u)
        except UnsupportedLayerError:
            return n, None  # raised when the walk reaches it
        if k in ("relu", "relu6") and u.args[0] is not n:
            return n, None
        return (u, k) if k in kinds else (n, None)

    def _scale(self, v: _Val) -> float:
        return float(self.b.tensor(v.tid).scale[0])

    # -- node handlers ---------------------------------------------------------------------------------------
    def input(self, n: fx.Node) -> None:
        if self.b.graph.input_id >= 0:
            raise self._err(n, "models with more than one input are not supported")
        st = self.stats[n.name]
        if st.dtype_is_float:
            s, z = Q.activation_qparams(st.lo, st.hi)
            tid = self.b.add_input(n.name, self._ours(n, st.shape), s, z)
        elif len(st.shape) == 1:
            tid = self.b.add_input(n.name, st.shape, dtype=ir.DType.INT32)
        else:
            raise self._err(n, f"integer input must be token ids (N, L), got per-sample shape {st.shape}")
        self.env[n] = _Val(tid)

    def conv(self, n: fx.Node) -> None:
        m = self.gm.get_submodule(str(n.target))
        x = self._arg(n)
        if m.padding_mode != "zeros" or any(d != 1 for d in _pair(m.dilation, 1)):
            raise self._err(n, "only zero padding and dilation 1 are supported")
        k = tuple(m.kernel_size)
        if isinstance(m.padding, str):
            if m.padding == "same" and (any(s != 1 for s in m.stride) or any(kk % 2 == 0 for kk in k)):
                raise self._err(n, "padding='same' needs stride 1 and odd kernels")
            pad = tuple((kk - 1) // 2 for kk in k) if m.padding == "same" else (0,) * len(k)
        else:
            pad = _pair(m.padding, len(k))
        w = m.weight.detach()
        stride = _pair(m.stride, len(k))
        if len(k) == 1:  # conv1d runs as a conv2d over H = 1
            w, stride, pad = w[:, :, None, :], (1, stride[0]), (0, pad[0])
        self._emit_conv(n, x, w, m.bias, stride, pad, int(m.groups))

    def linear(self, n: fx.Node) -> None:
        m = self.gm.get_submodule(str(n.target))
        x = self._arg(n)
        if self.b.tensor(x.tid).shape[1:] != (1, 1):
            raise self._err(n, f"Linear needs a flat (C,) input, got {self.stats[n.args[0].name].shape}")
        self._emit_conv(n, x, m.weight.detach()[:, :, None, None], m.bias, (1, 1), (0, 0), 1)

    def _emit_conv(self, n, x: _Val, w: torch.Tensor, bias, stride, pad, groups: int) -> None:
        last, bn = self._fuse(n, ("bn",))
        w64, b64 = w.double(), None if bias is None else bias.detach().double()
        if bn:
            w64, b64 = fold_batchnorm(w64, b64, self.gm.get_submodule(str(last.target)))
        last2, act = self._fuse(last, ("relu", "relu6"))
        s_y, z_y = self._qparams(last2)
        lo, hi = Q.act_range(act, s_y, z_y)
        name = str(n.target)
        wq, s_w = Q.quantize_weight(w64.numpy())
        bq = Q.quantize_bias(None if b64 is None else b64.numpy(), self._scale(x), s_w, f"{name}.bias")
        y = _Val(self.b.add_conv(name, x.tid, wq, s_w, bq, s_y, z_y, stride, pad, groups, lo, hi))
        for node in {n, last, last2}:
            self.env[node] = y

    def bn(self, n: fx.Node) -> None:
        raise self._err(n, "BatchNorm must directly follow a conv/linear whose output has no other user")

    def relu(self, n: fx.Node, kind: str = "relu") -> None:
        x = self._arg(n)
        t = self.b.tensor(x.tid)
        lo, hi = Q.act_range(kind, float(t.scale[0]), t.zero_point)
        name = str(n.target) if n.op == "call_module" else n.name
        self.env[n] = _Val(self.b.add_clamp(name, x.tid, lo, hi))

    def relu6(self, n: fx.Node) -> None:
        self.relu(n, "relu6")

    def add(self, n: fx.Node) -> None:
        if len(n.args) != 2 or n.kwargs.get("alpha", 1) != 1:
            raise self._err(n, "only the sum of two tensors is supported")
        a, b = self._arg(n, 0), self._arg(n, 1)
        last, act = self._fuse(n, ("relu", "relu6"))
        s_y, z_y = self._qparams(last)
        lo, hi = Q.act_range(act, s_y, z_y)
        try:
            y = _Val(self.b.add_add(n.name, a.tid, b.tid, s_y, z_y, lo, hi))
        except ValueError as e:
            raise self._err(n, str(e)) from e
        self.env[n] = self.env[last] = y

    def pool(self, n: fx.Node) -> None:
        x = self._arg(n)
        xs = self.b.tensor(x.tid).shape
        out = self._ours(n, self.stats[n.name].shape)
        if out != (xs[0], 1, 1):
            raise self._err(n, f"only global average pooling to (C, 1, 1) is supported, got {out}")
        if xs[1:] == (1, 1):
            self.env[n] = x
            return
        name = str(n.target) if n.op == "call_module" else n.name
        self.env[n] = _Val(self.b.add_avgpool(name, x.tid, *self._qparams(n)))

    def mean(self, n: fx.Node) -> None:
        nd = len(self.stats[n.args[0].name].shape) + 1
        dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        dims = {d % nd for d in _pair(dims, 1)} if dims is not None else set()
        if dims != set(range(2, nd)):
            raise self._err(n, f"mean over dims {sorted(dims)}: only the spatial dims {list(range(2, nd))}")
        self.pool(n)

    def reshape(self, n: fx.Node) -> None:
        x = self._arg(n)
        shape_in, shape_out = self.stats[n.args[0].name].shape, self.stats[n.name].shape
        if int(np.prod(shape_in)) != int(np.prod(shape_out)):
            raise self._err(n, f"reshape {shape_in} -> {shape_out} mixes samples of the batch")
        ours = self._ours(n, shape_out)
        same = ours == self.b.tensor(x.tid).shape
        self.env[n] = x if same else _Val(self.b.add_reshape(n.name, x.tid, ours))

    def transpose(self, n: fx.Node) -> None:
        x = self._arg(n, layout_ok=True)
        raw = list(n.args[1:]) or [n.kwargs.get(k) for k in ("dim0", "dim1", "dims") if k in n.kwargs]
        if len(raw) == 1 and isinstance(raw[0], (tuple, list)):
            raw = list(raw[0])  # permute((0, 2, 1))
        nd = len(self.stats[n.name].shape) + 1
        dims = tuple(d % nd for d in raw if isinstance(d, int))
        if nd != 3 or dims not in ((1, 2), (2, 1), (0, 2, 1)):
            raise self._err(n, "only swapping the last two dims of an (N, A, B) tensor is supported")
        self.env[n] = _Val(x.tid, not x.transposed)

    def embedding(self, n: fx.Node) -> None:
        m = self.gm.get_submodule(str(n.target))
        ids = self._arg(n)
        if ids.tid != self.b.graph.input_id or self.b.tensor(ids.tid).dtype != ir.DType.INT32:
            raise self._err(n, "an Embedding must read the model's integer input (token ids) directly")
        if m.max_norm is not None:
            raise self._err(n, "max_norm is not supported")
        table = m.weight.detach().double().numpy()
        s = max(float(np.abs(table).max()), 1e-8) / 127
        q = np.clip(np.round(table / s), -127, 127).astype(np.int8)
        self.env[n] = _Val(self.b.add_embedding(str(n.target), ids.tid, q, s), transposed=True)

    def identity(self, n: fx.Node) -> None:
        self.env[n] = self._arg(n, layout_ok=True)

    # -- walk ------------------------------------------------------------------------------------------------
    def run(self) -> ir.Graph:
        for n in self.gm.graph.nodes:
            if n in self.env:
                continue  # folded into an earlier op
            if n.op == "placeholder":
                self.input(n)
            elif n.op == "output":
                out = n.args[0]
                if not isinstance(out, fx.Node):
                    raise self._err(n, "the model must return one tensor (the logits)")
                v = self._arg(n)
                try:
                    return self.b.finish(v.tid)
                except ValueError as e:
                    raise self._err(n, f"{e}; the model must end with a Linear/1x1 conv classifier") from e
            elif n.op == "get_attr":
                raise self._err(n, "tensors used outside a module (parameters/buffers) are not supported")
            elif n.name not in self.stats:
                self.env[n] = None  # shape arithmetic (x.size(0), ...): no tensor, nothing to emit
            else:
                getattr(self, node_kind(self.gm, n))(n)
        raise RuntimeError("fx graph without an output node")


def import_torch(model: torch.nn.Module, calib_data, name: str | None = None) -> ir.Graph:
    """Quantize a float PyTorch model (PTQ) into a forward int8 graph.

    Parameters
    ----------
    model : torch.nn.Module
        Traceable by ``torch.fx.symbolic_trace``; put in eval mode. Ends with a Linear (or 1x1 conv on a
        (C, 1, 1) map) producing the logits.
    calib_data : array-like
        Calibration batch, batch first: float ``(N, C, H, W)`` / ``(N, C, L)`` / ``(N, C)``, or integer token ids
        ``(N, L)``. Its ranges fix every activation's scale and zero point; use real samples.
    name : str, optional
        Graph name; default the model's class name.

    Returns
    -------
    ir.Graph
        Input ``(C, H, W)`` int8 (``(C, 1, L)`` for 1D signals, ``(L,)`` int32 for token ids), logits
        ``(K, 1, 1)`` int8. Op names are module paths (``features.0``) or fx node names (``add_1``).

    Raises
    ------
    UnsupportedLayerError
        Naming the layer (module path or fx node) and the op that has no int8 counterpart.
    """
    gm = trace(model)
    data = torch.as_tensor(np.asarray(calib_data) if not isinstance(calib_data, torch.Tensor) else calib_data)
    if data.is_floating_point():
        data = data.float()
    stats = calibrate(gm, data)
    bad = unsupported_modules(gm, stats)
    if bad:
        raise UnsupportedLayerError.many(bad)
    return _Lowering(gm, stats, name or type(model).__name__).run()
