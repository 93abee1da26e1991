"""Plan and graph transformations for ablations and baselines: no-QAS update factors, a float twin of an int8
graph, and a frozen-prefix split that lets benchmarks cache features.

None of these produce a plan for a device: they exist so benchmarks compare like with like (the same weights,
the same scheme, one change at a time). They refuse graphs they cannot transform exactly (a split point that a
later op bypasses, an op with no float counterpart) with a ValueError naming the op.

QAS versus no QAS (docs/engine.md, "Update"). A conv's int8 weight ``w`` has real value ``W = s_w w`` and its
int32 bias ``b`` real value ``B = s_x s_w b``. The engine's sums are ``accw = sum g_y (x - zx)`` and
``accb = sum g_y`` with the output gradient real-valued at scale ``2**e_y``, so ``dL/dW = 2**e_y s_x accw`` and
``dL/dB = 2**e_y accb``. The update op applies ``delta = lr * 2**e_y * acc * qas``:

- with QAS (fp32-equivalent SGD on the real values): ``dw = lr dL/dW / s_w`` -> ``qas_w = s_x / s_w``;
  ``db = lr dL/dB / (s_x s_w)`` -> ``qas_b = 1 / (s_x s_w)``;
- without QAS (plain SGD on the integer parameters, the paper's "int8 SGD" baseline): ``dw = lr dL/dw`` with
  ``dL/dw = s_w dL/dW`` -> ``qas_w = s_x s_w``; ``db = lr dL/db`` with ``dL/db = s_x s_w dL/dB`` ->
  ``qas_b = s_x s_w``.

So no-QAS scales weight steps by ``s_w**2`` and bias steps by ``(s_x s_w)**2`` relative to QAS: different per
layer and per channel, which one learning rate cannot undo (the paper's argument). An embedding table (real
``s_t q``) likewise goes from ``1 / s_t`` to ``s_t``.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from device_agent.engine import attrs as A
from device_agent.engine import ir
from device_agent.engine.qmath import mant_exp
from fleet.compiler.graph_builder import backbone_convs

# ---------------------------------------------------------------------------------------------- QAS ablation


def noqas_factors(s_x: float, s_w: np.ndarray) -> dict[str, np.ndarray]:
    """CONV2D_UPDATE factors without QAS: ``qas_w[c] = qas_b[c] = s_x * s_w[c]`` as (mantissa, exponent) int32.

    >>> f = noqas_factors(0.5, np.array([0.25], np.float32))
    >>> int(f["qas_w_m"][0]) * 2.0 ** int(f["qas_w_e"][0])
    0.125
    """
    sx = float(A.f32(s_x)[0])
    pairs = [mant_exp(sx * float(s)) for s in A.f32(s_w)]
    m = np.asarray([p[0] for p in pairs], np.int32)
    e = np.asarray([p[1] for p in pairs], np.int32)
    return {"qas_w_m": m, "qas_w_e": e, "qas_b_m": m.copy(), "qas_b_e": e.copy()}


def _conv_input_scale(plan: ir.Plan, w_id: int) -> float:
    """Input scale of the forward conv reading weight ``w_id`` (the ``s_x`` of its update)."""
    for op in plan.ops:
        if op.type == ir.OpType.CONV2D and op.inputs[1] == w_id:
            return float(plan.tensors[op.inputs[0]].scale[0])
        if op.type == ir.OpType.PWDW and w_id in op.inputs[1:]:
            raise ValueError(f"weight {plan.tensors[w_id].name} belongs to fused op {op.name}, which never trains")
    raise ValueError(f"no forward CONV2D reads weight tensor {w_id} ({plan.tensors[w_id].name})")


def without_qas(plan: ir.Plan) -> ir.Plan:
    """A copy of ``plan`` whose update ops take the gradient of the integer parameters (no QAS).

    Every CONV2D_UPDATE gets :func:`noqas_factors` of its conv's input scale and weight scales; every
    EMBEDDING_UPDATE gets ``s_table`` instead of ``1 / s_table``. All other ops, tensors and ids are unchanged,
    so runs with and without QAS differ in these factors only. The name gains ``+noqas``.
    """
    out = copy.deepcopy(plan)
    for op in out.ops:
        if op.type == ir.OpType.CONV2D_UPDATE:
            w_id = op.inputs[2]
            op.attrs.update(noqas_factors(_conv_input_scale(out, w_id), out.tensors[w_id].scale))
        elif op.type == ir.OpType.EMBEDDING_UPDATE:
            m, e = mant_exp(float(out.tensors[op.inputs[2]].scale[0]))
            op.attrs.update(qas_m=m, qas_e=e)
        op.check()
    out.name = f"{plan.name}+noqas"
    return out


def engine_ready(plan: ir.Plan) -> ir.Plan:
    """A copy where both parameters of every CONV2D_UPDATE are TRAINABLE, as the engine's Trainer requires.

    NOTE: ``training.build_training_plan`` leaves the weight of a bias-only layer CONST, while
    ``update.update_op`` insists on both tensors being TRAINABLE. Until the two agree, host runs use this copy;
    memory numbers must come from the compiler's own plan (this copy would count frozen weights as trainable).
    """
    out = copy.deepcopy(plan)
    for op in out.ops:
        if op.type == ir.OpType.CONV2D_UPDATE:
            for t in op.inputs[2:]:
                out.tensors[t].kind = ir.Kind.TRAINABLE
    return out


# ---------------------------------------------------------------------------------------- frozen-prefix split


def split_graph(graph: ir.Graph, cut: int) -> tuple[ir.Graph, ir.Graph]:
    """Split a forward graph at activation ``cut`` into ``(prefix, tail)``.

    ``prefix`` computes ``cut`` from the input (its output is ``cut``; it has no classifier, so use it with
    ``engine.forward.forward_activations``); ``tail`` takes ``cut`` as its int8 input and holds every later op.
    The tail's backbone convs are the graph's convs after the cut, so scheme index ``i`` becomes
    ``i - n_prefix_convs`` (see :func:`shift_scheme`). Running prefix then tail gives the graph's logits bit
    for bit.

    Raises
    ------
    ValueError
        ``cut`` is not produced by an op, or a tail op reads a prefix value other than ``cut`` (a skip
        connection across the cut).
    """
    producer = next((i for i, op in enumerate(graph.ops) if cut in op.outputs), None)
    if producer is None:
        raise ValueError(f"tensor {cut} is not produced by any op of graph {graph.name!r}")
    g = copy.deepcopy(graph)
    pre_ops, tail_ops = g.ops[:producer + 1], g.ops[producer + 1:]
    early = {t for op in pre_ops for t in op.outputs} | {g.input_id}
    for op in tail_ops:
        bad = [t for t in op.inputs if t in early and t != cut]
        if bad:
            raise ValueError(f"cannot split at {g.tensors[cut].name!r}: op {op.name!r} reads "
                             f"{g.tensors[bad[0]].name!r} from before the cut (a skip connection)")
    prefix = ir.Graph(copy.deepcopy(g.tensors), pre_ops, g.input_id, cut, f"{graph.name}[:{g.tensors[cut].name}]")
    tensors = g.tensors
    tensors[cut].kind = ir.Kind.INPUT
    tail = ir.Graph(tensors, tail_ops, cut, g.output_id, f"{graph.name}[{g.tensors[cut].name}:]")
    return prefix, tail


def n_convs_before(graph: ir.Graph, cut: int) -> int:
    """Number of backbone convs that run before activation ``cut`` exists (the scheme index shift)."""
    producer = next(i for i, op in enumerate(graph.ops) if cut in op.outputs)
    return sum(1 for i in backbone_convs(graph) if i <= producer)


def shift_scheme(scheme: ir.SparseScheme, shift: int, n_tail: int) -> ir.SparseScheme:
    """The scheme in tail coordinates (conv ``i`` -> ``i - shift``); it must not touch a prefix conv."""
    if any(i < shift for i in scheme.weight_ratio) or scheme.n_bias_update > n_tail:
        raise ValueError(f"scheme {scheme.name!r} updates convs before the cut ({shift} prefix convs)")
    out = copy.deepcopy(scheme)
    out.weight_ratio = {i - shift: r for i, r in scheme.weight_ratio.items()}
    return out


def earliest_trained_conv(graph: ir.Graph, scheme: ir.SparseScheme) -> int:
    """Backbone index of the first conv whose weight or bias trains (len(convs) when only the classifier)."""
    n = len(backbone_convs(graph))
    idx = [i for i, r in scheme.weight_ratio.items() if r] + ([n - scheme.n_bias_update] if scheme.n_bias_update
                                                             else [])
    return min(idx) if idx else n


# ------------------------------------------------------------------------------------------- float twin


def graph_to_torch(graph: ir.Graph, relu_cap: float | str | None = "range"):
    """A float ``torch.nn.Module`` computing ``graph`` with dequantized parameters (the fp32 baselines).

    Weights become ``s_w[c] * w``, biases ``s_x * s_w[c] * b``; activations are not quantized. An op whose int8
    clamp starts at its zero point (``act_min >= z_y``) is a ReLU in the real domain; its upper bound is the
    real value of ``act_max`` when ``act_max < 127`` (an explicit ReLU6), else by ``relu_cap``: ``"range"``
    (default) the real value of 127, i.e. the int8 model's own saturation (the MIT models' ReLU6 lives in the
    output range, at 2-6 depending on the layer), a float (e.g. 6.0), or None (plain ReLU). The module takes the real input
    ``s_in * (q - z_in)`` of shape ``(N, C, H, W)`` and returns ``(N, K)`` logits. Parameters are named
    ``w<op index>`` / ``b<op index>`` (see :func:`torch_scheme_params`).
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    t = graph.tensors

    def bounds(op: ir.Op) -> tuple[float | None, float | None]:
        y = t[op.outputs[0]]
        lo, hi = int(op.attrs["act_min"]), int(op.attrs["act_max"])
        if lo < y.zero_point:
            return None, None
        s = float(y.scale[0])
        if hi < 127 or relu_cap == "range":
            return s * (lo - y.zero_point), s * (hi - y.zero_point)
        return s * (lo - y.zero_point), relu_cap

    class FloatGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.params = nn.ParameterDict()
            for i, op in enumerate(graph.ops):
                if op.type == ir.OpType.CONV2D:
                    x, w, b = (t[j] for j in op.inputs)
                    sw = w.scale.astype(np.float64)
                    wf = w.data.astype(np.float64) * sw.reshape(-1, 1, 1, 1)
                    bf = b.data.astype(np.float64) * float(x.scale[0]) * sw
                    self.params[f"w{i}"] = nn.Parameter(torch.tensor(wf, dtype=torch.float32))
                    self.params[f"b{i}"] = nn.Parameter(torch.tensor(bf, dtype=torch.float32))
                elif op.type not in (ir.OpType.ADD, ir.OpType.AVGPOOL, ir.OpType.RESHAPE, ir.OpType.CLAMP):
                    raise ValueError(f"op {op.name!r} ({op.type.name}) has no float twin")

        def forward(self, x):
            env = {graph.input_id: x}
            for i, op in enumerate(graph.ops):
                a = op.attrs
                if op.type == ir.OpType.CONV2D:
                    y = F.conv2d(env[op.inputs[0]], self.params[f"w{i}"], self.params[f"b{i}"],
                                 (int(a["stride_h"]), int(a["stride_w"])), (int(a["pad_h"]), int(a["pad_w"])),
                                 1, int(a["groups"]))
                    y = _clamp(y, *bounds(op))
                elif op.type == ir.OpType.ADD:
                    y = _clamp(env[op.inputs[0]] + env[op.inputs[1]], *bounds(op))
                elif op.type == ir.OpType.AVGPOOL:
                    y = env[op.inputs[0]].mean(dim=(2, 3), keepdim=True)
                elif op.type == ir.OpType.RESHAPE:
                    y = env[op.inputs[0]].reshape(-1, *t[op.outputs[0]].shape)
                else:  # CLAMP
                    y = _clamp(env[op.inputs[0]], *bounds(op))
                env[op.outputs[0]] = y
            return env[graph.output_id].flatten(1)

    def _clamp(y, lo, hi):
        if lo is None and hi is None:
            return y
        return torch.clamp(y, min=lo, max=hi)

    return FloatGraph()


