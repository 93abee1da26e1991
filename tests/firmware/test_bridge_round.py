"""A device agent drives an emulated board through full rounds against the in-memory coordinator: its delta is
byte for byte the delta the same device produces with the Python Trainer, whether every step pushes its sample
(protocol v1) or the samples were stored on the board once (v2)."""

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
        fleet.devices["d00"].trainer = BoardTrainer(client, board_plan, stored=False)  # v1: PUSH_SAMPLE + TRAIN 1
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


def test_board_device_stored_samples_two_rounds(board_elfs) -> None:
    """The device's samples reach the board once (its sensor stream, STORE_SAMPLES); each round is one model
    update + TRAIN_LIST of stored slots; the uplinks are still the Python reference's, byte for byte."""
    from tests.pure.test_fleet_inmemory import tiny_dataset

    ref = _fleet()
    ref.boot()
    ref.round()
    ref.round()
    with QemuBoard("mps2-an500", elf=board_elfs["mps2-an500"]) as board, \
            connect(f"tcp://{board.endpoint[0]}:{board.endpoint[1]}") as client:
        fleet = _fleet()
        board_plan = copy.deepcopy(PLAN)
        plan_arena(board_plan)
        trainer = BoardTrainer(client, board_plan)
        fleet.devices["d00"].trainer = trainer
        x, y = tiny_dataset(48, seed=0)  # what d00's buffer holds (tests/pure/test_fleet_inmemory.Fleet)
        streamed = trainer.store_samples(x, y)
        # Execute
        fleet.boot()
        fleet.round()
        after_one = trainer.samples_sent
        fleet.round()
        stats = client.stats()
    # Assert
    ups, ref_ups = [u for d, u in fleet.uplinks if d == "d00"], [u for d, u in ref.uplinks if d == "d00"]
    assert len(ups) == 2 and ups == ref_ups
    assert streamed == len({trainer.sample_key(a, b) for a, b in zip(x, y)}) == stats["samples_held"]
    assert after_one == trainer.samples_sent == streamed  # the rounds sent no sample


def test_board_device_in_async_mode_matches_the_reference_fleet(board_elfs) -> None:
    """Buffered async rounds (K = 2 of 3 devices, so deltas wait and go stale) with d00 on a board: the in-memory
    link delivers in a fixed order, so every uplink and every published version equals the all-Python fleet's."""
    from tests.pure.test_async_fleet import async_config
    from tests.pure.test_fleet_inmemory import tiny_dataset

    def run(board_client=None) -> Fleet:
        f = Fleet(n=3, cfg=replace(async_config(k=2, max_versions=4), batch_size=1, local_steps=6))
        if board_client is not None:
            board_plan = copy.deepcopy(PLAN)
            plan_arena(board_plan)
            trainer = BoardTrainer(board_client, board_plan)
            trainer.store_samples(*tiny_dataset(48, seed=0))  # d00's buffer (tests/pure/test_fleet_inmemory.Fleet)
            f.devices["d00"].trainer = trainer
        f.boot()
        f.now += 1.0
        f.send(co.StartRound())
        f.pump(max_coord=60)
        return f

    ref = run()
    with QemuBoard("mps2-an386", elf=board_elfs["mps2-an386"]) as board, \
            connect(f"tcp://{board.endpoint[0]}:{board.endpoint[1]}") as client:
        fleet = run(client)
    assert [c.version for c in fleet.closed()] == [2, 3, 4, 5]
    stale = {int(s) for c in fleet.closed() for s in c.detail.removeprefix("staleness ").split(",")}
    assert stale - {0}, "some delta should have been trained on an older version"
    board_ups = [u for d, u in fleet.uplinks if d == "d00"]
    assert len(board_ups) >= 2 and board_ups == [u for d, u in ref.uplinks if d == "d00"]
    assert [fleet.store.version(v) for v in range(1, 6)] == [ref.store.version(v) for v in range(1, 6)]
