"""The compiler's one entry point: forward graph + scheme + budget -> planned ``ir.Plan`` and its MemoryReport.

Builds the training graph, plans the arena, checks the layout, serializes to measure flash, and checks the
budget. It refuses to silently overrun: a plan over budget raises :class:`BudgetError` with the bytes needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from device_agent.engine import ir
from device_agent.engine.recipe import Recipe

from .memory import RUNTIME_ALLOWANCE_BYTES, MemoryReport, memory_report
from .planner import Layout, check_layout, plan_arena
from .training import build_training_plan


class BudgetError(ValueError):
    """No plan fits the budget; ``required`` is the smallest budget (bytes) that would fit."""

    def __init__(self, message: str, required: int):
        super().__init__(message)
        self.required = required


@dataclass
class Compiled:
    """A compiled plan with its layout, report and serialized blob (None if the writer is unavailable)."""

    plan: ir.Plan
    layout: Layout
    report: MemoryReport
    blob: bytes | None


def _serialize(plan: ir.Plan) -> bytes | None:
    try:
        from device_agent.wire.plan import plan_to_bytes
    except ImportError:  # NOTE: the plan writer is optional for memory studies
        return None
    return plan_to_bytes(plan)


def compile_full(graph: ir.Graph, scheme: ir.SparseScheme, fuse: bool = True, serialize: bool = True,
                 runtime_bytes: int = RUNTIME_ALLOWANCE_BYTES, recipe: Recipe | None = None,
                 range_ste: bool = False, patch: bool = True) -> Compiled:
    """Build, plan, check and (optionally) serialize; no budget check. See :func:`compile_plan`."""
    plan = build_training_plan(graph, scheme, fuse=fuse, range_ste=range_ste, recipe=recipe, patch=patch)
    layout = plan_arena(plan)
    check_layout(plan, layout)
    blob = _serialize(plan) if serialize else None
    report = memory_report(plan, layout, len(blob) if blob is not None else None, runtime_bytes)
    return Compiled(plan, layout, report, blob)


def compile_fitting(graph: ir.Graph, scheme: ir.SparseScheme, budget: int | None, patch: bool | None = None,
                    **kw) -> Compiled:
    """:func:`compile_full`, patched only where it must be: with ``patch=None`` the frozen first stage runs whole
    (the fast plan) unless that plan's ``peak_sram_bytes`` exceeds ``budget``; then tile by tile (PATCH ops: far
    less arena, more instructions, because every tile recomputes its halo). True / False force either. No budget
    check (:func:`check_budget`)."""
    if patch is not None:
        return compile_full(graph, scheme, patch=patch, **kw)
    whole = compile_full(graph, scheme, patch=False, **kw)
    if budget is None or whole.report.peak_sram_bytes <= budget:
        return whole
    return compile_full(graph, scheme, patch=True, **kw)


def compile_plan(graph: ir.Graph, scheme: ir.SparseScheme, budget: int | None = None, fuse: bool = True,
                 serialize: bool = True, runtime_bytes: int = RUNTIME_ALLOWANCE_BYTES,
                 recipe: Recipe | None = None, range_ste: bool = False,
                 patch: bool | None = None) -> tuple[ir.Plan, MemoryReport]:
    """Compile ``graph`` for ``scheme`` and check it against ``budget``.

    Parameters
    ----------
    graph : ir.Graph
        Forward int8 graph from an importer (not modified).
    scheme : ir.SparseScheme
        What trains; see :mod:`fleet.compiler.scheme` for named schemes and the search.
    budget : int, optional
        Bytes of SRAM the plan may use (``peak_sram_bytes`` must not exceed it), e.g. a board's
        ``training_budget``. None: no check.
    fuse : bool
        Fuse frozen expansion + depthwise pairs (PWDW).
    serialize : bool
        Serialize with the plan writer to measure ``flash_bytes`` exactly.
    runtime_bytes : int
        Runtime statics/stack allowance added to the peak.
    recipe : Recipe, optional
        Training recipe, carried by the plan (plan v2 RECIPE section; ``recipe.RecipePlan``) so host trainers
        and boards run it alike; its optimizer region counts in ``optimizer_bytes`` and ``peak_sram_bytes``.
    range_ste : bool
        No saturation masks on linear int8-range clamps (``training.build_training_plan``); opt-in.
    patch : bool, optional
        None (default): patch only when the unpatched plan does not fit ``budget`` (:func:`compile_fitting`).
        True: run the frozen high-resolution first stage tile by tile (PATCH ops) where that shrinks the arena
        by at least ``patching.MIN_SAVING``; False: never.

    Returns
    -------
    (ir.Plan, MemoryReport)
        The plan has every arena offset and ``arena_bytes`` set.

    Raises
    ------
    BudgetError
        ``peak_sram_bytes > budget``; ``.required`` = the plan's peak.
    """
    c = compile_fitting(graph, scheme, budget, patch, fuse=fuse, serialize=serialize, runtime_bytes=runtime_bytes,
                        recipe=recipe, range_ste=range_ste)
    check_budget(c.report, budget, scheme.name)
    return c.plan, c.report


def check_budget(report: MemoryReport, budget: int | None, what: str) -> None:
    """Raise :class:`BudgetError` if ``report.peak_sram_bytes`` exceeds ``budget`` (None: no limit)."""
    if budget is None or report.peak_sram_bytes <= budget:
        return
    r = report
    raise BudgetError(
        f"scheme {what!r} needs {r.peak_sram_bytes} bytes of SRAM (arena {r.arena_bytes} + trainable "
        f"{r.trainable_bytes} + optimizer {r.optimizer_bytes} + runtime {r.runtime_bytes}) but the budget is {budget} bytes; "
        f"the smallest feasible budget for it is {r.peak_sram_bytes} bytes ({r.peak_sram_bytes / 1000:.1f} KB)",
        r.peak_sram_bytes)
