"""Training-graph builder: a forward ``ir.Graph`` plus an ``ir.SparseScheme`` -> an ordered ``ir.Plan``.

It does autodiff for the scheme only (backward stops at the earliest updated layer), prunes dead ops, orders
each ``CONV2D_UPDATE`` right after its gradient exists (after ``CONV2D_BWD_INPUT``, which uses the old weights),
masks in place where the gradient has no other reader, fuses frozen expansion + depthwise pairs into
``PWDW`` and (opt-in) runs the frozen first stage tile by tile (``PATCH``, :mod:`.patching`). It refuses to plan memory (:mod:`.planner`) or to execute anything.
"""

from __future__ import annotations

import copy
import math

from device_agent.engine import attrs as A
from device_agent.engine import ir
from device_agent.engine.recipe import Recipe, with_recipe

from .graph_builder import backbone_convs
from .patching import patch_first_stage
from .quantize import classifier_op

RATIOS = (0.125, 0.25, 0.5, 1.0)
_MASKED = (ir.OpType.CONV2D, ir.OpType.ADD, ir.OpType.CLAMP)


class SchemeError(ValueError):
    """The scheme does not fit the graph (index out of range, ratio not allowed, nothing to train)."""


def update_specs(graph: ir.Graph, scheme: ir.SparseScheme) -> dict[int, tuple[int, bool]]:
    """Which convs train: graph op index -> ``(k, update_bias)`` with ``k`` = input channels whose weights train.

    Parameters
    ----------
    graph : ir.Graph
        Importer graph (before fusion); conv ``i`` of the scheme is ``backbone_convs(graph)[i]``.
    scheme : ir.SparseScheme
        ``k = ceil(ratio * C_in)``; the classifier takes all input channels when ``classifier_weight``.

    Returns
    -------
    dict
        Only ops that update something; ``k == 0`` means bias only.
    """
    convs = backbone_convs(graph)
    n = len(convs)
    if not 0 <= scheme.n_bias_update <= n:
        raise SchemeError(f"scheme {scheme.name!r}: n_bias_update must be in [0, {n}], got {scheme.n_bias_update}")
    specs: dict[int, tuple[int, bool]] = {}
    for ci, oi in enumerate(convs):
        r = float(scheme.weight_ratio.get(ci, 0.0))
        if r and not any(math.isclose(r, q) for q in RATIOS):
            raise SchemeError(f"scheme {scheme.name!r}: conv {ci} ratio {r} not in {RATIOS} (or 0)")
        c_in = graph.tensors[graph.ops[oi].inputs[0]].shape[0]
        k = math.ceil(r * c_in) if r else 0
        bias = ci >= n - scheme.n_bias_update
        if k or bias:
            specs[oi] = (k, bias)
    bad = sorted(i for i in scheme.weight_ratio if not 0 <= i < n)
    if bad:
        raise SchemeError(f"scheme {scheme.name!r}: conv indices {bad} out of range [0, {n - 1}] ({n} backbone convs)")
    head = classifier_op(graph)
    c_in = graph.tensors[graph.ops[head].inputs[0]].shape[0]
    if scheme.classifier_weight or scheme.classifier_bias:
        specs[head] = (c_in if scheme.classifier_weight else 0, scheme.classifier_bias)
    if not specs:
        raise SchemeError(f"scheme {scheme.name!r} trains nothing: set classifier_weight/bias or n_bias_update > 0")
    return specs


def _requires_grad(ops: list[ir.Op], specs: dict[int, tuple[int, bool]]) -> set[int]:
    """Activation tensor ids whose value depends on a trained parameter (they need an error gradient)."""
    req: set[int] = set()
    for i, op in enumerate(ops):
        if i in specs or any(t in req for t in op.inputs):
            req.update(op.outputs[:1])
    return req


def _fusable(g: ir.Graph, pw: ir.Op, dw: ir.Op) -> bool:
    if not pw.type == dw.type == ir.OpType.CONV2D:
        return False
    w_pw, w_dw = g.tensors[pw.inputs[1]], g.tensors[dw.inputs[1]]
    c_mid = w_pw.shape[0]
    return (w_pw.shape[2:] == (1, 1) and int(pw.attrs["groups"]) == 1
            and int(pw.attrs["stride_h"]) == int(pw.attrs["stride_w"]) == 1 and int(pw.attrs["pad_h"]) == 0
            and int(pw.attrs["pad_w"]) == 0 and dw.inputs[0] == pw.outputs[0]
            and int(dw.attrs["groups"]) == c_mid and w_dw.shape[:2] == (c_mid, 1))


