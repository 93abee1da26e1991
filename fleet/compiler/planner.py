"""Static memory planner: tensor lifetimes over a plan's op order -> one arena with a byte offset per tensor.

Greedy by size, first fit (as TFLite-Micro's greedy planner). Aliases share bytes: RESHAPE / RESHAPE_BWD outputs
are the input's bytes, an in-place APPLY_MASK has the same tensor id in and out. Scratch that kernels need
(stated in :func:`scratch_bytes`) is planned as one-op arena tensors, so what is reported is what is allocated.
It refuses to reorder ops or change the graph; it only assigns offsets.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from device_agent.engine import ir
from device_agent.engine import patch as patch_geom

ALIGN = 4  # bytes; every arena offset is a multiple of this
ARENA_KINDS = frozenset({ir.Kind.INPUT, ir.Kind.LABEL, ir.Kind.ACTIVATION, ir.Kind.GRADIENT, ir.Kind.MASK})
_ALIAS_OPS = frozenset({ir.OpType.RESHAPE, ir.OpType.RESHAPE_BWD})


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


ORDERS = ("size", "first", "area")


def _order(sizes: list[int], lifetimes: list[tuple[int, int]], order: str | Sequence[int]) -> list[int]:
    idx = range(len(sizes))
    if not isinstance(order, str):
        if sorted(order) != list(idx):
            raise ValueError(f"an explicit order must be a permutation of range({len(sizes)})")
        return list(order)
    if order == "size":
        return sorted(idx, key=lambda i: (-sizes[i], lifetimes[i][0], i))
    if order == "first":
        return sorted(idx, key=lambda i: (lifetimes[i][0], -sizes[i], i))
    if order == "area":
        return sorted(idx, key=lambda i: (-sizes[i] * (lifetimes[i][1] - lifetimes[i][0] + 1), i))
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def plan_memory(sizes: list[int], lifetimes: list[tuple[int, int]], align: int = ALIGN,
                order: str | Sequence[int] = "size") -> tuple[list[int], int]:
    """Offsets for buffers so that no two buffers live at the same op share a byte.

    Buffers are placed largest first (``order="size"``; ties: earliest first use, then index); each goes to the
    lowest aligned offset that does not overlap any already-placed buffer whose lifetime intersects its own.
    Lifetimes are inclusive op-index ranges ``(first, last)``: a buffer read by op ``i`` and one written by op
    ``i`` never share. ``order="first"`` (by first use), ``"area"`` (by bytes x ops) or an explicit permutation place in other
    orders; :func:`plan_arena` keeps whichever gives the smallest arena.

    Parameters
    ----------
    sizes : list of int
        Bytes per buffer (0 allowed: offset 0, takes no space).
    lifetimes : list of (int, int)
        ``(first, last)`` op index per buffer, ``first <= last``.
    align : int
        Offset alignment in bytes.

    Returns
    -------
    (list of int, int)
        Offset per buffer and the arena size (the end of the highest buffer).

    Examples
    --------
    Disjoint lifetimes share offset 0; overlapping ones stack, the larger one first; 4-byte alignment:

    >>> plan_memory([100, 100], [(0, 1), (2, 3)])
    ([0, 0], 100)
    >>> plan_memory([60, 100], [(0, 2), (1, 3)])
    ([100, 0], 160)
    >>> plan_memory([5, 5], [(0, 0), (0, 0)])
    ([0, 8], 13)
    """
    if len(sizes) != len(lifetimes):
        raise ValueError(f"{len(sizes)} sizes but {len(lifetimes)} lifetimes")
    for i, (s, (a, b)) in enumerate(zip(sizes, lifetimes)):
        if s < 0 or a > b:
            raise ValueError(f"buffer {i}: size {s} must be >= 0 and lifetime ({a}, {b}) must have first <= last")
    offsets = [0] * len(sizes)
    placed: list[int] = []
    arena = 0
    for i in _order(sizes, lifetimes, order):
        if sizes[i] == 0:
            continue
        a, b = lifetimes[i]
        live = sorted((offsets[j], offsets[j] + sizes[j]) for j in placed
                      if lifetimes[j][0] <= b and a <= lifetimes[j][1])
        off = 0
        for lo, hi in live:
            if off + sizes[i] <= lo:
                break
            off = max(off, _align(hi, align))
        offsets[i] = off
        placed.append(i)
        arena = max(arena, off + sizes[i])
    return offsets, arena


def scratch_bytes(op: ir.Op, tensors: list[ir.Tensor]) -> int:
    """Arena scratch a kernel needs while ``op`` runs (the runtime's execution, stated here once).

    - PWDW: one expanded channel after the 1x1 conv, int8, ``H x W`` of the block input (the depthwise conv reads
      it with implicit zero-point padding, then the buffer is reused for the next channel).
    - CONV2D_UPDATE with weights: one output channel's weight-gradient sums, int32,
      ``min(k, C_in/groups) x KH x KW`` (compute, update, discard; |sum| < 2**31 for int8 x uint8 over <= 2**16
      pixels). Bias only: 0 (one int64 register).
    - SOFTMAX_CE: the ``K`` int32 exponentials ``e_i``.
    - CONV2D_BWD_INPUT and GRAD_ACCUM: 0; the kernel makes two passes (max |acc|, then write), no int32 tensor.
    - CONV2D forward: 0 (direct convolution, no im2col).
    - PATCH: one tile's layer buffers at their ``buf_off`` (``engine.patch.scratch_bytes``: the largest tile).
    """
    if op.type == ir.OpType.PATCH:
        layers = patch_geom.layers_of(op, tensors)
        return patch_geom.scratch_bytes(layers, int(op.attrs["tiles_h"]), int(op.attrs["tiles_w"]))
    if op.type == ir.OpType.PWDW:
        _, h, w = tensors[op.inputs[0]].shape
        return h * w
    if op.type == ir.OpType.CONV2D_UPDATE and int(op.attrs["update_weight"]):
        _, cpg, kh, kw = tensors[op.inputs[2]].shape
        return 4 * min(int(op.attrs["k"]), cpg) * kh * kw
    if op.type == ir.OpType.SOFTMAX_CE:
        return 4 * tensors[op.inputs[0]].numel
    return 0


@dataclass
class Layout:
    """The arena plan of one ir.Plan: buffers (alias groups) with lifetimes, offsets and scratch."""

    groups: list[list[int]]  # tensor ids sharing one buffer (first id = the owner)
    sizes: list[int]
    lifetimes: list[tuple[int, int]]
    offsets: list[int]
    arena_bytes: int
    scratch: dict[int, int] = field(default_factory=dict)  # op index -> scratch tensor id

    def live_bytes(self, num_ops: int) -> list[int]:
        """Bytes live at each op index (a lower bound for the arena; the planner may fragment above it)."""
        live = [0] * num_ops
        for s, (a, b) in zip(self.sizes, self.lifetimes):
            for i in range(a, b + 1):
                live[i] += s
        return live


def _find(parent: dict[int, int], t: int) -> int:
    while parent[t] != t:
        parent[t] = parent[parent[t]]
        t = parent[t]
    return t


def buffers(plan: ir.Plan) -> tuple[list[list[int]], list[int], list[tuple[int, int]]]:
    """Alias groups of arena tensors with their sizes and inclusive lifetimes (op indices).

    INPUT and LABEL are live from op 0 (the runtime writes them before the step). A tensor written and never
    read lives for its producing op only.
    """
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    arena = {t.id for t in plan.tensors if t.kind in ARENA_KINDS}
    for t in (plan.input_id, plan.label_id):
        first[t] = last[t] = 0
    for i, op in enumerate(plan.ops):
        for t in op.inputs + op.outputs:
            if t in arena:
                first.setdefault(t, i)
                last[t] = max(last.get(t, i), i)
    parent = {t: t for t in first}
    for op in plan.ops:
        if op.type in _ALIAS_OPS and op.inputs[0] in parent and op.outputs[0] in parent:
            parent[_find(parent, op.outputs[0])] = _find(parent, op.inputs[0])
    members: dict[int, list[int]] = {}
    for t in sorted(first):
        members.setdefault(_find(parent, t), []).append(t)
    groups = list(members.values())
    sizes = [max(plan.tensors[t].nbytes for t in g) for g in groups]
    lifetimes = [(min(first[t] for t in g), max(last[t] for t in g)) for g in groups]
    return groups, sizes, lifetimes


def add_scratch(plan: ir.Plan) -> dict[int, int]:
    """Append one arena tensor ``<op>.scratch`` (int8, shape (bytes,)) per op that needs scratch; idempotent."""
    have = {t.name: t.id for t in plan.tensors}
    out: dict[int, int] = {}
    for i, op in enumerate(plan.ops):
        n = scratch_bytes(op, plan.tensors)
        if n <= 0:
            continue
        name = f"{op.name or op.type.name.lower()}#{i}.scratch"
        if name not in have:
            t = ir.Tensor(len(plan.tensors), name, (n,), ir.DType.INT8, ir.Kind.ACTIVATION)
            plan.tensors.append(t)
            have[name] = t.id
        out[i] = have[name]
    return out


def lower_bound(sizes: list[int], lifetimes: list[tuple[int, int]]) -> int:
    """The most bytes live at any one op: no placement can use less."""
    events: dict[int, int] = {}
    for s, (a, b) in zip(sizes, lifetimes):
        events[a] = events.get(a, 0) + s
        events[b + 1] = events.get(b + 1, 0) - s
    live = best = 0
    for i in sorted(events):
        live += events[i]
        best = max(best, live)
    return best


def best_placement(sizes: list[int], lifetimes: list[tuple[int, int]], align: int = ALIGN, tries: int = 24,
                   seed: int = 0) -> tuple[list[int], int]:
    """:func:`plan_memory` over :data:`ORDERS`, then ``tries`` size orders with seeded random jitter (each size
    scaled by a factor in [0.5, 1.5]); the smallest arena wins, stopping early at :func:`lower_bound`."""
    bound = lower_bound(sizes, lifetimes)
    best = min((plan_memory(sizes, lifetimes, align, o) for o in ORDERS), key=lambda r: r[1])
    rng = random.Random(seed)
    for _ in range(tries):
        if best[1] <= bound:
            break
        jitter = [s * rng.uniform(0.5, 1.5) for s in sizes]
        r = plan_memory(sizes, lifetimes, align, sorted(range(len(sizes)), key=lambda i: -jitter[i]))
        if r[1] < best[1]:
            best = r
    return best


def plan_arena(plan: ir.Plan, align: int = ALIGN, tries: int = 24) -> Layout:
    """Plan the arena of ``plan`` in place: sets every arena tensor's ``offset`` and ``plan.arena_bytes``.

    Scratch tensors (see :func:`scratch_bytes`) are added to the tensor table, each live during its op only.
    Placement: :func:`best_placement` (deterministic: fixed seed).
    """
    scratch = add_scratch(plan)
    groups, sizes, lifetimes = buffers(plan)
    for i, tid in scratch.items():
        groups.append([tid])
        sizes.append(plan.tensors[tid].nbytes)
        lifetimes.append((i, i))
    offsets, arena = best_placement(sizes, lifetimes, align, tries)
    for g, off in zip(groups, offsets):
        for t in g:
            plan.tensors[t].offset = off
    plan.arena_bytes = arena
    return Layout(groups, sizes, lifetimes, offsets, arena, scratch)


def check_layout(plan: ir.Plan, layout: Layout) -> None:
    """Raise AssertionError if two buffers live at the same op overlap, an offset is misaligned or out of range,
    or a tensor of an alias group does not sit at its group's offset."""
    spans = list(zip(layout.sizes, layout.lifetimes, layout.offsets, layout.groups))
    for s, _, off, g in spans:
        if off % ALIGN or off < 0 or off + s > plan.arena_bytes:
            raise AssertionError(f"buffer {g} at {off} (+{s}) misaligned or outside the arena ({plan.arena_bytes})")
        for t in g:
            if plan.tensors[t].offset != off:
                raise AssertionError(f"tensor {plan.tensors[t].name} at {plan.tensors[t].offset}, group at {off}")
    by_first = sorted(range(len(spans)), key=lambda i: spans[i][1][0])
    for n, i in enumerate(by_first):
        si, (ai, bi), oi, gi = spans[i]
        for j in by_first[n + 1:]:
            sj, (aj, bj), oj, gj = spans[j]
            if aj > bi:
                break
            if si and sj and oi < oj + sj and oj < oi + si:
                names = plan.tensors[gi[0]].name, plan.tensors[gj[0]].name
                raise AssertionError(f"{names[0]} [{oi}, {oi + si}) ops {ai}-{bi} overlaps {names[1]} "
                                     f"[{oj}, {oj + sj}) ops {aj}-{bj}")
