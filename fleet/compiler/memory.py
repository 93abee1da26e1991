"""Memory report of a planned training plan, in the paper's accounting plus what the whole board needs.

``arena`` is what the paper compared (activations, gradients, masks, scratch; KB = 1000 bytes); ``trainable``
are the parameters updated in SRAM; ``optimizer`` the training recipe's state (accumulators, momentum, weight
residuals; 0 for the plain step); ``peak_sram`` adds them and a stated runtime allowance. It refuses to estimate the
arena: it reads the offsets the planner assigned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from device_agent.engine import ir
from device_agent.engine.recipe import Recipe, layout_optimizer, plan_recipe

from .planner import Layout

# NOTE: statics + stack of the C runtime (tensor/op tables, UART and sample buffers), measured on QEMU mps2-an500
# by benchmarks/firmware_paper.py (ELF .data + .bss of the SELFTEST=0 build + painted stack high-water): 22.2 KB
# with MbV2-w0.35, rounded up. Counted in peak_sram_bytes, never in arena_bytes; it decides whether a plan fits.
RUNTIME_ALLOWANCE_BYTES = 23_000
KB = 1000  # the paper's kilobyte

# per-channel int32 attrs an update op reads every step (constants: read from flash)
_UPDATE_ARRAYS = ("qas_w_m", "qas_w_e", "qas_b_m", "qas_b_e")


@dataclass
class MemoryReport:
    """Bytes of one plan on a board. ``peak_sram_bytes = arena + trainable + optimizer + runtime allowance``."""

    arena_bytes: int  # allocated arena (paper's accounting: activations, gradients, masks, scratch)
    live_peak_bytes: int  # largest sum of buffers live at one op (lower bound of the arena)
    peak_op: str  # the op where live_peak_bytes occurs
    trainable_bytes: int  # trained weights + biases (SRAM); their fixed QAS attrs stay in flash
    flash_bytes: int  # frozen constants + the plan's op/tensor tables (or the .ttp size when known)
    runtime_bytes: int  # RUNTIME_ALLOWANCE_BYTES
    peak_sram_bytes: int
    num_ops: int
    num_tensors: int
    optimizer_bytes: int = 0  # training-recipe state in SRAM (Recipe.state_bytes of the trained elements)

    def as_dict(self) -> dict:
        """JSON-ready dict, with ``trainable_sram_bytes`` as an alias of ``trainable_bytes``."""
        d = asdict(self)
        d["trainable_sram_bytes"] = self.trainable_bytes
        return d


def trainable_bytes(plan: ir.Plan) -> int:
    """Bytes of the values a training step changes: trainable int8 weights and int32 biases (held in SRAM).

    The fixed per-channel attrs of trained convs (QAS factors, requant multipliers) never change, so the runtime
    reads them from the plan in flash; :func:`update_attr_bytes` counts them for reference.
    """
    return sum(t.nbytes for t in plan.trainable)


def trained_elements(plan: ir.Plan) -> tuple[int, int]:
    """(int8 weight elements, int32 bias elements) that update ops change: only the first-k input channels count.

    A bias-only layer contributes its ``C_out`` biases; a weight on ``k`` of ``C_in`` channels (groups ``G``)
    contributes ``C_out * KH * KW`` times the number of its ``C_in/G`` inputs with global index ``< k``.
    """
    nw = nb = 0
    for op in plan.ops:
        if op.type == ir.OpType.CONV2D_UPDATE:
            w = plan.tensors[op.inputs[2]]
            k = int(op.attrs["k"])
            if op.attrs["update_weight"] and k > 0:
                c_out, cin_g = w.shape[:2]
                g = int(op.attrs["groups"])
                grp = np.arange(c_out) // (c_out // g)
                nw += int((grp[:, None] * cin_g + np.arange(cin_g)[None, :] < k).sum()) * int(np.prod(w.shape[2:]))
            if op.attrs["update_bias"]:
                nb += int(plan.tensors[op.inputs[3]].shape[0])
        elif op.type == ir.OpType.EMBEDDING_UPDATE:
            nw += int(np.prod(plan.tensors[op.inputs[2]].shape))
    return nw, nb


def optimizer_bytes(plan: ir.Plan, recipe: Recipe | None = None) -> int:
    """SRAM bytes of the training recipe's state for ``plan``: the optimizer region the plan's RECIPE section
    lays out (``recipe.layout_optimizer``: ``Recipe.state_bytes`` of the trained elements, each buffer padded to
    4 bytes). ``recipe`` None: the recipe the plan carries, else 0.

    Examples
    --------
    One trained 1x1 conv of 10 outputs on 4 inputs (40 weights, 10 biases) with accumulation (B = 4), momentum
    and 8-bit residuals: ``(4 + 1) * 40 + 4 * 10 = 240`` bytes.
    """
    if recipe is None:
        carried = plan_recipe(plan)
        return 0 if carried is None else carried.optimizer_bytes
    return layout_optimizer(plan, recipe).optimizer_bytes


def update_attr_bytes(plan: ir.Plan) -> int:
    """Bytes of the int32 attrs the update ops read (QAS mantissas/exponents), kept in flash with the plan."""
    return sum(4 * int(getattr(op.attrs[a], "size", 1)) for op in plan.ops if op.type == ir.OpType.CONV2D_UPDATE
               for a in _UPDATE_ARRAYS)


def _table_bytes(plan: ir.Plan) -> int:
    """Rough size of the plan's tables without constant data: 44 B per tensor, 8 B + 4 B per attr value per op."""
    attrs = sum(int(getattr(v, "size", 1)) for op in plan.ops for v in op.attrs.values())
    return 44 * len(plan.tensors) + sum(8 + 4 * (len(op.inputs) + len(op.outputs)) for op in plan.ops) + 4 * attrs


