"""Patch-based first stage: replace segments of a plan's frozen high-resolution prefix by PATCH ops where that
shrinks the arena.

The prefix is the leading run of frozen CONV2D / PWDW / ADD ops without masks. A segment of it can be one PATCH op
when it has one arena input and nothing after it reads its inside. :func:`choose` cuts the prefix into segments
and ops left alone by dynamic programming: first the smallest arena bound (the most bytes live at any op, a
PATCH op's being its live bytes plus its scratch), then the fewest MACs the halos add; each segment's tile grid
(1x1 to 16x16) keeps its MACs within :data:`MAX_HALO` times the unpatched ones. The layer buffers inside a
PATCH op's scratch are placed by the planner's first fit over their lifetimes within one tile
(:func:`device_agent.engine.patch.lifetimes`). It refuses to patch anything that trains, saves or masks, and it
keeps the plan unpatched unless patching saves at least :data:`MIN_SAVING` of the arena (each tile recomputes its
halo: instructions for bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_agent.engine import ir
from device_agent.engine import patch as P

from .planner import buffers, plan_memory, scratch_bytes

MIN_SAVING = 0.05  # fraction of the unpatched arena's lower bound
MAX_TILES = 16  # per side
MAX_HALO = 1.5  # a segment's MACs, halos recomputed, at most this times its unpatched MACs


@dataclass
class Choice:
    """One patched segment: ops ``[start, end]`` become one PATCH op with ``tiles_h x tiles_w`` tiles."""

    start: int
    end: int
    tiles_h: int
    tiles_w: int
    scratch: int
    macs: int  # of the PATCH op (halos included)
    macs_unpatched: int


def _stage(plan: ir.Plan, start: int, end: int) -> tuple[dict[str, list[int]], list[int], list[int]] | None:
    """Layer columns, constant inputs and per-channel (mult, shift) of ops ``[start, end]``, or None if they
    cannot be one PATCH op (one arena input, frozen CONV2D / PWDW / ADD without masks, only the last output read
    after them)."""
    T = plan.tensors
    if not plan.ops[start].inputs or T[plan.ops[start].inputs[0]].kind not in (ir.Kind.ACTIVATION, ir.Kind.INPUT):
        return None
    ref = {plan.ops[start].inputs[0]: 0}
    cols: dict[str, list[int]] = {k: [] for k in P.LAYER_ATTRS}
    consts: list[int] = []
    mult: list[int] = []
    shift: list[int] = []

    def layer(**kw) -> None:
        row = {"in_b": -1, "stride_h": 1, "stride_w": 1, "pad_h": 0, "pad_w": 0, "groups": 0, "add_mult_a": 0,
               "add_mult_b": 0, "add_shift": 0, "fused": 0, "buf_off": -1, **kw}
        for k in P.LAYER_ATTRS:
            cols[k].append(int(row[k]))

    for op in plan.ops[start:end + 1]:
        a = op.attrs
        if len(op.outputs) != 1 or any(T[t].kind in (ir.Kind.ACTIVATION, ir.Kind.INPUT) and t not in ref
                                       for t in op.inputs):
            return None
        y = op.outputs[0]
        if op.type == ir.OpType.CONV2D:
            x, w, b = op.inputs
            if T[w].kind != ir.Kind.CONST or T[b].kind != ir.Kind.CONST:
                return None
            layer(kind=P.KIND_CONV, in_a=ref[x], stride_h=a["stride_h"], stride_w=a["stride_w"], pad_h=a["pad_h"],
                  pad_w=a["pad_w"], groups=a["groups"], act_min=a["act_min"], act_max=a["act_max"],
                  zero_point=T[y].zero_point)
            consts += [w, b]
            mult += list(np.asarray(a["mult"]).reshape(-1))
            shift += list(np.asarray(a["shift"]).reshape(-1))
        elif op.type == ir.OpType.PWDW:
            x, wp, bp, wd, bd = op.inputs
            c_mid = T[wp].shape[0]
            if T[wd].shape[0] != c_mid or any(T[t].kind != ir.Kind.CONST for t in op.inputs[1:]):
                return None
            layer(kind=P.KIND_CONV, in_a=ref[x], groups=1, act_min=a["pw_act_min"], act_max=a["pw_act_max"],
                  zero_point=a["mid_zero_point"], fused=1)
            layer(kind=P.KIND_CONV, in_a=len(cols["kind"]), stride_h=a["dw_stride_h"], stride_w=a["dw_stride_w"],
                  pad_h=a["dw_pad_h"], pad_w=a["dw_pad_w"], groups=c_mid, act_min=a["dw_act_min"],
                  act_max=a["dw_act_max"], zero_point=T[y].zero_point)
            consts += [wp, bp, wd, bd]
            mult += list(np.asarray(a["pw_mult"]).reshape(-1)) + list(np.asarray(a["dw_mult"]).reshape(-1))
            shift += list(np.asarray(a["pw_shift"]).reshape(-1)) + list(np.asarray(a["dw_shift"]).reshape(-1))
        elif op.type == ir.OpType.ADD:
            layer(kind=P.KIND_ADD, in_a=ref[op.inputs[0]], in_b=ref[op.inputs[1]], act_min=a["act_min"],
                  act_max=a["act_max"], zero_point=T[y].zero_point, add_mult_a=a["mult_a"], add_mult_b=a["mult_b"],
                  add_shift=a["shift"])
        else:
            return None
        ref[y] = len(cols["kind"])
    inside = {t for op in plan.ops[start:end] for t in op.outputs}
    outside = plan.ops[:start] + plan.ops[end + 1:]
    if any(t in inside for op in outside for t in op.inputs) or len(cols["kind"]) > P.MAX_LAYERS:
        return None
    _fuse_depthwise(cols)
    return cols, consts, [int(v) for v in mult] + [int(v) for v in shift]


def _fuse_depthwise(cols: dict[str, list[int]]) -> None:
    """Mark a conv fused when its only reader is the depthwise conv right after it (one channel at a time)."""
    n = len(cols["kind"])
    readers = [0] * (n + 1)
    for i in range(n):
        readers[cols["in_a"][i]] += 1
        if cols["kind"][i] == P.KIND_ADD:
            readers[cols["in_b"][i]] += 1
    for i in range(n - 1):
        j = i + 1
        if (cols["kind"][i] == P.KIND_CONV and not cols["fused"][i] and not (i and cols["fused"][i - 1])
                and cols["kind"][j] == P.KIND_CONV and cols["in_a"][j] == i + 1 and readers[i + 1] == 1
                and cols["groups"][j] > 1):
            cols["fused"][i] = 1


def _op(plan: ir.Plan, start: int, end: int, stage, tiles_h: int, tiles_w: int) -> tuple[ir.Op, int, int] | None:
    """The PATCH op for ``stage`` with buffer offsets planned for this tile grid, its scratch bytes and MACs."""
    cols, consts, ms = stage
    n_ch = len(ms) // 2
    attrs: dict[str, int | np.ndarray] = {k: np.asarray(v, np.int32) for k, v in cols.items()}
    attrs.update(tiles_h=tiles_h, tiles_w=tiles_w, mult=np.asarray(ms[:n_ch], np.int32),
                 shift=np.asarray(ms[n_ch:], np.int32))
    y = plan.ops[end].outputs[0]
    name = f"patch[{plan.ops[start].name}..{plan.ops[end].name}]"
    name = name if len(name.encode()) <= 200 else f"patch[ops {start}..{end}]"  # NOTE: plan names <= 255 bytes
    op = ir.Op(ir.OpType.PATCH, [plan.ops[start].inputs[0], *consts], [y], attrs, name)
    op.check()
    layers = P.layers_of(op, plan.tensors)
    _, h, w = layers[-1].shape
    if tiles_h > h or tiles_w > w:
        return None
    sizes, n_macs = P.stats(layers, tiles_h, tiles_w)
    offs, total = plan_memory(sizes, P.lifetimes(layers))
    attrs["buf_off"] = np.asarray([o if s else -1 for o, s in zip(offs, sizes)], np.int32)
    return op, total, n_macs


def _grids(plan: ir.Plan, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tiles_h, tiles_w, scratch, macs) of segment ``[start, end]`` for every grid within :data:`MAX_HALO`, fewest
    tiles first; [] when the ops cannot be one PATCH op."""
    stage = _stage(plan, start, end)
    if stage is None:
        return []
    out = []
    full = None
    for th, tw in GRIDS:
        got = _op(plan, start, end, stage, th, tw)
        if got is None:
            continue
        full = got[2] if full is None else full
        if got[2] > MAX_HALO * full:
            break
        out.append((th, tw, got[1], got[2]))
    return out


