"""What the Python readers allocate is bounded by what the plan allows (or by the input's own length), never by a
size field that has not been checked yet: each test feeds a small hostile input and measures the reader's peak
allocation with tracemalloc (numpy reports its buffers to it).
"""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.board import BoardClient, BoardError
from device_agent.protocol import CodecError, WireDeviceCodec
from device_agent.wire import frames as F
from device_agent.wire import plan_hash, plan_to_bytes
from device_agent.wire.delta import DELTA, delta_from_bytes, delta_from_records, max_records_bytes
from device_agent.wire.envelope import Builder, Signer, Verifier, open_blob, seal
from device_agent.wire.errors import WireError, WireFormatError
from device_agent.wire.messages import MAX_PAYLOAD, MessageError, parse
from device_agent.wire.plan import PLAN, plan_from_bytes
from device_agent.wire.sparse import Enc, shared_numel
from device_agent.wire.update import UPDATE, ModelUpdate
from tests.fixtures.tiny import tiny_plan

KEY = Ed25519PrivateKey.generate()
SIGN, VERIFY = Signer.ed25519(KEY), Verifier.ed25519(KEY.public_key())
PLAN_ = tiny_plan()
PLAN_HASH = plan_hash(PLAN_)
SHARED = shared_numel(PLAN_)  # tensor id -> numel
PLAN_BYTES = 8 * sum(SHARED.values())  # the int64 expansion of every shared tensor: what an update may cost


