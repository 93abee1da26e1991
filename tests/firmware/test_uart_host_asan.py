"""The board's UART side under ASan/UBSan on the host (firmware/tests/uart/uart_host.c): hostile frame sequences.

Regression for the LOAD_UPDATE size check that wrapped in 32 bits (`upd_off + total > samples_at` with
total = 2^32 - 64): the chunks that followed were accepted and memcpy wrote past the plan store. The store of the
host build is one malloc of exactly its size, so any write past it is an ASan report and a non-zero exit.
"""

from __future__ import annotations

import subprocess

import pytest

from device_agent.wire.frames import Command, Deframer, Frame, Status, blob_chunks, encode_frame, pack, unpack
from tests.conftest import ROOT, require_cmd
from tests.firmware.conftest import PLAN_VECTORS, PlanVector

FIRMWARE = ROOT / "firmware"
STORE = 64 * 1024
CHUNK = 504  # the largest LOAD_* chunk (512-byte payload - offset, total)


@pytest.fixture(scope="module")
def uart_host(tmp_path_factory):
    require_cmd("gcc", "make")
    build = tmp_path_factory.mktemp("uart")
    r = subprocess.run(["make", "-s", "-C", str(FIRMWARE), f"BUILD={build}", "uart-host"], check=False,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return build / "host" / "uart_host"


def run_board(exe, frames: list[Frame]) -> tuple[list[Frame], subprocess.CompletedProcess]:
    line = b"".join(encode_frame(f) for f in frames)
    r = subprocess.run([str(exe), str(STORE)], input=line, capture_output=True, check=False, timeout=120)
    replies = Deframer().feed(r.stdout)
    assert all(isinstance(f, Frame) for f in replies), replies
    return replies, r


def huge_total_sequence(cmd: Command, total: int, seq0: int) -> list[Frame]:
    """offset 0 with a huge declared total, then enough follow-up chunks to run past the whole store."""
    n = STORE // CHUNK + 4
    return [Frame((seq0 + i) & 0xFFFF, cmd, pack("req", cmd, bytes([0xA5]) * CHUNK, offset=i * CHUNK, total=total))
            for i in range(n)]


@pytest.mark.parametrize("total", [2**32 - 64, 2**32 - 1, 2**32 - 512])
def test_load_update_with_wrapping_total_is_refused_without_writing_past_the_store(uart_host, total):
    # Prepare: a good plan first (LOAD_UPDATE needs one), then the hostile sequence, then STATE_HASH
    plan = PlanVector.read(PLAN_VECTORS / "tiny.tfv").plan
    frames = blob_chunks(Command.LOAD_PLAN, plan)
    hostile = huge_total_sequence(Command.LOAD_UPDATE, total, len(frames))
    frames += hostile + [Frame(0x7000, Command.STATE_HASH, b"")]
    # Execute
    replies, r = run_board(uart_host, frames)
    # Assert: no sanitizer report; the plan loaded; the first hostile chunk is refused for its size and every
    # follow-up chunk is out of sequence; the plan survives
    assert r.returncode == 0 and b"Sanitizer" not in r.stderr, r.stderr.decode()[-3000:]
    assert len(replies) == len(frames)
    n_plan = len(frames) - len(hostile) - 1
    assert [f.code for f in replies[:n_plan]] == [Status.OK] * n_plan
    first = replies[n_plan]
    assert first.code == Status.ERR_NO_MEMORY, first
    fields, _ = unpack("err", Status.ERR_NO_MEMORY, first.payload)
    assert 0 < fields["capacity"] < STORE
    assert {f.code for f in replies[n_plan + 1:-1]} == {Status.ERR_STATE}
    assert replies[-1].code == Status.OK


@pytest.mark.parametrize("cmd", [Command.LOAD_PLAN, Command.LOAD_UPDATE])
def test_huge_totals_without_a_plan_never_write_past_the_store(uart_host, cmd):
    # Prepare: no plan; LOAD_PLAN with a total above the store, LOAD_UPDATE (needs a plan)
    frames = huge_total_sequence(cmd, 2**32 - 64, 0)
    # Execute
    replies, r = run_board(uart_host, frames)
    # Assert
    assert r.returncode == 0 and b"Sanitizer" not in r.stderr, r.stderr.decode()[-3000:]
    expected = Status.ERR_NO_MEMORY if cmd == Command.LOAD_PLAN else Status.ERR_STATE
    assert replies[0].code == expected
    assert all(f.code != Status.OK for f in replies)