def torch_scheme_params(model, graph: ir.Graph, scheme: ir.SparseScheme) -> tuple[list, dict]:
    """Which parameters of :func:`graph_to_torch`'s module train under ``scheme``, and their gradient masks.

    Returns
    -------
    (list, dict)
        The trainable parameters (everything else gets ``requires_grad = False``) and parameter -> float mask
        for weights trained on the first ``k = ceil(ratio * C_in)`` input channels only (as the int8 plan:
        global input-channel index ``< k``; for a depthwise conv, the first ``k`` output channels).
    """
    import torch

    convs = backbone_convs(graph)
    n = len(convs)
    head = next(i for i, op in enumerate(graph.ops) if graph.output_id in op.outputs)
    for p in model.parameters():
        p.requires_grad_(False)
    train, masks = [], {}

    def use(p) -> None:
        p.requires_grad_(True)
        train.append(p)

    for ci, oi in enumerate(convs):
        r = float(scheme.weight_ratio.get(ci, 0.0))
        if ci >= n - scheme.n_bias_update:
            use(model.params[f"b{oi}"])
        if r:
            w = model.params[f"w{oi}"]
            use(w)
            groups = int(graph.ops[oi].attrs["groups"])
            c_out, cin_g = w.shape[:2]
            k = math.ceil(r * cin_g * groups)
            grp = np.arange(c_out) // (c_out // groups)
            m = (grp[:, None] * cin_g + np.arange(cin_g)[None, :]) < k
            if not m.all():
                masks[w] = torch.tensor(m[:, :, None, None], dtype=w.dtype)
    if scheme.classifier_weight:
        use(model.params[f"w{head}"])
    if scheme.classifier_bias:
        use(model.params[f"b{head}"])
    return train, masks


__all__ = [
    "earliest_trained_conv",
    "engine_ready",
    "graph_to_torch",
    "n_convs_before",
    "noqas_factors",
    "shift_scheme",
    "split_graph",
    "torch_scheme_params",
    "without_qas",
]
