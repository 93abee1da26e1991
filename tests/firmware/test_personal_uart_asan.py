"""The personal command family (firmware/src/proto/tf_proto_personal.c, src/device/tf_device_personal.c) under
ASan/UBSan on the host build of the board's UART side: malformed and out-of-order PERSONAL_* frames get their
error status, nothing is written out of bounds, and a good sequence personalizes (the hash moves)."""

from __future__ import annotations

import struct

from device_agent.engine.personal import method_ids
from device_agent.wire import frames_personal as fp
from device_agent.wire.envelope import Verifier
from device_agent.wire.frames import Command, Frame, Status, blob_chunks, pack, unpack
from device_agent.wire.plan import plan_from_bytes
from tests.firmware.conftest import PLAN_VECTORS, PlanVector
from tests.firmware.test_uart_host_asan import run_board, uart_host  # noqa: F401  (fixture)


def _setup(seq, method, ids, lam=0, count=None) -> Frame:
    tail = struct.pack(f"<{len(ids)}H", *ids)
    n = len(ids) if count is None else count
    return Frame(seq, fp.SETUP, struct.pack("<BBHi", fp.METHOD_CODES.get(method, method), 0, n, lam) + tail)


def _personalize(seq, slots, lr_m=16384, lr_e=-4, flags=0, count=None) -> Frame:
    n = len(slots) if count is None else count
    return Frame(seq, fp.PERSONALIZE, struct.pack("<iiBBH", lr_m, lr_e, flags, 0, n) +
                 struct.pack(f"<{len(slots)}H", *slots))


def test_personal_frames_hostile_and_good(uart_host) -> None:  # noqa: F811
    # Prepare: the tiny golden plan, its head ids, two stored samples
    vec = PlanVector.read(PLAN_VECTORS / "tiny.tfv")
    plan = plan_from_bytes(vec.plan, verify=Verifier.unsigned())
    head = method_ids(plan, "head")
    nbytes = len(vec.samples[0])
    frames = [Frame(1, fp.HASH, b""), _setup(2, "head", head)]  # before any plan: ERR_STATE
    frames += blob_chunks(Command.LOAD_PLAN, vec.plan, first_seq=10)
    rec = b"".join(struct.pack("<i", lab) + s + bytes(-len(s) % 4) for s, lab in zip(vec.samples[:2], vec.labels))
    frames.append(Frame(100, Command.STORE_SAMPLES, pack("req", Command.STORE_SAMPLES, rec, first_slot=0, offset=0,
                                                         total=len(rec))))
    hostile = [
        _personalize(101, [0]),  # no setup yet: ERR_STATE
        _setup(102, "head", head, count=60000),  # count disagrees with the length
        _setup(103, "head", list(reversed(head))),  # not ascending
        _setup(104, "head", [60000]),  # no such tensor
        _setup(105, 9, head),  # no such method
        _setup(106, "head", head, lam=40000),  # lam out of range
        Frame(107, fp.SETUP, b"\x03\x00"),  # truncated
        Frame(108, fp.HASH, b"\x00"),  # HASH takes nothing
        Frame(109, 0x2F, b""),  # unserved code of the family
    ]
    good = [_setup(110, "head", head), _personalize(111, [0, 1, 0]), Frame(112, fp.HASH, b"")]
    after = [
        _personalize(113, [0], count=500),  # count disagrees with the length
        _personalize(114, [5000]),  # slot beyond the store
        _personalize(115, [7]),  # empty slot: ERR_STATE
        _personalize(116, [0], lr_m=0),  # bad lr
        _personalize(117, [0], flags=2),  # unknown flag
    ]
    frames += hostile + good + after
    # Execute
    replies, r = run_board(uart_host, frames)
    # Assert
    assert r.returncode == 0 and b"Sanitizer" not in r.stderr, r.stderr.decode()[-3000:]
    code = {f.seq: f.code for f in replies}
    assert code[1] == code[2] == Status.ERR_STATE
    assert code[101] == Status.ERR_STATE
    assert [code[s] for s in range(102, 108)] == [Status.ERR_BAD_PAYLOAD] * 6
    assert code[108] == Status.ERR_BAD_PAYLOAD and code[109] == Status.ERR_UNKNOWN_COMMAND
    assert code[110] == code[111] == code[112] == Status.OK
    got = {f.seq: f for f in replies}
    setup = unpack("resp", fp.SETUP, got[110].payload)[0]
    assert setup["sram_bytes"] == sum(-(-plan.tensors[i].nbytes // 4) * 4 for i in head) and setup["flash_bytes"] == 0
    assert unpack("resp", fp.PERSONALIZE, got[111].payload)[0]["personal_steps"] == 3
    h = unpack("resp", fp.HASH, got[112].payload)[0]
    assert h["has_copy"] == 1 and h["method"] == fp.METHOD_CODES["head"] and h["personal_steps"] == 3
    assert [code[s] for s in range(113, 118)] == [Status.ERR_BAD_PAYLOAD, Status.ERR_BAD_PAYLOAD, Status.ERR_STATE,
                                                  Status.ERR_BAD_PAYLOAD, Status.ERR_BAD_PAYLOAD]
    assert nbytes > 0
