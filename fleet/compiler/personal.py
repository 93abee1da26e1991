"""What each personalization method costs a board beyond its plan, and which method a board can afford.

Counts bytes from the plan's tensor table (device_agent/engine/personal.py says what each method keeps); it
measures nothing and trains nothing. ``tinyfleet compile --json`` can report :func:`method_costs` beside the
plan's own memory (wiring it there is the compile CLI's job).

Accounting (bytes, per device), the board's own (firmware/src/device/tf_device_personal.c reports the same
number to PERSONAL_SETUP; tests/firmware/test_personal_board.py checks it): the personal copy of the method's
tensors (device_agent/engine/personal.py ``method_ids``), each 4-byte aligned, in SRAM after the plan's pool:

- ``ditto`` and ``finetune``: the whole sparse set; ``head``: the classifier's weights and bias; ``bias``: the
  classifier's int32 bias. Ditto costs no more than finetune on a board: the global values it is pulled toward
  are the stored model update (the delta base, flash), which the board keeps anyway.
- flash: 0. The copy lives in SRAM only and is rebuilt after a reboot (the next model update starts it again).
"""

from __future__ import annotations

from dataclasses import dataclass

from device_agent.engine import ir
from device_agent.engine.personal import METHODS, method_ids


@dataclass(frozen=True)
class MethodCost:
    method: str
    sram_bytes: int  # extra SRAM beyond the plan's own
    flash_bytes: int  # extra flash (the personal copy kept across reboots)


def _bytes(plan: ir.Plan, ids: list[int]) -> int:
    tensors = {t.id: t for t in plan.tensors}
    return sum(-(-tensors[i].nbytes // 4) * 4 for i in ids)  # NOTE: 4-aligned per tensor, as the board lays it out


def method_cost(plan: ir.Plan, method: str) -> MethodCost:
    """Extra SRAM / flash bytes of ``method`` on a board running ``plan`` (accounting in the module docstring)."""
    ids = method_ids(plan, method)  # raises ValueError for an unknown method
    return MethodCost(method, _bytes(plan, ids), 0)


def method_costs(plan: ir.Plan) -> dict[str, dict[str, int]]:
    """Every method's cost, for a JSON report: method -> {sram_bytes, flash_bytes}."""
    return {m: {"sram_bytes": c.sram_bytes, "flash_bytes": c.flash_bytes}
            for m in METHODS for c in [method_cost(plan, m)]}


def choose_method(plan: ir.Plan, wanted: str, plan_sram: int, board_sram: int, board_flash: int | None = None,
                  plan_flash: int = 0) -> str:
    """``wanted`` if the board can afford it, else the next method in :data:`METHODS` order it can; "none" if
    not even the bias copy fits.

    Parameters
    ----------
    plan_sram : the plan's own SRAM bytes on this board (arena + trainable + statics as the compiler counts it).
    board_sram : the board's SRAM budget in bytes. board_flash / plan_flash: likewise for flash (None: unchecked).
    """
    if wanted not in METHODS:
        raise ValueError(f"personalization method must be one of {', '.join(METHODS)}, got {wanted!r}")
    for m in METHODS[METHODS.index(wanted):]:
        c = method_cost(plan, m)
        if plan_sram + c.sram_bytes <= board_sram and (
                board_flash is None or plan_flash + c.flash_bytes <= board_flash):
            return m
    return "none"