def _pwdw(g: ir.Graph, pw: ir.Op, dw: ir.Op) -> ir.Op:
    a, d = pw.attrs, dw.attrs
    mid = g.tensors[pw.outputs[0]]
    op = ir.Op(ir.OpType.PWDW, [pw.inputs[0], pw.inputs[1], pw.inputs[2], dw.inputs[1], dw.inputs[2]],
               [dw.outputs[0]], {
                   "pw_act_min": int(a["act_min"]), "pw_act_max": int(a["act_max"]),
                   "pw_mult": a["mult"], "pw_shift": a["shift"], "mid_zero_point": int(mid.zero_point),
                   "dw_stride_h": int(d["stride_h"]), "dw_stride_w": int(d["stride_w"]),
                   "dw_pad_h": int(d["pad_h"]), "dw_pad_w": int(d["pad_w"]), "dw_act_min": int(d["act_min"]),
                   "dw_act_max": int(d["act_max"]), "dw_mult": d["mult"], "dw_shift": d["shift"]},
               f"{pw.name}+{dw.name}")
    op.check()
    return op


def _fuse_frozen(g: ir.Graph, specs: dict, req: set[int]) -> tuple[list[ir.Op], dict[int, int]]:
    """Replace frozen (pointwise 1x1 -> depthwise) pairs by PWDW; returns new ops and old -> new op index map."""
    readers: dict[int, int] = {}
    for op in g.ops:
        for t in op.inputs:
            readers[t] = readers.get(t, 0) + 1
    out: list[ir.Op] = []
    remap: dict[int, int] = {}
    i = 0
    while i < len(g.ops):
        op = g.ops[i]
        nxt = g.ops[i + 1] if i + 1 < len(g.ops) else None
        if (nxt is not None and i not in specs and i + 1 not in specs and op.inputs[0] not in req
                and readers.get(op.outputs[0], 0) == 1 and _fusable(g, op, nxt)):
            remap[i] = remap[i + 1] = len(out)
            out.append(_pwdw(g, op, nxt))
            i += 2
            continue
        remap[i] = len(out)
        out.append(op)
        i += 1
    return out, remap


class _Emitter:
    """Appends tensors and ops to one plan under construction."""

    def __init__(self, tensors: list[ir.Tensor]):
        self.tensors = tensors
        self.ops: list[ir.Op] = []

    def tensor(self, name: str, shape, dtype: ir.DType, kind: ir.Kind, like: ir.Tensor | None = None) -> int:
        t = ir.Tensor(len(self.tensors), name, tuple(shape), dtype, kind)
        if like is not None:
            t.scale, t.zero_point = like.scale.copy(), like.zero_point
        self.tensors.append(t)
        return t.id

    def grad(self, of: int, tag: str = "grad") -> int:
        t = self.tensors[of]
        return self.tensor(f"{t.name}.{tag}", t.shape, ir.DType.INT8, ir.Kind.GRADIENT)

    def op(self, type_: ir.OpType, ins: list[int], outs: list[int], name: str, **attrs) -> None:
        op = ir.Op(type_, ins, outs, attrs, name)
        op.check()
        self.ops.append(op)


def _geom(op: ir.Op) -> dict[str, int]:
    return {k: int(op.attrs[k]) for k in ("stride_h", "stride_w", "pad_h", "pad_w", "groups")}


