"""Personalization on an emulated board (QEMU mps2-an500 / an386) is bit-exact with the reference
(device_agent/engine/personal.py): after each of a few model updates the board personalizes on its stored samples,
and its personal model's hash equals the reference Personalizer's, for every method; the shared model it then
trains for the fleet (its delta) is bit-identical to a device that never personalized; and the SRAM the board
reserves for the copy is fleet/compiler/personal.py's method_cost."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from device_agent.board import BoardError, QemuBoard
from device_agent.bridge import BoardPersonalizer, BoardTrainer, connect
from device_agent.engine.personal import METHODS, Personalizer, PersonalSpec
from device_agent.engine.trainer import Trainer
from fleet.compiler.personal import method_cost
from fleet.compiler.planner import plan_arena
from tests.fixtures.tiny import tiny_dataset, tiny_plan

UPDATES, PERSONAL_STEPS, SHARED_STEPS = 3, 7, 4
LR, PERSONAL_LR, LAM_Q15 = 0.2, 0.3, 6000


def _plan():
    plan = copy.deepcopy(tiny_plan())
    plan_arena(plan)  # the board runs the compiled form
    return plan


def _hash(plan, state) -> str:
    t = Trainer(plan)
    t.load_trainable(state)
    return t.state_hash()


def _globals(plan, x, y) -> list[dict]:
    """The model updates the device receives: a stand-in fleet trains on the data between them."""
    t, out = Trainer(plan), []
    for u in range(UPDATES):
        for k in range(5):
            i = (7 * u + k) % len(y)
            t.train_step(x[i:i + 1], y[i:i + 1], LR)
        out.append(t.trainable_state())
    return out


def _batches(u: int, n: int):
    rng = np.random.default_rng([u, 11])
    return [int(i) for i in rng.integers(0, n, PERSONAL_STEPS)]


def _run(trainer, pz, plan, globals_, x, y) -> tuple[list[str], list[str]]:
    """Per update: load it, personalize, train the shared model; (personal hashes, shared hashes)."""
    personal, shared = [], []
    for u, g in enumerate(globals_):
        trainer.load_trainable(g)
        if pz is not None:
            idx = _batches(u, len(y))
            pz.update(trainer, g, lambda k, idx=idx: (x[idx[k]:idx[k] + 1], y[idx[k]:idx[k] + 1]))
        for k in range(SHARED_STEPS):
            i = (3 * u + k) % len(y)
            trainer.train_step(x[i:i + 1], y[i:i + 1], LR)
        shared.append(trainer.state_hash())
        if pz is None:
            personal.append("")
        elif isinstance(pz, BoardPersonalizer):
            personal.append(pz.hash())
        else:
            personal.append(_hash(plan, pz.model(trainer.trainable_state())))
    return personal, shared


@pytest.mark.parametrize("machine,methods", [("mps2-an500", METHODS), ("mps2-an386", ("ditto",))])
def test_board_personal_model_is_bit_exact_and_leaves_the_delta_alone(board_elfs, machine, methods) -> None:
    # Prepare: the reference (Python Trainer + Personalizer) per method, and a device that never personalizes
    plan = _plan()
    x, y = tiny_dataset(40, seed=3)
    globals_ = _globals(plan, x, y)
    ref = {m: _run(Trainer(plan), Personalizer(plan, PersonalSpec(m, PERSONAL_STEPS, PERSONAL_LR, LAM_Q15)), plan,
                   globals_, x, y) for m in methods}
    _, plain_shared = _run(Trainer(plan), None, plan, globals_, x, y)
    with QemuBoard(machine, elf=board_elfs[machine]) as board, \
            connect(f"tcp://{board.endpoint[0]}:{board.endpoint[1]}") as client:
        for m in methods:
            # Execute: the same updates, personal steps and shared steps on the board
            trainer = BoardTrainer(client, plan)
            trainer.store_samples(x, y)  # the device's stream, stored once
            pz = BoardPersonalizer(trainer, PersonalSpec(m, PERSONAL_STEPS, PERSONAL_LR, LAM_Q15))
            got_personal, got_shared = _run(trainer, pz, plan, globals_, x, y)
            # Assert: personal model bit-exact after every update; shared training untouched; cost as compiled
            assert got_personal == ref[m][0], m
            assert got_shared == ref[m][1] == plain_shared, m
            assert len(set(got_personal)) == UPDATES and got_personal[0] != plain_shared[0]  # it did personalize
            c = method_cost(plan, m)
            assert (pz.cost["sram_bytes"], pz.cost["flash_bytes"]) == (c.sram_bytes, c.flash_bytes), m
            assert trainer.personal_bytes == c.sram_bytes  # counted in the board's measured memory
            assert client.personal_hash()["personal_steps"] == UPDATES * PERSONAL_STEPS


def test_board_refuses_to_personalize_after_shared_training(board_elfs) -> None:
    """The board reads the global values from its stored update: once it trained past it, PERSONALIZE is refused
    (ERR_STATE) and nothing changes; the personal copy is also not readable through the delta."""
    plan = _plan()
    x, y = tiny_dataset(16, seed=4)
    with QemuBoard("mps2-an500", elf=board_elfs["mps2-an500"]) as board, \
            connect(f"tcp://{board.endpoint[0]}:{board.endpoint[1]}") as client:
        trainer = BoardTrainer(client, plan)
        trainer.store_samples(x, y)
        pz = BoardPersonalizer(trainer, PersonalSpec("head", 3, PERSONAL_LR))
        trainer.load_trainable(Trainer(plan).trainable_state())
        trainer.train_step(x[:1], y[:1], LR)
        before = trainer.state_hash()
        with pytest.raises(BoardError, match="ERR_STATE"):
            pz.update(trainer, {}, lambda k: (x[k:k + 1], y[k:k + 1]))
        assert trainer.state_hash() == before
        with pytest.raises(BoardError, match="stays on the board"):
            pz.model({})


def test_device_protocol_drives_the_board_personalizer(board_elfs) -> None:
    """Through the fleet protocol (in-memory coordinator, two rounds): d00 on a board with a BoardPersonalizer
    sends the same uplinks as the all-Python fleet without personalization, and its board's personal model hash
    is the one the same device gets with the Python Personalizer."""
    from dataclasses import replace

    from device_agent.engine.ir import Plan
    from tests.pure.test_fleet_inmemory import PLAN, Fleet, config, tiny_dataset

    spec = PersonalSpec("ditto", 5, PERSONAL_LR, LAM_Q15)

    def fleet() -> Fleet:
        return Fleet(n=2, cfg=replace(config(goal=2), batch_size=1, local_steps=6))

    plain, ref = fleet(), fleet()
    ref.devices["d00"].personalizer = Personalizer(PLAN, spec)
    for f in (plain, ref):
        f.boot()
        f.round()
        f.round()
    ref_hash = _hash(PLAN, ref.devices["d00"].personal_model())
    assert ref_hash != ref.devices["d00"].trainer.state_hash()  # the reference device did personalize
    with QemuBoard("mps2-an500", elf=board_elfs["mps2-an500"]) as board, \
            connect(f"tcp://{board.endpoint[0]}:{board.endpoint[1]}") as client:
        f = fleet()
        board_plan: Plan = copy.deepcopy(PLAN)
        plan_arena(board_plan)
        trainer = BoardTrainer(client, board_plan)
        trainer.store_samples(*tiny_dataset(48, seed=0))  # d00's buffer (tests/pure/test_fleet_inmemory.Fleet)
        f.devices["d00"].trainer = trainer
        f.devices["d00"].personalizer = BoardPersonalizer(trainer, spec)
        f.boot()
        f.round()
        f.round()
        got = f.devices["d00"].personalizer.hash()
    assert [u for d, u in f.uplinks if d == "d00"] == [u for d, u in plain.uplinks if d == "d00"] != []
    assert got == ref_hash
