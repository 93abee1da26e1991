"""UART frames: COBS and CRC16 against known values, frame round trips, stream splitting, payload tables."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.wire import WireError, WireFormatError
from device_agent.wire import frames as F


def test_crc16_check_value():
    assert F.crc16_ccitt(b"123456789") == 0x29B1


@pytest.mark.parametrize("raw, enc", [
    (b"", b"\x01"), (b"\x00", b"\x01\x01"), (b"\x00\x00", b"\x01\x01\x01"), (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"), (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255)) + b"\x01"),
])
def test_cobs_known_values(raw, enc):
    assert F.cobs_encode(raw) == enc
    assert F.cobs_decode(enc) == raw


def test_cobs_random_round_trip_has_no_zero():
    rng = np.random.default_rng(0)
    for n in list(range(20)) + [253, 254, 255, 508, 517]:
        raw = rng.integers(0, 3, n).astype(np.uint8).tobytes() if n % 2 else rng.bytes(n)
        enc = F.cobs_encode(raw)
        assert 0 not in enc and F.cobs_decode(enc) == raw


def test_frame_round_trip_through_a_chunked_stream():
    # Prepare
    frames = [F.Frame(i, F.Command.PUSH_SAMPLE, bytes([i % 3]) * (i * 37 % 512)) for i in range(20)]
    stream = b"".join(F.encode_frame(f) for f in frames)
    # Execute: feed in odd-sized pieces
    d, got = F.Deframer(), []
    for i in range(0, len(stream), 7):
        got += d.feed(stream[i:i + 7])
    # Assert
    assert got == frames


def test_stream_recovers_after_a_bad_frame():
    good = F.encode_frame(F.Frame(5, F.Command.PING))
    out = F.Deframer().feed(b"\x07\x01\x00" + bytes(range(1, 256)) * 3 + b"\x00" + good)
    assert isinstance(out[0], WireFormatError) and out[0].code == WireError.BAD_COBS
    assert isinstance(out[1], WireFormatError) and out[1].code == WireError.FRAME_TOO_LONG
    assert out[2] == F.Frame(5, F.Command.PING)


def test_decode_refusals():
    with pytest.raises(WireFormatError) as e:
        F.decode_frame(F.cobs_encode(b"\x01\x00"))
    assert e.value.code == WireError.TRUNCATED
    raw = bytearray(F.cobs_decode(F.encode_frame(F.Frame(1, 2, b"abc"))[:-1]))
    raw[3] ^= 1
    with pytest.raises(WireFormatError) as e:
        F.decode_frame(F.cobs_encode(bytes(raw)))
    assert e.value.code == WireError.CRC_MISMATCH
    with pytest.raises(ValueError):
        F.encode_frame(F.Frame(1, 2, bytes(513)))


def test_payload_tables_round_trip():
    p = F.pack("req", F.Command.TRAIN, steps=20, lr_m=16384, lr_e=-20, round_id=7)
    assert F.unpack("req", F.Command.TRAIN, p) == ({"steps": 20, "lr_m": 16384, "lr_e": -20, "round_id": 7}, b"")
    p = F.pack("resp", F.Command.GET_DELTA, b"records", total=99)
    assert F.unpack("resp", F.Command.GET_DELTA, p) == ({"total": 99}, b"records")
    with pytest.raises(WireFormatError) as e:
        F.unpack("req", F.Command.TRAIN, p[:3])
    assert e.value.code == WireError.TRUNCATED
    with pytest.raises(WireFormatError) as e:
        F.unpack("req", F.Command.PING, b"x")
    assert e.value.code == WireError.TRAILING_BYTES
    with pytest.raises(WireFormatError) as e:
        F.unpack("req", 0x7E, b"")
    assert e.value.code == WireError.BAD_ENUM


def test_blob_chunks_cover_the_blob_in_order():
    blob = bytes(range(256)) * 5
    frames = F.blob_chunks(F.Command.LOAD_PLAN, blob, first_seq=0xFFFE)
    parts = [F.unpack("req", F.Command.LOAD_PLAN, fr.payload) for fr in frames]
    assert [fr.seq for fr in frames][:3] == [0xFFFE, 0xFFFF, 0]
    assert all(f["total"] == len(blob) for f, _ in parts)
    assert b"".join(t for _, t in parts) == blob
    assert [f["offset"] for f, _ in parts] == [0, 504, 1008]


def test_topk_from_permille():
    assert F.topk_from_permille(1000, 0) is None
    assert F.topk_from_permille(1000, 10) == 10 and F.topk_from_permille(5, 10) == 1


def test_sample_store_frames_round_trip():
    # STORE_SAMPLES batch records (label | bytes | pad4) and TRAIN_LIST slots (protocol v2)
    samples = [(bytes([1, 2, 3, 4, 5]), -3), (bytes(5), 6)]
    batch = F.sample_records(samples, 5)
    assert len(batch) == 2 * 12 and batch[:4] == (-3).to_bytes(4, "little", signed=True)
    assert F.read_sample_records(batch, 5) == samples
    p = F.pack("req", F.Command.STORE_SAMPLES, batch[:10], first_slot=4, offset=0, total=len(batch))
    assert F.unpack("req", F.Command.STORE_SAMPLES, p) == ({"first_slot": 4, "offset": 0, "total": 24}, batch[:10])
    p = F.train_list_payload([0, 7, 7, 65535], lr_m=16384, lr_e=-20, round_id=3)
    assert F.read_train_list(p) == ({"lr_m": 16384, "lr_e": -20, "round_id": 3, "count": 4}, [0, 7, 7, 65535])
    assert len(F.train_list_payload(list(range(F.TRAIN_LIST_MAX)), 1, 0)) <= F.MAX_PAYLOAD
    with pytest.raises(ValueError):
        F.train_list_payload(list(range(F.TRAIN_LIST_MAX + 1)), 1, 0)
    with pytest.raises(WireFormatError) as e:
        F.read_sample_records(batch[:-1], 5)
    assert e.value.code == WireError.BAD_LENGTH
    with pytest.raises(WireFormatError) as e:
        F.read_sample_records(batch[:-1] + b"\1", 5)
    assert e.value.code == WireError.RESERVED_NONZERO
    with pytest.raises(WireFormatError) as e:
        F.read_train_list(p[:-2])
    assert e.value.code == WireError.BAD_LENGTH
