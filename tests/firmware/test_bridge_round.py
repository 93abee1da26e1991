"""A device agent drives an emulated board through a full round against the in-memory coordinator: its delta is
byte for byte the delta the same device produces with the Python Trainer."""

from __future__ import annotations

import copy
from dataclasses import replace

from device_agent.board import QemuBoard
from device_agent.bridge import BoardTrainer, connect
from fleet import coordinator as co
from fleet.compiler.planner import plan_arena
from tests.pure.test_fleet_inmemory import PLAN, Fleet, config


def _fleet() -> Fleet:
    cfg = replace(config(goal=2), batch_size=1, local_steps=6)
    return Fleet(n=2, cfg=cfg)


def test_board_device_full_round(board_elfs) -> None:
    # Prepare: the reference fleet (both devices on the Python Trainer) and the same fleet with d00 on a board
    ref = _fleet()
    ref.boot()
    ref.round()
    with QemuBoard("mps2-an500", elf=board_elfs["mps2-an500"]) as board, \
            connect(f"tcp://{board.endpoint[0]}:{board.endpoint[1]}") as client:
        fleet = _fleet()
        board_plan = copy.deepcopy(PLAN)  # the board runs the compiled form: same tensors + arena offsets
        plan_arena(board_plan)
        fleet.devices["d00"].trainer = BoardTrainer(client, board_plan)
        # Execute
        fleet.boot()
        fleet.round()
        board_hash = fleet.devices["d00"].trainer.state_hash()
    # Assert: the round committed with both devices, and the board's uplink is the reference's
    closed = [i for i in fleet.infos if isinstance(i, co.RoundClosed)]
    assert closed and closed[-1].committed, fleet.infos[-5:]
    ups = dict(fleet.uplinks)
    assert ups["d00"] == dict(ref.uplinks)["d00"]
    assert len(board_hash) == 64
