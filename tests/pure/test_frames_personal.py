"""UART payloads of the personal command family (device_agent/wire/frames_personal.py): merged into the frame
table, round-trip through frames.pack / unpack, and u16 lists refused past their limit."""

from __future__ import annotations

import pytest

from device_agent.wire import frames
from device_agent.wire import frames_personal as fp
from device_agent.wire.errors import WireFormatError


def test_family_is_merged_into_the_frame_table() -> None:
    for code in (fp.SETUP, fp.PERSONALIZE, fp.HASH):
        assert code in frames.PERSONAL_COMMANDS
        assert ("req", code) in frames.PAYLOADS and ("resp", code) in frames.PAYLOADS


def test_setup_and_personalize_round_trip() -> None:
    tail = fp.list_payload([3, 7, 9], fp.list_max(fp.SETUP, frames.MAX_PAYLOAD))
    raw = frames.pack("req", fp.SETUP, tail, method=fp.METHOD_CODES["ditto"], reserved=0, count=3, lam_q15=164)
    fields, got = frames.unpack("req", fp.SETUP, raw)
    assert fields == {"method": 1, "reserved": 0, "count": 3, "lam_q15": 164} and got == tail
    assert len(raw) == 8 + 6  # <BBHi + 3 x u16, as tf_proto_personal.c reads it
    raw = frames.pack("req", fp.PERSONALIZE, fp.list_payload([0, 65535], 250), lr_m=16384, lr_e=-7, flags=1,
                      reserved=0, count=2)
    assert frames.unpack("req", fp.PERSONALIZE, raw)[0]["lr_e"] == -7 and len(raw) == 12 + 4
    resp = frames.pack("resp", fp.HASH, personal_hash=b"\x01" * 32, method=3, has_copy=1, reserved=0,
                       sram_bytes=332, personal_steps=21)
    assert len(resp) == 44 and frames.unpack("resp", fp.HASH, resp)[0]["sram_bytes"] == 332
    with pytest.raises(WireFormatError):
        frames.unpack("resp", fp.HASH, resp[:-1])


def test_lists_are_bounded() -> None:
    assert fp.list_max(fp.SETUP, frames.MAX_PAYLOAD) == fp.SETUP_MAX_IDS
    assert fp.list_max(fp.PERSONALIZE, frames.MAX_PAYLOAD) == (frames.MAX_PAYLOAD - 12) // 2
    with pytest.raises(ValueError, match="at most 2"):
        fp.list_payload([1, 2, 3], 2)
    with pytest.raises(ValueError):
        fp.list_payload([70000], 10)
