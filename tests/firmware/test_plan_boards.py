"""Whole plans on both emulated boards over the UART: LOAD_PLAN (chunked), PUSH_SAMPLE, TRAIN, STATE_HASH,
GET_DELTA, LOAD_UPDATE; the board's state hash equals the Python reference's, bad blobs are refused and the board
keeps its last good plan. (MbV2-w0.35 on QEMU is checked by benchmarks/firmware_paper.py, not here: ~2 s.)"""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.board import BoardClient, BoardError, QemuBoard
from device_agent.engine.trainer import Trainer
from device_agent.wire import frames
from device_agent.wire.envelope import Verifier
from device_agent.wire.errors import WireError
from device_agent.wire.plan import plan_from_bytes, plan_hash
from device_agent.wire.update import update_from_state
from tests.firmware.conftest import PLAN_VECTORS, PlanVector

VECTORS = sorted(PLAN_VECTORS.glob("*.tfv"))


def _records(plan, old, new, permille: int) -> bytes:
    """The reference records section (v1 layout, what GET_DELTA returns) for new - old."""
    from device_agent.wire.delta import encode_delta
    k = None
    if permille:
        k = {t.id: frames.topk_from_permille(t.numel, permille) for t in plan.trainable}
    d = encode_delta(plan, old, new, device_id="b", round_id=1, base_hash=b"\0" * 32, counter=1, sample_count=1,
                     top_k=k)
    try:
        return d.records_bytes(version=1)
    except TypeError:  # a delta module that only has v1
        return d.records_bytes()


def v1_bytes(upd) -> bytes:
    """The TFUP v1 blob the firmware reads (the Python writer may default to a newer version)."""
    try:
        return upd.to_bytes(version=1)
    except TypeError:
        return upd.to_bytes()


def _train(c: BoardClient, v: PlanVector) -> dict:
    c.load_plan(v.plan)
    for s, y in zip(v.samples, v.labels):
        c.push_sample(s, y)
    return c.train(v.steps, v.lr_m, v.lr_e, round_id=1)


@pytest.mark.parametrize("machine", ["mps2-an386", "mps2-an500"])
def test_plans_bit_exact_on_board(board_elfs, machine: str) -> None:
    assert VECTORS, "no golden plan vectors: run tests/firmware/gen_plan_vectors.py"
    with QemuBoard(machine, elf=board_elfs[machine]) as board, BoardClient(board.endpoint, timeout=60) as c:
        for path in VECTORS:
            v = PlanVector.read(path)
            # Execute
            tr = _train(c, v)
            st = c.state()
            stats = c.stats()
            # Assert
            assert tr["steps_done"] == v.steps and tr["correct"] == sum(v.correct), path.name
            assert st["state_hash"] == v.state_hash, f"{path.name} on {machine}: state differs from the reference"
            assert stats["plan_bytes"] == len(v.plan) and stats["samples_held"] == len(v.samples)


