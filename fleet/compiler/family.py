"""Nested plan families for mixed-memory fleets: one model compiled under several SRAM budgets.

Each smaller plan trains a subset of the next one's coordinates (the same tensors by name, the first ``k`` input
channels of a weight with ``k`` no larger, a bias only if the larger plan trains it too), so a coordinate of the
model means the same thing in every plan and the coordinator can average each one over the devices that trained
it. The smaller schemes come from the largest one by shrinking steps that only ever drop coordinates
(:func:`shrink`); nesting is then checked on the compiled plans (:func:`check_nested`), never assumed. It refuses
a budget that even the classifier-only plan exceeds (naming what it needs) and plans that are not nested.

Hand-checkable example: budgets ``[64 kB, 256 kB]`` and a scheme training conv 5 at ratio 1 with 2 biases; if
that plan needs 70 kB, the 64 kB member halves conv 5's ratio (1 -> 1/2 -> ...) until it fits, so its weight
update covers the first half of conv 5's input channels, a subset of the 256 kB member's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from device_agent.engine import ir

from .compile import BudgetError, Compiled, compile_fitting
from .memory import MemoryReport
from .training import RATIOS

_UPDATES = (ir.OpType.CONV2D_UPDATE, ir.OpType.EMBEDDING_UPDATE)


class FamilyError(ValueError):
    """Plans that do not form a nested family (another model, a coordinate trained only by the smaller plan)."""


@dataclass(frozen=True)
class Member:
    """One plan of a family: compiled for ``budget`` bytes; it needs ``report.peak_sram_bytes`` of them."""

    budget: int
    plan: ir.Plan
    report: MemoryReport
    scheme: ir.SparseScheme

    @property
    def need(self) -> int:
        """Bytes of SRAM a device must have to train this plan (statics allowance + arena + trainable)."""
        return int(self.report.peak_sram_bytes)


@dataclass
class PlanFamily:
    """Members in ascending budget, each nested in the next (checked at construction)."""

    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.members:
            raise FamilyError("a plan family needs at least one plan")
        for small, big in zip(self.members, self.members[1:]):
            check_nested(small.plan, big.plan)

    @property
    def largest(self) -> Member:
        return self.members[-1]

    @property
    def smallest(self) -> Member:
        return self.members[0]

    def choose(self, sram: int) -> Member | None:
        """The largest member a device with ``sram`` bytes can train (its ``need`` fits), or None."""
        fits = [m for m in self.members if m.need <= sram]
        return fits[-1] if fits else None

    def id_map(self, member: Member) -> dict[int, int]:
        """``member``'s trainable tensor ids -> the largest plan's ids for the same tensors (by name)."""
        big = {t.name: t.id for t in self.largest.plan.trainable}
        return {t.id: big[t.name] for t in member.plan.trainable}


def shrink(scheme: ir.SparseScheme) -> ir.SparseScheme | None:
    """One step smaller and a subset of ``scheme``, or None when only the classifier is left.

    The earliest weight-trained conv (the deepest backward pass: the most memory) halves its ratio (1/8 -> none);
    without weight-trained convs the bias depth halves. The classifier always trains.

    >>> shrink(ir.SparseScheme("s", 2, {3: 0.25, 5: 1.0}))
    SparseScheme(name='s', n_bias_update=2, weight_ratio={3: 0.125, 5: 1.0}, classifier_weight=True, classifier_bias=True)
    >>> shrink(ir.SparseScheme("s", 3, {}))
    SparseScheme(name='s', n_bias_update=1, weight_ratio={}, classifier_weight=True, classifier_bias=True)
    """
    wr = {i: r for i, r in scheme.weight_ratio.items() if r}
    if wr:
        first = min(wr)
        smaller = [q for q in RATIOS if q < wr[first] and not math.isclose(q, wr[first])]
        if smaller:
            wr[first] = smaller[-1]
        else:
            del wr[first]
        return replace(scheme, weight_ratio=wr)
    if scheme.n_bias_update > 0:
        return replace(scheme, n_bias_update=scheme.n_bias_update // 2)
    return None


def build_family(graph: ir.Graph, scheme: ir.SparseScheme, budgets: list[int], **compile_kw) -> PlanFamily:
    """Compile ``scheme`` (shrunk where it must be) under every budget; identical plans are kept once.

    Parameters
    ----------
    graph : ir.Graph
        The forward int8 graph every member trains (one model).
    scheme : ir.SparseScheme
        What the largest budget trains if it fits (else it is shrunk too).
    budgets : list of int
        Bytes of SRAM, any order, at least one.
    **compile_kw
        Passed to :func:`fleet.compiler.compile.compile_fitting` (``patch``, ``fuse``, ``recipe`` ...).

    Returns
    -------
    PlanFamily

    Raises
    ------
    BudgetError
        A budget below the classifier-only plan; ``.required`` is what that plan needs.
    """
    if not budgets or any(int(b) <= 0 for b in budgets):
        raise ValueError(f"plan budgets must be positive byte counts, got {budgets!r}")
    patch = compile_kw.pop("patch", None)
    members: list[Member] = []
    current, root = scheme, scheme.name
    for budget in sorted({int(b) for b in budgets}, reverse=True):
        c = _fit(graph, current, budget, patch, compile_kw)
        while c.report.peak_sram_bytes > budget:
            nxt = shrink(current)
            if nxt is None:
                need = c.report.peak_sram_bytes
                raise BudgetError(f"budget {budget} bytes is below the classifier-only plan of this model, "
                                  f"which needs {need} bytes ({need / 1000:.1f} kB): raise or drop that budget", need)
            current = replace(nxt, name=f"{root}-fit{budget // 1000}k")
            c = _fit(graph, current, budget, patch, compile_kw)
        member = Member(budget, c.plan, c.report, current)
        if members and _same(members[-1].plan, member.plan):
            members[-1] = member  # NOTE: the same plan under a smaller budget: keep one, the smaller budget
        else:
            members.append(member)
    return PlanFamily(members[::-1])


def _fit(graph: ir.Graph, scheme: ir.SparseScheme, budget: int, patch: bool | None, kw: dict) -> Compiled:
    return compile_fitting(graph, scheme, budget, patch, **kw)


def _same(a: ir.Plan, b: ir.Plan) -> bool:
    from device_agent.wire.plan import plan_hash

    return plan_hash(a) == plan_hash(b)


def coverage(plan: ir.Plan) -> dict[str, int]:
    """What a plan trains, per trainable tensor name: how many leading input channels (weights; a bias or a
    fully trained tensor counts its whole first axis)."""
    out: dict[str, int] = {}
    for op in plan.ops:
        if op.type not in _UPDATES:
            continue
        for tid in op.inputs:
            t = plan.tensors[tid] if tid >= 0 else None
            if t is None or t.kind != ir.Kind.TRAINABLE:
                continue
            k = int(op.attrs.get("k", 0)) if op.type == ir.OpType.CONV2D_UPDATE and len(t.shape) > 1 else 0
            out[t.name] = k or (t.shape[1] if len(t.shape) > 1 else t.shape[0])
    for t in plan.trainable:  # NOTE: a trainable tensor no update op names (none today) counts whole
        out.setdefault(t.name, t.shape[1] if len(t.shape) > 1 else t.shape[0])
    return out


def check_nested(small: ir.Plan, big: ir.Plan) -> None:
    """Raise :class:`FamilyError` unless ``small`` trains a subset of ``big``'s coordinates of the same model."""
    ts, tb = {t.name: t for t in small.tensors}, {t.name: t for t in big.tensors}
    for name in ts.keys() & tb.keys():
        a, b = ts[name], tb[name]
        if a.kind not in (ir.Kind.CONST, ir.Kind.TRAINABLE) or b.kind not in (ir.Kind.CONST, ir.Kind.TRAINABLE):
            continue
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(np.asarray(a.data), np.asarray(b.data)):
            raise FamilyError(f"plans {small.name!r} and {big.name!r} are not the same model: tensor {name!r} "
                              "differs (shape, dtype or values)")
    cs, cb = coverage(small), coverage(big)
    for name, k in cs.items():
        if name not in cb:
            raise FamilyError(f"plan {small.name!r} trains {name!r}, which the larger plan {big.name!r} does not: "
                              "not nested")
        if k > cb[name]:
            raise FamilyError(f"plan {small.name!r} trains {k} input channels of {name!r}, the larger plan "
                              f"{big.name!r} only {cb[name]}: not nested")
        if ts[name].personal != tb[name].personal:
            raise FamilyError(f"tensor {name!r} is personal in one plan of the family and shared in the other")