def peak_of(fn) -> tuple[int, object]:
    """(peak bytes traced while ``fn()`` ran, what it returned or raised)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        try:
            out: object = fn()
        except Exception as e:  # noqa: BLE001  NOTE: the caller asserts on the exception
            out = e
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, out


def filled_gaps_update(tid: int, numel: int) -> bytes:
    """A signed v2 FULL update with one FILLED_GAPS record naming ``numel`` and listing one coordinate."""
    b = Builder()
    b.pack("IIB3x32s32sI", 0, 1, 1, PLAN_HASH, bytes(32), 1)
    b.pack("HBBII", tid, int(Enc.FILLED_GAPS), 1, numel, 1)
    b.buf += b"\x05\0\0\0\x03\0\0\0"  # gap 5 (padded), value 3 (padded)
    return seal(UPDATE, bytes(b.buf), SIGN)


def test_update_record_larger_than_the_plan_is_refused_before_expanding():
    # Prepare: the blob: a small signed update whose one record claims 2**24 values
    tid = min(SHARED)
    blob = filled_gaps_update(tid, 2**24)
    codec = WireDeviceCodec(PLAN_, VERIFY)
    assert len(blob) < 200
    # Execute
    peak, err = peak_of(lambda: codec.decode_update(blob))
    # Assert: PLAN_MISMATCH, and nowhere near the 128 MiB the record asks for
    assert isinstance(err, CodecError) and err.code == WireError.PLAN_MISMATCH, err
    assert peak < 256 * 1024, peak


@pytest.mark.parametrize("tid", [0, 0xFFFF])
def test_update_record_for_a_tensor_outside_the_plan_is_plan_mismatch(tid):
    # Prepare: tensor 0 is the plan's input (not trainable); 0xFFFF does not exist
    blob = filled_gaps_update(tid, 2**24)
    # Execute
    peak, err = peak_of(lambda: ModelUpdate.from_bytes(blob, verify=VERIFY, plan=PLAN_, plan_hash=PLAN_HASH))
    # Assert
    assert isinstance(err, WireFormatError) and err.code == WireError.PLAN_MISMATCH, err
    assert peak < 256 * 1024, peak


def test_update_for_another_plan_is_refused_before_its_records():
    # Prepare: the same record, under another plan hash
    b = Builder()
    b.pack("IIB3x32s32sI", 0, 1, 1, b"\x01" * 32, bytes(32), 1)
    b.pack("HBBII", min(SHARED), int(Enc.FILLED_GAPS), 1, 2**24, 1)
    b.buf += b"\x05\0\0\0\x03\0\0\0"
    blob = seal(UPDATE, bytes(b.buf), SIGN)
    # Execute
    peak, err = peak_of(lambda: ModelUpdate.from_bytes(blob, verify=VERIFY, plan=PLAN_, plan_hash=PLAN_HASH))
    # Assert
    assert isinstance(err, WireFormatError) and err.code == WireError.PLAN_MISMATCH and "plan" in str(err)
    assert peak < 256 * 1024, peak


def test_valid_update_within_the_plan_costs_what_the_plan_allows():
    # Prepare: a real FULL update of the plan
    from device_agent.wire.update import trainable_state, update_from_state

    blob = update_from_state(PLAN_, trainable_state(PLAN_), base_version=0, new_version=1).to_bytes(SIGN)
    # Execute
    peak, upd = peak_of(lambda: ModelUpdate.from_bytes(blob, verify=VERIFY, plan=PLAN_, plan_hash=PLAN_HASH))
    # Assert
    assert isinstance(upd, ModelUpdate) and sorted(upd.tensors) == sorted(SHARED)
    assert peak < 4 * PLAN_BYTES + 4 * len(blob) + 64 * 1024, (peak, PLAN_BYTES)


def _delta(records: bytes, n: int, phash: bytes = PLAN_HASH) -> bytes:
    b = Builder()
    b.pack("IIQ32s32sI", 1, 1, 1, bytes(32), phash, 3)
    b.buf += b"d01"
    b.pad()
    b.pack("I", n)
    b.buf += records
    return seal(DELTA, bytes(b.buf))


def test_delta_bitmap_record_larger_than_the_plan_is_refused_before_unpacking():
    # Prepare: a SPARSE_BITMAP record claiming 8 * 64 KiB coordinates (its bitmap is in the blob: 64 KiB)
    numel = 8 * 65536
    rec = struct.pack("<HBBII", min(SHARED), int(Enc.SPARSE_BITMAP), 1, numel, 1)
    bitmap = b"\x01" + bytes(numel // 8 - 1)
    blob = _delta(rec + bitmap + b"\x05\0\0\0", 1)
    # Execute
    bounded, err = peak_of(lambda: delta_from_bytes(blob, plan=PLAN_, plan_hash=PLAN_HASH))
    unbounded, _ = peak_of(lambda: delta_from_bytes(blob))
    # Assert: with the plan the reader stops at the record header; without it, it unpacks numel bytes
    assert isinstance(err, WireFormatError) and err.code == WireError.PLAN_MISMATCH, err
    assert bounded < len(blob) + 16 * 1024 and unbounded >= numel, (bounded, unbounded, len(blob))


def test_delta_for_another_plan_is_still_read_within_its_own_length():
    # Prepare: a canonical bitmap record (every coordinate listed) under another plan hash, of a size the plan
    # does not have: read with format bounds only (the coordinator refuses it as WRONG_PLAN)
    numel = 8 * 4096
    rec = struct.pack("<HBBII", min(SHARED), int(Enc.SPARSE_BITMAP), 1, numel, numel)
    blob = _delta(rec + b"\xff" * (numel // 8) + b"\x05" * numel, 1, phash=b"\x02" * 32)
    # Execute
    peak, d = peak_of(lambda: delta_from_bytes(blob, plan=PLAN_, plan_hash=PLAN_HASH))
    # Assert
    assert not isinstance(d, Exception) and d.plan_hash == b"\x02" * 32
    assert peak < 16 * len(blob) + 64 * 1024, peak


def test_board_records_are_checked_against_the_plan():
    # Prepare: GET_DELTA records (v1 layout) naming a tensor size the plan does not have
    rec = struct.pack("<IBBHII", min(SHARED), 1, 1, 0, 3, 3) + b"\x01\x02\x03\0"
    records = struct.pack("<I", 1) + rec
    # Execute
    with pytest.raises(WireFormatError) as e:
        delta_from_records(records, device_id="board", round_id=0, base_hash=bytes(32), plan_hash=PLAN_HASH,
                           counter=1, sample_count=1, plan=PLAN_)
    # Assert
    assert e.value.code == WireError.PLAN_MISMATCH


class _LyingBoard(BoardClient):
    """A board whose GET_DELTA answers announce ``totals`` (one per chunk) with ``chunk`` bytes each."""

    def __init__(self, totals: list[int], chunk: int):  # NOTE: no socket; only _ok is used
        self.totals, self.chunk, self.calls = list(totals), chunk, 0

    def _ok(self, cmd, payload, what):
        self.calls += 1
        total = self.totals[min(self.calls - 1, len(self.totals) - 1)]
        return {"total": total}, b"\x01" * self.chunk


@pytest.mark.parametrize(("totals", "chunk", "words"), [
    ([2**32 - 1], 500, "plan allows"),  # 4 GiB announced: refused at the first chunk
    ([1000, 2000], 500, "changed"),  # the total grows between chunks
    ([700], 500, "announced"),  # more bytes than announced
])
def test_board_delta_records_bounded_by_the_plan(totals, chunk, words):
    # Prepare
    board = _LyingBoard(totals, chunk)
    bound = max_records_bytes(PLAN_)
    # Execute
    peak, err = peak_of(lambda: board.delta_records(0, max_total=max(bound, 1500)))
    # Assert
    assert isinstance(err, BoardError) and words in str(err), err
    assert board.calls <= 2 and peak < 64 * 1024


def test_plan_header_counts_are_checked_against_the_bytes_before_allocating():
    # Prepare: a valid plan whose tensor count says 65535 (the table would be 2.8 MB; the blob is small)
    blob = plan_to_bytes(PLAN_)
    body = bytearray(open_blob(PLAN, blob, Verifier.unsigned()))
    body[0:4] = struct.pack("<I", 65535)
    bad = seal(PLAN, bytes(body))
    # Execute
    peak, err = peak_of(lambda: plan_from_bytes(bad, verify=Verifier.unsigned()))
    # Assert
    assert isinstance(err, WireFormatError) and err.code == WireError.TRUNCATED, err
    assert peak < 4 * len(bad) + 64 * 1024, (peak, len(bad))


def test_envelope_length_field_allocates_nothing():
    # Prepare: a header claiming a 2 GiB blob in 40 bytes
    blob = bytearray(seal(UPDATE, b"\0" * 8))
    blob[8:12] = struct.pack("<I", 0x7FFFFFFF)
    # Execute
    peak, err = peak_of(lambda: ModelUpdate.from_bytes(bytes(blob), verify=Verifier.unsigned(), plan=PLAN_,
                                                       plan_hash=PLAN_HASH))
    # Assert
    assert isinstance(err, WireFormatError) and err.code in (WireError.TRUNCATED, WireError.BAD_LENGTH), err
    assert peak < 16 * 1024


def test_frame_reader_buffer_stays_bounded_on_endless_bytes():
    # Prepare: 256 KiB without a frame delimiter, then one
    reader = F.Deframer()
    junk = b"\x01" * (1 << 18) + b"\0"
    # Execute
    peak, out = peak_of(lambda: [reader.feed(junk[i:i + 4096]) for i in range(0, len(junk), 4096)])
    # Assert
    errors = [e for batch in out for e in batch]
    assert errors and all(isinstance(e, WireFormatError) and e.code == WireError.FRAME_TOO_LONG for e in errors)
    assert peak < 64 * 1024, peak


def test_control_message_parse_is_bounded_by_its_size_limit():
    # Prepare: the largest payload parse accepts to look at, nested as deep as it goes
    payload = b"[" * MAX_PAYLOAD
    # Execute
    peak, err = peak_of(lambda: parse(payload))
    # Assert
    assert isinstance(err, MessageError)
    assert peak < 64 * 1024, peak


def test_plan_bound_helper_covers_a_real_dense_delta():
    # Prepare: every coordinate of every shared tensor changed by 300 (int16 values): the biggest real records
    from device_agent.wire.delta import encode_delta
    from device_agent.wire.update import trainable_state

    old = trainable_state(PLAN_)
    new = {tid: (v.astype(np.int64) + 300).astype(np.int32) if tid in SHARED else v for tid, v in old.items()}
    # Execute
    d = encode_delta(PLAN_, {k: v.astype(np.int64) for k, v in old.items()}, new, device_id="d", round_id=1,
                     base_hash=bytes(32), counter=1, sample_count=1, plan_hash=PLAN_HASH)
    blob = d.to_bytes(version=1)
    # Assert
    assert len(blob) - 40 < max_records_bytes(PLAN_)
