"""The firmware boots on both emulated boards and answers over its UART: PING, GET_STATS, BOARD_INFO, SELFTEST;
and the v2 sample store (STORE_SAMPLES + TRAIN_LIST) trains bit-exactly with the reference."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from device_agent.board import BoardClient, BoardError, QemuBoard
from device_agent.wire import frames
from tests.conftest import ROOT, require_cmd

FIRMWARE = ROOT / "firmware"
CPU_PART = {"mps2-an386": 0xC24, "mps2-an500": 0xC27}  # SCB->CPUID part number: Cortex-M4 / Cortex-M7


@pytest.fixture(scope="module")
def elfs(tmp_path_factory) -> dict[str, Path]:
    require_cmd("arm-none-eabi-gcc", "qemu-system-arm", "make")
    build = tmp_path_factory.mktemp("fw")
    r = subprocess.run(["make", "-s", "-C", str(FIRMWARE), f"BUILD={build}", "qemu-an386", "qemu-an500"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"mps2-an386": build / "an386" / "tinyfleet.elf", "mps2-an500": build / "an500" / "tinyfleet.elf"}


@pytest.mark.parametrize("machine", ["mps2-an386", "mps2-an500"])
def test_round_trip(elfs, machine: str) -> None:
    # Prepare
    with QemuBoard(machine, elf=elfs[machine]) as board, BoardClient(board.endpoint, timeout=30) as c:
        # Execute
        ping, stats, info = c.ping(), c.stats(), c.board_info()
        test = c.selftest()
        info2 = c.board_info()
    # Assert
    assert ping["protocol_version"] == frames.PROTOCOL_VERSION and ping["max_payload"] == frames.MAX_PAYLOAD
    assert ping["sram_bytes"] == 320 * 1024
    assert (info["cpuid"] >> 4) & 0xFFF == CPU_PART[machine]
    assert 0 < stats["arena_bytes"] < 320 * 1024 and stats["arena_bytes"] == info["arena_bytes"]
    assert 0 < info["stack_high_water"] <= info["stack_size"]
    assert test["passed"] == test["cases"] > 50 and test["first_failed"] == -1
    assert info2["ticks"] > info["ticks"] and info2["frames_ok"] == 5 and info2["frames_bad"] == 0


def test_selftest_crc_equals_host(elfs, tmp_path: Path) -> None:
    """The board computes the very bytes the host build does (the CRC over all kernel outputs)."""
    require_cmd("gcc")
    r = subprocess.run(["make", "-s", "-C", str(FIRMWARE), f"BUILD={tmp_path}", "host"], check=False, capture_output=True,
                       text=True)
    host_crc = int(r.stdout.split("crc32 ")[1].split()[0], 16)
    with QemuBoard("mps2-an500", elf=elfs["mps2-an500"]) as board, BoardClient(board.endpoint) as c:
        assert c.selftest()["crc32"] == host_crc


def test_bad_frames_are_rejected_and_counted(elfs) -> None:
    with QemuBoard("mps2-an386", elf=elfs["mps2-an386"]) as board, BoardClient(board.endpoint) as c:
        # Execute: a frame with a flipped CRC byte, garbage COBS, an unknown command, PING with a payload
        good = bytearray(frames.encode_frame(frames.Frame(7, frames.Command.PING)))
        good[-2] ^= 0x01
        c.send_raw(bytes(good))
        bad_crc = c.recv_frame()
        c.send_raw(b"\x09\x01\x00")
        bad_cobs = c.recv_frame()
        unknown = c.request(0x7E)
        with_payload = c.request(frames.Command.PING, b"\x01")
        info = c.board_info()
    # Assert
    assert (bad_crc.seq, bad_crc.code) == (frames.SEQ_UNKNOWN, frames.Status.ERR_CRC)
    assert (bad_cobs.seq, bad_cobs.code) == (frames.SEQ_UNKNOWN, frames.Status.ERR_CRC)
    assert unknown.code == frames.Status.ERR_UNKNOWN_COMMAND
    assert with_payload.code == frames.Status.ERR_BAD_PAYLOAD
    assert info["frames_bad"] == 2 and info["last_error"] in (6, 23)


def test_requests_sent_while_the_board_is_busy_all_get_answers(elfs) -> None:
    """Bytes that arrive during a long command wait in the UART (flow control) instead of overflowing the RX ring:
    a SELFTEST followed at once by four maximum-size frames (2 KB, more than the ring) gets five answers in order.
    (Before the fix bytes were dropped: one CRC error and two frames lost with their delimiters.)"""
    with QemuBoard("mps2-an500", elf=elfs["mps2-an500"]) as board, BoardClient(board.endpoint, timeout=30) as c:
        # Execute
        burst = [frames.Frame(100 + i, frames.Command.PING, bytes(frames.MAX_PAYLOAD)) for i in range(4)]
        c.send_raw(frames.encode_frame(frames.Frame(99, frames.Command.SELFTEST))
                   + b"".join(frames.encode_frame(f) for f in burst))
        answers = [c.recv_frame() for _ in range(5)]
        info = c.board_info()
    # Assert
    assert [(a.seq, a.code) for a in answers] == [(99, frames.Status.OK)] + [
        (f.seq, frames.Status.ERR_BAD_PAYLOAD) for f in burst]
    assert info["frames_bad"] == 0


def test_icount_ticks_are_deterministic(elfs) -> None:
    """With -icount shift=0 the SELFTEST tick count is the same run to run (1 tick = 40 instructions)."""
    ticks = []
    for _ in range(2):
        with QemuBoard("mps2-an500", elf=elfs["mps2-an500"], icount=True) as board, BoardClient(board.endpoint) as c:
            ticks.append(c.selftest()["ticks"])
    assert ticks[0] == ticks[1] > 0


def test_stack_overflow_hits_the_mpu_guard(tmp_path: Path) -> None:
    """A test build's command 0x7F recurses 16 KB deep (stack: 8 KB): the guard faults, the board says so."""
    require_cmd("arm-none-eabi-gcc", "qemu-system-arm", "make")
    r = subprocess.run(["make", "-s", "-C", str(FIRMWARE), f"BUILD={tmp_path}", "ARM_EXTRA=-DTF_FAULT_TEST",
                        "qemu-an500"], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    with QemuBoard("mps2-an500", elf=tmp_path / "an500" / "tinyfleet.elf") as board, \
            BoardClient(board.endpoint, timeout=10) as c:
        c.ping()
        with pytest.raises(BoardError) as e:
            c.request(0x7F)
    assert e.value.status == frames.Status.ERR_INTERNAL


def test_stored_samples_train_bit_exact(elfs) -> None:
    """Protocol v2: the samples go to the board's store once (STORE_SAMPLES, several per frame) and TRAIN_LIST
    names stored slots; the board's state equals the golden reference (step s trains on sample s % n)."""
    from tests.firmware.conftest import PLAN_VECTORS, PlanVector

    for name in ("tiny", "text", "imu"):
        v = PlanVector.read(PLAN_VECTORS / f"{name}.tfv")
        nb = len(v.samples[0])
        with QemuBoard("mps2-an500", elf=elfs["mps2-an500"]) as board, BoardClient(board.endpoint, timeout=60) as c:
            # Prepare: the plan, then every sample into slots 3, 4, ... (records in reverse: slot 3 + n - 1 - i)
            c.load_plan(v.plan)
            cap = c.store_samples(0, [], nb)["sample_capacity"]
            n = len(v.samples)
            order = list(zip(v.samples, v.labels))[::-1]
            st = c.store_samples(3, [(s, int(y)) for s, y in order], nb)
            slot = {i: 3 + n - 1 - i for i in range(n)}
            # Execute
            tr = c.train_list([slot[s % n] for s in range(v.steps)], v.lr_m, v.lr_e, round_id=1)
            state, stats = c.state(), c.stats()
        # Assert
        assert cap >= n and st["samples_stored"] == n and st["received"] == n * (4 + nb + (-nb % 4)), name
        assert tr["steps_done"] == v.steps and tr["correct"] == sum(v.correct), name
        assert state["state_hash"] == v.state_hash, f"{name}: stored-sample training differs from the reference"
        assert stats["samples_held"] == n


def test_stored_samples_refusals(elfs) -> None:
    """TRAIN_LIST of an empty slot, a batch past the store, a batch that is not whole records: refused, nothing
    trained."""
    from tests.firmware.conftest import PLAN_VECTORS, PlanVector

    v = PlanVector.read(PLAN_VECTORS / "tiny.tfv")
    nb = len(v.samples[0])
    with QemuBoard("mps2-an386", elf=elfs["mps2-an386"]) as board, BoardClient(board.endpoint, timeout=30) as c:
        with pytest.raises(BoardError) as no_plan:
            c.store_samples(0, [(v.samples[0], 1)], nb)
        c.load_plan(v.plan)
        cap = c.store_samples(0, [], nb)["sample_capacity"]
        c.store_samples(0, [(v.samples[0], int(v.labels[0]))], nb)
        before = c.state()
        with pytest.raises(BoardError) as empty:
            c.train_list([0, 5], v.lr_m, v.lr_e)
        with pytest.raises(BoardError) as past:
            c.store_samples(cap - 1, [(v.samples[0], 0), (v.samples[1], 0)], nb)
        rec = frames.sample_records([(v.samples[0], 0)], nb) + b"\0"  # not whole records
        bad = c.request(frames.Command.STORE_SAMPLES, frames.pack("req", frames.Command.STORE_SAMPLES, bytes(rec),
                                                                  first_slot=1, offset=0, total=len(rec)))
        after = c.state()
    assert no_plan.value.status == frames.Status.ERR_STATE
    assert empty.value.status == frames.Status.ERR_STATE and "5" in str(empty.value)
    assert past.value.status == frames.Status.ERR_NO_MEMORY
    assert bad.code == frames.Status.ERR_BAD_PAYLOAD
    assert after["state_hash"] == before["state_hash"] and after["steps_total"] == before["steps_total"]


def test_plan_provisioned_in_the_flash_image(elfs, tmp_path: Path) -> None:
    """A plan written into the plan store with the firmware image (QEMU's generic loader) is adopted at boot after
    the full plan reader; a corrupted one is not (the board waits for LOAD_PLAN)."""
    from device_agent.board import elf_load_ranges, elf_symbol
    from tests.firmware.conftest import PLAN_VECTORS, PlanVector

    v = PlanVector.read(PLAN_VECTORS / "imu.tfv")
    elf = elfs["mps2-an500"]
    at = elf_symbol(elf, "__store_start")
    assert not any(lo < at + len(v.plan) and at < hi for lo, hi in elf_load_ranges(elf))
    good, bad = tmp_path / "good.ttp", tmp_path / "bad.ttp"
    good.write_bytes(v.plan)
    bad.write_bytes(v.plan[:-1] + bytes([v.plan[-1] ^ 1]))  # CRC mismatch
    nb, n = len(v.samples[0]), len(v.samples)
    with QemuBoard("mps2-an500", elf=elf, preload=[(good, at)]) as board, BoardClient(board.endpoint) as c:
        held = c.stats()["plan_bytes"]
        c.store_samples(0, [(s, int(y)) for s, y in zip(v.samples, v.labels)], nb)
        c.train_list([s % n for s in range(v.steps)], v.lr_m, v.lr_e)
        state = c.state()
    with QemuBoard("mps2-an500", elf=elf, preload=[(bad, at)]) as board, BoardClient(board.endpoint) as c:
        refused = c.stats()["plan_bytes"]
        c.load_plan(v.plan)
        loaded = c.stats()["plan_bytes"]
    assert held == len(v.plan) and state["state_hash"] == v.state_hash
    assert refused == 0 and loaded == len(v.plan)