def flash_bytes(plan: ir.Plan, blob_bytes: int | None = None) -> int:
    """The .ttp size when known (it holds constants, initial trainable values and tables), else an estimate."""
    if blob_bytes is not None:
        return int(blob_bytes)
    data = sum(t.nbytes for t in plan.tensors if t.kind in (ir.Kind.CONST, ir.Kind.TRAINABLE))
    return data + _table_bytes(plan)


def memory_report(plan: ir.Plan, layout: Layout, blob_bytes: int | None = None,
                  runtime_bytes: int = RUNTIME_ALLOWANCE_BYTES, recipe: Recipe | None = None) -> MemoryReport:
    """Report a plan whose arena :func:`fleet.compiler.planner.plan_arena` has planned.

    Parameters
    ----------
    plan : ir.Plan
        With offsets and ``arena_bytes`` set.
    layout : planner.Layout
        The planner's result for this plan (for the live-bytes profile).
    blob_bytes : int, optional
        Length of the serialized plan; used as ``flash_bytes`` when given.
    runtime_bytes : int
        Statics/stack allowance added to ``peak_sram_bytes``.
    recipe : Recipe, optional
        The training recipe whose optimizer state (:func:`optimizer_bytes`) is added to ``peak_sram_bytes``;
        default the one the plan carries (none: 0).

    Examples
    --------
    A plan with a 1000-byte arena and one trained 1x1 conv of 10 outputs on 4 inputs (40 B int8 weights +
    40 B int32 biases) reports ``peak_sram_bytes = 1000 + 80 + 23000 = 24080`` with the default allowance.
    """
    if any(plan.tensors[t].offset < 0 for g in layout.groups for t in g):
        raise ValueError(f"plan {plan.name!r} has arena tensors without offsets: run planner.plan_arena first")
    live = layout.live_bytes(len(plan.ops))
    peak_i = max(range(len(live)), key=live.__getitem__) if live else 0
    tb = trainable_bytes(plan)
    ob = optimizer_bytes(plan, recipe)
    return MemoryReport(
        arena_bytes=plan.arena_bytes, live_peak_bytes=live[peak_i] if live else 0,
        peak_op=plan.ops[peak_i].name if plan.ops else "", trainable_bytes=tb,
        flash_bytes=flash_bytes(plan, blob_bytes), runtime_bytes=runtime_bytes,
        peak_sram_bytes=plan.arena_bytes + tb + ob + runtime_bytes, num_ops=len(plan.ops),
        num_tensors=len(plan.tensors), optimizer_bytes=ob)


def live_at(plan: ir.Plan, layout: Layout, op_index: int) -> list[tuple[str, int]]:
    """Buffers live at ``op_index`` as (first tensor name, bytes), largest first: what drives the peak."""
    rows = [(plan.tensors[g[0]].name, s) for g, s, (a, b) in zip(layout.groups, layout.sizes, layout.lifetimes)
            if a <= op_index <= b]
    return sorted(rows, key=lambda r: -r[1])