def build_training_plan(graph: ir.Graph, scheme: ir.SparseScheme, fuse: bool = True,
                        name: str | None = None, range_ste: bool = False, recipe: Recipe | None = None,
                        patch: bool = False) -> ir.Plan:
    """Compile the training step of ``scheme`` on ``graph`` into an ordered plan (offsets not yet planned).

    Parameters
    ----------
    graph : ir.Graph
        Forward int8 graph from an importer (left untouched; the plan owns a deep copy).
    scheme : ir.SparseScheme
        Backbone conv ``i`` = ``backbone_convs(graph)[i]``; the classifier is separate.
    fuse : bool
        Fuse frozen 1x1 expansion + depthwise pairs into PWDW (one expanded channel at a time).
    name : str, optional
        Plan name; default ``"<graph>/<scheme>"``.
    range_ste : bool
        Opt-in (docs/engine.md, "Diagnosis"): ops whose clamp is only the int8 range (``act_min`` below the
        output zero point: no ReLU - projections, residual adds, the logits) get no saturation mask, so their
        gradient passes the clamp straight through as in the float model. Default False keeps the masks (the
        exact derivative of the int8 forward); a saturated logit or projection then never gets a gradient again.
    recipe : Recipe, optional
        Training recipe the plan carries (docs/engine.md "Training recipe"): the result is a
        ``recipe.RecipePlan`` with the optimizer region laid out (``recipe.layout_optimizer``), which the
        Trainer and the firmware both train with. None or an inactive recipe: a plain plan.
    patch : bool
        Run the frozen high-resolution prefix tile by tile as one PATCH op where that shrinks the arena
        (:mod:`.patching` chooses the stage end and the tile grid).

    Returns
    -------
    ir.Plan
        Forward ops (with masks and SAVE_CHANNELS for the backward path), SOFTMAX_CE, then backward/update ops.
        Weights/biases that train are ``Kind.TRAINABLE``, all other parameters ``Kind.CONST``.
    """
    g = copy.deepcopy(graph)
    specs = update_specs(g, scheme)
    req = _requires_grad(g.ops, specs)
    if fuse:
        ops, remap = _fuse_frozen(g, specs, req)
        specs = {remap[i]: s for i, s in specs.items()}
    else:
        ops = g.ops
    em = _Emitter(g.tensors)
    label = em.tensor("label", (1,), ir.DType.INT32, ir.Kind.LABEL)
    saved: dict[int, int] = {}  # op index -> x_saved tensor id (-1 for bias only)
    masks: dict[int, int] = {}  # activation id -> its mask id
    for i, op in enumerate(ops):
        if i in specs:
            x = op.inputs[0]
            k, _ = specs[i]
            c_in = g.tensors[x].shape[0]
            if k == 0:
                saved[i] = -1
            elif k >= c_in:
                saved[i] = x  # NOTE: ratio 1 keeps the input itself alive; a copy would only cost memory
            else:
                xt = g.tensors[x]
                s = em.tensor(f"{xt.name}.saved{k}", (k, *xt.shape[1:]), ir.DType.INT8, ir.Kind.ACTIVATION, like=xt)
                em.op(ir.OpType.SAVE_CHANNELS, [x], [s], f"{op.name}.save", k=k)
                saved[i] = s
        y = op.outputs[0]
        linear = int(op.attrs.get("act_min", 0)) < g.tensors[y].zero_point
        if op.type in _MASKED and y in req and not (range_ste and linear):
            m = em.tensor(f"{g.tensors[y].name}.mask", g.tensors[y].shape, ir.DType.MASK, ir.Kind.MASK)
            op.outputs = [y, m]
            masks[y] = m
        em.ops.append(op)
    logits = g.output_id
    grads: dict[int, int] = {logits: em.grad(logits)}
    em.op(ir.OpType.SOFTMAX_CE, [logits, label], [grads[logits]], "loss",
          exp_lut=A.exp_lut(float(g.tensors[logits].scale[0])))

    def accumulate(x: int, gx: int, where: str) -> None:
        if x not in grads:
            grads[x] = gx
            return
        total = em.grad(x, "gsum")
        em.op(ir.OpType.GRAD_ACCUM, [grads[x], gx], [total], f"{where}.accum")
        grads[x] = total

    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        y = op.outputs[0]
        if y not in grads:
            continue
        gy = grads.pop(y)
        if y in masks:
            gm = em.grad(y, "gmask")
            em.op(ir.OpType.APPLY_MASK, [gy, masks[y]], [gm], f"{op.name}.mask")
            gy = gm
        if op.type == ir.OpType.CONV2D:
            x, w, b = op.inputs
            gx = -1
            if x in req:  # NOTE: input gradient first, with the old weights; then update; then g_y dies
                gx = em.grad(x)
                em.op(ir.OpType.CONV2D_BWD_INPUT, [gy, w], [gx], f"{op.name}.bwd", **_geom(op),
                      **A.wscale(g.tensors[w].scale))
            if i in specs:
                k, ub = specs[i]
                if k:
                    g.tensors[w].kind = ir.Kind.TRAINABLE
                if ub:
                    g.tensors[b].kind = ir.Kind.TRAINABLE
                em.op(ir.OpType.CONV2D_UPDATE, [gy, saved[i], w, b], [], f"{op.name}.update", **_geom(op), k=k,
                      update_weight=int(k > 0), update_bias=int(ub),
                      **A.qas(float(g.tensors[x].scale[0]), g.tensors[w].scale))
            if gx >= 0:
                accumulate(x, gx, op.name)
        elif op.type == ir.OpType.ADD:
            for x in dict.fromkeys(op.inputs):
                if x in req:
                    accumulate(x, gy, op.name)
        elif op.type == ir.OpType.CLAMP:
            if op.inputs[0] in req:
                accumulate(op.inputs[0], gy, op.name)
        elif op.type in (ir.OpType.AVGPOOL, ir.OpType.RESHAPE):
            x = op.inputs[0]
            if x in req:
                gx = em.grad(x)
                if op.type == ir.OpType.AVGPOOL:
                    _, h, w_ = g.tensors[x].shape
                    em.op(ir.OpType.AVGPOOL_BWD, [gy], [gx], f"{op.name}.bwd", inv_hw=A.inv_hw(h, w_))
                else:
                    em.op(ir.OpType.RESHAPE_BWD, [gy], [gx], f"{op.name}.bwd")
                accumulate(x, gx, op.name)
        else:
            raise SchemeError(f"op {op.name!r} ({op.type.name}) lies on the backward path but has no backward rule")
    plan = ir.Plan(em.tensors, em.ops, g.input_id, label, logits, scheme=copy.deepcopy(scheme),
                   name=name or f"{graph.name}/{scheme.name}")
    prune_dead(plan)
    mask_in_place(plan)
    if patch:
        patch_first_stage(plan)
    return with_recipe(compact(plan), recipe)