def test_delta_and_update_round_trip(board_elfs) -> None:
    # Prepare: the tiny plan trained on the board, the reference trained the same way
    v = PlanVector.read(PLAN_VECTORS / "tiny.tfv")
    plan = plan_from_bytes(v.plan, verify=Verifier.unsigned())
    ref = Trainer(plan)
    base = ref.trainable_state()
    with QemuBoard("mps2-an500", elf=board_elfs["mps2-an500"]) as board, BoardClient(board.endpoint) as c:
        _train(c, v)
        tin = plan.tensors[plan.input_id]
        for s in range(v.steps):
            i = s % len(v.samples)
            x = np.frombuffer(v.samples[i], np.int8).reshape(1, *tin.shape)
            ref.train_step(x, np.array([v.labels[i]]), lr=v.lr_m * 2.0 ** v.lr_e)
        # Execute: deltas dense and top-k, then a model update with the reference's state
        dense, topk = c.delta_records(0), c.delta_records(100)
        upd = update_from_state(plan, ref.trainable_state(), base_version=0, new_version=3,
                                plan_hash=plan_hash(v.plan))
        c.load_update(v1_bytes(upd))
        after = c.state()
        empty = c.delta_records(0)
        # a corrupted update is refused with its wire error; the model stays
        bad = bytearray(v1_bytes(upd))
        bad[-1] ^= 0xFF
        with pytest.raises(BoardError) as e:
            c.load_update(bytes(bad))
        kept = c.state()
        # a validly formed but older (rolled-back) full update is refused; the model stays
        old = update_from_state(plan, base, base_version=0, new_version=2, plan_hash=plan_hash(v.plan))
        with pytest.raises(BoardError) as rolled:
            c.load_update(v1_bytes(old))
        still = c.state()
    # Assert
    assert dense == _records(plan, base, ref.trainable_state(), 0)
    assert topk == _records(plan, base, ref.trainable_state(), 100) and len(topk) < len(dense)
    assert after["state_hash"] == bytes.fromhex(ref.state_hash()) and after["model_version"] == 3
    assert empty == _records(plan, ref.trainable_state(), ref.trainable_state(), 0)
    assert e.value.status == frames.Status.ERR_FORMAT
    assert kept["state_hash"] == after["state_hash"]
    assert rolled.value.status == frames.Status.ERR_STATE
    assert still["state_hash"] == after["state_hash"] and still["model_version"] == 3


def test_bad_plan_refused_last_good_plan_kept(board_elfs) -> None:
    tiny = PlanVector.read(PLAN_VECTORS / "tiny.tfv")
    with QemuBoard("mps2-an386", elf=board_elfs["mps2-an386"]) as board, BoardClient(board.endpoint) as c:
        _train(c, tiny)
        before = c.state()
        bad = bytearray(tiny.plan)
        bad[100] ^= 0x01  # CRC mismatch
        with pytest.raises(BoardError) as e:
            c.load_plan(bytes(bad))
        f = c.request(frames.Command.LOAD_PLAN, frames.pack("req", frames.Command.LOAD_PLAN, b"x", offset=8,
                                                              total=20))
        again = c.train(1, tiny.lr_m, tiny.lr_e)
        info = c.board_info()
    assert e.value.status == frames.Status.ERR_FORMAT and str(int(WireError.CRC_MISMATCH)) in str(e.value)
    assert f.code == frames.Status.ERR_STATE
    assert again["steps_done"] == 1 and again["update_counter"] == before["update_counter"] + 1
    assert info["frames_bad"] == 0


def test_recipe_plan_with_a_foreign_optimizer_layout_is_refused(board_elfs) -> None:
    # Prepare: a recipe plan whose first slot's two buffers swap places (aligned, inside the region: the reader
    # takes it; the layout is not the canonical one, so the runtime's prepare must refuse it)
    import struct

    from tests.vectors.generate import plan_offsets, reseal

    v = PlanVector.read(PLAN_VECTORS / "tiny_recipe8.tfv")
    plan = plan_from_bytes(v.plan, verify=Verifier.unsigned())
    slot = plan.recipe.slots[0]
    at = plan_offsets(v.plan)["recipe"] + 24
    bad = bytearray(v.plan)
    struct.pack_into("<ii", bad, at + 4, slot.bbuf_off, slot.wbuf_off)
    bad = reseal(bytes(bad))
    plan_from_bytes(bad, verify=Verifier.unsigned())  # the reader accepts it
    with QemuBoard("mps2-an386", elf=board_elfs["mps2-an386"]) as board, BoardClient(board.endpoint) as c:
        # Execute
        with pytest.raises(BoardError) as e:
            c.load_plan(bad)
        tr = _train(c, v)  # the good one still loads and trains
        st = c.state()
    # Assert: ERR_FORMAT with the prepare error TF_RT_BAD_OP (256 + 3)
    assert e.value.status == frames.Status.ERR_FORMAT and "259" in str(e.value)
    assert tr["steps_done"] == v.steps and st["state_hash"] == v.state_hash
