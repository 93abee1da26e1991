"""Tracing side of the PyTorch importer: fx node classification, float calibration ranges, BatchNorm folding.

Pure torch, no IR: it says what each traced node is (or raises :class:`UnsupportedLayerError` naming the layer
and the op), lists every unsupported layer of a model at once, records per-tensor float ranges over a calibration
batch, and folds BatchNorm in float64. Its registry of supported layers is the source of docs/layers.md.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["Stat", "UnsupportedLayerError", "calibrate", "fold_batchnorm", "layers_markdown", "node_kind", "trace",
           "unsupported_modules", "where"]


class UnsupportedLayerError(ValueError):
    """A layer the importer cannot express in the int8 IR; ``layer`` is the fx node / module path, ``op`` the op."""

    def __init__(self, layer: str, op: str, why: str = "", message: str | None = None):
        self.layer, self.op = layer, op
        super().__init__(message or f"unsupported layer {layer!r} ({op})" + (f": {why}" if why else ""))

    @classmethod
    def many(cls, layers: list[tuple[str, str]]) -> UnsupportedLayerError:
        """One error naming every unsupported layer (module path, type), first one in ``layer``/``op``."""
        names = ", ".join(f"{path!r} ({op})" for path, op in layers)
        word = "layer" if len(layers) == 1 else f"{len(layers)} layers"
        return cls(*layers[0], message=f"unsupported {word}: {names}: no int8 op for them in the IR "
                                       "(docs/layers.md lists the supported layers)")


# NOTE: this registry is what the importer supports; docs/layers.md is generated from it (layers_markdown)
_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv1d, "conv"), (nn.Conv2d, "conv"), (nn.Linear, "linear"), (nn.BatchNorm1d, "bn"),
    (nn.BatchNorm2d, "bn"), (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.Embedding, "embedding"),
    (nn.Dropout, "identity"), (nn.Identity, "identity"), (nn.AdaptiveAvgPool1d, "pool"),
    (nn.AdaptiveAvgPool2d, "pool"), (nn.Flatten, "reshape"),
)
KINDS = {  # kind -> what the importer makes of it
    "conv": "int8 conv (standard, depthwise, grouped, pointwise; conv1d runs as conv2d over H = 1); zero padding "
            "(or 'same' at stride 1, odd kernels), dilation 1; a BatchNorm and a ReLU/ReLU6 right after it are folded",
    "linear": "int8 1x1 conv on a flat (C,) input; a BatchNorm1d and a ReLU/ReLU6 right after it are folded",
    "bn": "folded into the conv/linear right before it (that conv's output must have no other user)",
    "relu": "clamp at the zero point (folded into the conv/linear/add before it when it is the only user)",
    "relu6": "clamp to [0, 6] (Hardtanh(0, 6) too)",
    "add": "int8 residual add of two tensors (alpha 1), with a ReLU/ReLU6 after it folded",
    "pool": "global average pooling to (C, 1, 1) only",
    "mean": "global average pooling when taken over all spatial dims",
    "reshape": "reshape/flatten within a sample (free when the bytes do not move)",
    "transpose": "swap of the last two dims of (N, A, B): the (L, D) -> (D, L) turn after an Embedding",
    "embedding": "int8 table lookup reading the model's integer input (token ids) directly; no max_norm",
    "identity": "nothing (eval mode)",
}
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
        for types, k in _MODULES:
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


def unsupported_modules(gm: fx.GraphModule, stats: dict[str, Stat]) -> list[tuple[str, str]]:
    """Every node the importer has no op for, as (module path or node name, type or function), in model order.

    ``stats`` (from :func:`calibrate`) tells tensors from shape arithmetic (``x.size(0)``: not a layer). Indexing
    an unsupported module's tuple output (``lstm(x)[0]``) is not listed: the module is the one to replace."""
    bad: list[tuple[str, str]] = []
    skip: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        if n.target is operator.getitem and any(a in skip for a in n.all_input_nodes):
            skip.add(n)
            continue
        if n.op != "call_module" and n.name not in stats:
            continue
        try:
            node_kind(gm, n)
        except UnsupportedLayerError:
            bad.append(where(gm, n))
            skip.add(n)
    return bad


def layers_markdown() -> str:
    """The supported-layers table of docs/layers.md, from the registry above (tests keep the file equal)."""
    def name(f) -> str:
        mod = getattr(f, "__module__", "") or ""
        pre = "F." if mod.startswith("torch.nn.functional") else "operator." if mod in ("_operator", "operator") \
            else "torch."
        return pre + getattr(f, "__name__", str(f))

    by_kind: dict[str, list[str]] = {k: [] for k in KINDS}
    for cls, k in _MODULES:
        by_kind[k].append(f"`nn.{cls.__name__}`")
    by_kind["relu6"].append("`nn.Hardtanh(0, 6)`")
    for f, k in _FUNCS.items():
        if k == "hardtanh":
            by_kind["relu6"].append("`F.hardtanh(x, 0, 6)`")
        elif f"`{name(f)}`" not in by_kind[k]:
            by_kind[k].append(f"`{name(f)}`")
    for m, k in _METHODS.items():
        by_kind[k].append(f"`Tensor.{m}`")
    rows = ["| torch | IR | notes |", "|---|---|---|"]
    rows += [f"| {', '.join(by_kind[k])} | {k} | {KINDS[k]} |" for k in KINDS]
    return "\n".join(rows) + "\n"


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


LAYERS_DOC_HEAD = """# Layers `tinyfleet compile` imports from PyTorch

<!-- generated by `python -m fleet.compiler.torch_trace > docs/layers.md` from the importer's registry
(fleet/compiler/torch_trace.py); tests/pure/test_layers_doc.py keeps this file equal to it: do not edit -->

A model is traced with `torch.fx.symbolic_trace` (no data-dependent control flow), must take one input (float
`(N, C, H, W)`, `(N, C, L)`, `(N, F)`, or integer token ids `(N, L)`) and end with a `Linear` (or a 1x1 conv on a
`(C, 1, 1)` map) giving the logits. Weights become int8 per output channel, activations int8 per tensor
(post-training quantization on the calibration batch). Anything not below (e.g. `nn.LSTM`, `nn.MaxPool2d`,
`torch.sigmoid`, attention) is refused before anything is quantized, every such layer named by module path
and type (all of them in one message).

"""


if __name__ == "__main__":
    print(LAYERS_DOC_HEAD + layers_markdown(), end="")