_SIDE_EFFECTS = frozenset({ir.OpType.CONV2D_UPDATE, ir.OpType.EMBEDDING_UPDATE})


def prune_dead(plan: ir.Plan) -> int:
    """Drop ops none of whose outputs is read (and unread mask outputs); returns how many ops were removed.

    Update ops and the op producing the logits are never dead.
    """
    removed = 0
    while True:
        read = {t for op in plan.ops for t in op.inputs} | {plan.logits_id}
        for op in plan.ops:
            if op.type in _MASKED and len(op.outputs) == 2 and op.outputs[1] not in read:
                op.outputs = op.outputs[:1]
        keep = [op for op in plan.ops if op.type in _SIDE_EFFECTS or any(t in read for t in op.outputs)]
        if len(keep) == len(plan.ops):
            return removed
        removed += len(plan.ops) - len(keep)
        plan.ops = keep


def mask_in_place(plan: ir.Plan) -> None:
    """Make APPLY_MASK write over its input gradient (same tensor id) where nothing reads that input later."""
    last: dict[int, int] = {}
    for i, op in enumerate(plan.ops):
        for t in op.inputs:
            last[t] = i
    for i, op in enumerate(plan.ops):
        if op.type != ir.OpType.APPLY_MASK or last.get(op.inputs[0]) != i or op.outputs[0] == op.inputs[0]:
            continue
        old, new = op.outputs[0], op.inputs[0]
        for later in plan.ops[i:]:
            later.inputs = [new if t == old else t for t in later.inputs]
            later.outputs = [new if t == old else t for t in later.outputs]
        for j in range(i + 1, len(plan.ops)):
            for t in plan.ops[j].inputs:
                last[t] = j


def compact(plan: ir.Plan) -> ir.Plan:
    """Drop tensors no op references and renumber ids densely (``Tensor.id`` == list index)."""
    used = {plan.input_id, plan.label_id, plan.logits_id}
    for op in plan.ops:
        used.update(t for t in op.inputs + op.outputs if t >= 0)
    order = [t for t in plan.tensors if t.id in used]
    new = {t.id: i for i, t in enumerate(order)}
    new[-1] = -1
    for i, t in enumerate(order):
        t.id = i
    for op in plan.ops:
        op.inputs = [new[t] for t in op.inputs]
        op.outputs = [new[t] for t in op.outputs]
    plan.tensors = order
    plan.input_id, plan.label_id, plan.logits_id = new[plan.input_id], new[plan.label_id], new[plan.logits_id]
    return plan


def channels_saved(plan: ir.Plan) -> dict[str, int]:
    """SAVE_CHANNELS op name -> k (a helper for tests and reports)."""
    return {op.name: int(op.attrs["k"]) for op in plan.ops if op.type == ir.OpType.SAVE_CHANNELS}


__all__ = [
    "RATIOS",
    "SchemeError",
    "build_training_plan",
    "channels_saved",
    "compact",
    "mask_in_place",
    "prune_dead",
    "update_specs",
]
