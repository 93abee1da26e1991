"""Tracing side of the PyTorch importer: fx node classification, float calibration ranges, BatchNorm folding.

Pure torch, no IR: it says what each traced node is (or raises :class:`UnsupportedLayerError` naming the layer
and the op), records per-tensor float ranges over a calibration batch, and folds BatchNorm in float64.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["Stat", "UnsupportedLayerError", "calibrate", "fold_batchnorm", "node_kind", "trace", "where"]


class UnsupportedLayerError(ValueError):
    """A layer the importer cannot express in the int8 IR; ``layer`` is the fx node / module path, ``op`` the op."""

    def __init__(self, layer: str, op: str, why: str = ""):
        self.layer, self.op = layer, op
        super().__init__(f"unsupported layer {layer!r} ({op})" + (f": {why}" if why else ""))


_CONV = (nn.Conv1d, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_IDENTITY_MODULES = (nn.Dropout, nn.Identity)
_FUNCS = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardtanh: "hardtanh", operator.add: "add",
    torch.add: "add", torch.flatten: "reshape", torch.reshape: "reshape", torch.mean: "mean",
    F.adaptive_avg_pool1d: "pool", F.adaptive_avg_pool2d: "pool", torch.transpose: "transpose",
    torch.permute: "transpose", F.dropout: "identity",
}
_METHODS = {"relu": "relu", "add": "add", "view": "reshape", "reshape": "reshape", "flatten": "reshape",
            "squeeze": "reshape", "unsqueeze": "reshape", "mean": "mean", "transpose": "transpose",
            "permute": "transpose", "contiguous": "identity"}


def where(gm: fx.GraphModule, n: fx.Node) -> tuple[str, str]:
    """(layer path or node name, op name) for error messages."""
    if n.op == "call_module":
        return str(n.target), type(gm.get_submodule(str(n.target))).__name__
    if n.op == "call_method":
        return n.name, f"Tensor.{n.target}"
    return n.name, getattr(n.target, "__name__", str(n.target))


def node_kind(gm: fx.GraphModule, n: fx.Node) -> str:
    """Classify a node: conv, linear, bn, relu, relu6, add, pool, mean, reshape, transpose, embedding, identity."""
    kind = None
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        for types, k in ((_CONV, "conv"), (nn.Linear, "linear"), (_BN, "bn"), (nn.ReLU, "relu"),
                         (nn.ReLU6, "relu6"), (nn.Embedding, "embedding"), (_IDENTITY_MODULES, "identity"),
                         ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d), "pool"), (nn.Flatten, "reshape")):
            if isinstance(m, types):
                kind = k
                break
        if isinstance(m, nn.Hardtanh) and kind is None and (m.min_val, m.max_val) == (0.0, 6.0):
            kind = "relu6"
    elif n.op == "call_function":
        kind = _FUNCS.get(n.target)
        if kind == "hardtanh":
            lo = n.kwargs.get("min_val", n.args[1] if len(n.args) > 1 else -1.0)
            hi = n.kwargs.get("max_val", n.args[2] if len(n.args) > 2 else 1.0)
            kind = "relu6" if (lo, hi) == (0.0, 6.0) else None
    elif n.op == "call_method":
        kind = _METHODS.get(str(n.target))
    if kind is None:
        raise UnsupportedLayerError(*where(gm, n), "no int8 op for it in the IR")
    return kind


@dataclass
class Stat:
    """Per-sample shape (batch dropped) and float range of one traced tensor over the calibration data."""

    shape: tuple[int, ...]  # without batch
    lo: float
    hi: float
    dtype_is_float: bool = True


class _Recorder(fx.Interpreter):
    """Runs the traced model in float and records every tensor's shape and range (the calibration pass)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.stats: dict[str, Stat] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            lo, hi = (float(out.min()), float(out.max())) if out.numel() else (0.0, 0.0)
            old = self.stats.get(n.name)
            if old is not None:
                lo, hi = min(lo, old.lo), max(hi, old.hi)
            self.stats[n.name] = Stat(tuple(out.shape[1:]), lo, hi, out.is_floating_point())
        return out


def calibrate(gm: fx.GraphModule, data: torch.Tensor, chunk: int = 256) -> dict[str, Stat]:
    """Float ranges of every tensor-valued node over a calibration batch (batch-first), in chunks."""
    rec = _Recorder(gm)
    with torch.no_grad():
        for i in range(0, data.shape[0], chunk):
            rec.run(data[i:i + chunk])
    return rec.stats


def fold_batchnorm(w: torch.Tensor, b: torch.Tensor | None, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding conv/linear: returns float64 ``(w', b')``."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    with torch.no_grad():
        return _fold(w.detach(), None if b is None else b.detach(), bn)


def _fold(w: torch.Tensor, b: torch.Tensor | None, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
    k = gamma * inv
    b0 = b.double() if b is not None else torch.zeros_like(inv)
    return w.double() * k.view(-1, *([1] * (w.dim() - 1))), (b0 - bn.running_mean.double()) * k + beta


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (in eval mode); a tracing failure names the model and torch's reason."""
    model.eval()
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...) for dynamic control flow
        raise UnsupportedLayerError(type(model).__name__, "torch.fx.symbolic_trace", str(e)) from e