GRIDS = sorted({(t, u) for t in range(1, MAX_TILES + 1) for u in (t - 1, t, t + 1) if 1 <= u <= MAX_TILES},
               key=lambda g: (g[0] * g[1], g))


class _Live:
    """Live arena bytes of the unpatched plan: per op (scratch included) and per segment once patched."""

    def __init__(self, plan: ir.Plan):
        groups, self.sizes, self.life = buffers(plan)
        self.owner = {t: k for k, g in enumerate(groups) for t in g}
        self.per_op = [0] * len(plan.ops)
        for s, (a, b) in zip(self.sizes, self.life):
            for i in range(a, b + 1):
                self.per_op[i] += s
        for i, op in enumerate(plan.ops):
            self.per_op[i] += scratch_bytes(op, plan.tensors)
        self.plan = plan

    def segment(self, start: int, end: int) -> int:
        """Bytes live while the PATCH op of ops ``[start, end]`` runs, its scratch excluded: every buffer live
        in that span except the ones the segment makes internal."""
        inside = {self.owner[t] for op in self.plan.ops[start:end] for t in op.outputs if t in self.owner}
        return sum(s for k, (s, (a, b)) in enumerate(zip(self.sizes, self.life))
                   if k not in inside and a <= end and b >= start)


def choose(plan: ir.Plan) -> list[Choice]:
    """Segments of the frozen prefix and their tile grids with the smallest arena bound, then fewest extra MACs.

    The prefix (frozen CONV2D / PWDW / ADD ops, no masks) is cut into ops left alone and segments, by dynamic
    programming: first the smallest bound (the largest of every op's live bytes, a segment's being its live bytes
    plus the smallest scratch of a grid within :data:`MAX_HALO`), then under that bound the fewest MACs that
    halos add. Empty when nothing saves :data:`MIN_SAVING` of the unpatched bound.
    """
    n = 0
    while n < len(plan.ops) and plan.ops[n].type in _STAGE_OPS and len(plan.ops[n].outputs) == 1:
        n += 1
    live = _Live(plan)
    base = max(live.per_op, default=0)
    table = {(s, e): g for s in range(n) for e in range(s + 1, min(n, s + P.MAX_LAYERS))
             if (g := _grids(plan, s, e))}
    need = {k: live.segment(*k) for k in table}
    floor = max(live.per_op[n:], default=0)
    fb = [floor] * (n + 1)
    for i in range(n - 1, -1, -1):
        fb[i] = min([max(live.per_op[i], fb[i + 1])] + [max(need[(i, e)] + min(g[2] for g in table[(i, e)]),
                                                            fb[e + 1]) for e in range(i + 1, n) if (i, e) in table])
    bound = fb[0]
    if bound > base * (1 - MIN_SAVING):
        return []
    inf = (float("inf"), 0)
    gm: list[tuple] = [inf] * n + [(0, 0)]
    pick: list[Choice | None] = [None] * (n + 1)
    for i in range(n - 1, -1, -1):
        if live.per_op[i] <= bound:
            gm[i] = gm[i + 1]
        for e in range(i + 1, n):
            grids = [g for g in table.get((i, e), []) if need[(i, e)] + g[2] <= bound]
            if not grids or gm[e + 1] == inf:
                continue
            g = min(grids, key=lambda g: g[3])
            full = table[(i, e)][0][3]
            cand = (g[3] - full + gm[e + 1][0], gm[e + 1][1] + 1)
            if cand < gm[i]:
                gm[i] = cand
                pick[i] = Choice(i, e, g[0], g[1], g[2], g[3], full)
    out, i = [], 0
    while i < n:
        c = pick[i] if pick[i] is not None and gm[i] != gm[i + 1] or live.per_op[i] > bound else None
        if c is None:
            i += 1
            continue
        out.append(c)
        i = c.end + 1
    return out


_STAGE_OPS = (ir.OpType.CONV2D, ir.OpType.PWDW, ir.OpType.ADD)


def apply(plan: ir.Plan, choices: list[Choice]) -> ir.Plan:
    """Replace each chosen segment by its PATCH op (tensors left for :func:`training.compact` to drop)."""
    ops = list(plan.ops)
    for c in sorted(choices, key=lambda c: -c.start):
        stage = _stage(plan, c.start, c.end)
        got = _op(plan, c.start, c.end, stage, c.tiles_h, c.tiles_w) if stage else None
        if got is None:
            raise ValueError(f"plan {plan.name!r}: ops {c.start}..{c.end} cannot be patched {c.tiles_h}x{c.tiles_w}")
        ops[c.start:c.end + 1] = [got[0]]
    plan.ops = ops
    return plan


def patch_first_stage(plan: ir.Plan) -> list[Choice]:
    """Patch ``plan`` in place when it pays (:func:`choose`); returns the segments patched ([]: none)."""
    c = choose(plan)
    if c:
        apply(plan, c)
    return c
