"""Delta: encode/decode round trip, narrowest dtype, deterministic top-k, personal tensors skipped, exact sizes."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

from device_agent.engine import ir
from device_agent.wire import (
    Delta,
    Signer,
    Verifier,
    WireError,
    WireFormatError,
    delta_from_bytes,
    delta_from_records,
    delta_support,
    delta_to_dense,
    encode_delta,
    encode_tensor,
    residual_after,
    topk_indices,
)
from device_agent.wire import sparse as S
from device_agent.wire.delta import delta_to_flat, shared_layout
from device_agent.wire.envelope import Cursor, SigAlg
from device_agent.wire.sparse import Enc

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
_spec = importlib.util.spec_from_file_location("wire_vectors_generate", VECTORS / "generate.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)
HDR = {"device_id": "dev-7", "round_id": 9, "base_hash": bytes(range(32)), "counter": 2**63 + 1, "sample_count": 40}


def _old_new(plan):
    return {t.id: np.array(t.data) for t in plan.trainable}, gen.new_state(plan)


def test_round_trip_dense_and_to_dense():
    plan = gen.golden_plan()
    old, new = _old_new(plan)
    d = encode_delta(plan, old, new, **HDR)
    blob = d.to_bytes()
    back = delta_from_bytes(blob)
    dense = delta_to_dense(back, plan)
    assert (back.device_id, back.round_id, back.counter, back.sample_count) == ("dev-7", 9, 2**63 + 1, 40)
    assert sorted(dense) == [2, 3]  # personal fc.b (8) never travels
    for tid in dense:
        assert np.array_equal(dense[tid], new[tid].astype(np.int64) - old[tid])
    assert back.to_bytes() == blob
    assert d.size_report().total == len(blob)
    assert [td.dtype for td in back.tensors] == [ir.DType.INT16, ir.DType.INT32]  # conv.w has a 254 step


def test_size_report_with_signature():
    plan = gen.golden_plan()
    d = encode_delta(plan, *_old_new(plan), **HDR, top_k=2)
    blob = d.to_bytes(Signer.hmac_sha256(b"k" * 32))
    assert d.size_report(SigAlg.HMAC_SHA256).total == len(blob)
    delta_from_bytes(blob, verify=Verifier.hmac_sha256(b"k" * 32))


def test_topk_is_deterministic_with_index_tie_break():
    v = np.array([0, 5, -5, 3, -7, 5, 0, 1])
    assert topk_indices(v, 3).tolist() == [1, 2, 4]  # |-7|, then the 5s at 1 and 2 (lower index first)
    assert topk_indices(v, 100).tolist() == [1, 2, 3, 4, 5, 7]  # zeros are never selected
    assert topk_indices(np.zeros(4, np.int64), 2).tolist() == []


def test_topk_only_when_smaller():
    big = np.arange(1, 101, dtype=np.int64)
    assert encode_tensor(0, big, k=10).indices is not None
    assert encode_tensor(0, big, k=60).indices is not None  # 16-byte bitmap + 60 values < 100 dense bytes
    assert encode_tensor(0, big, k=90).indices is None  # 16 + 92 >= 100: dense carries everything


def test_index_coding_is_the_smallest():
    # Prepare: a sparse and a dense choice of 2000 coordinates
    v = np.zeros(2000, np.int64)
    v[[3, 700, 1999]] = [1, -2, 3]
    w = np.zeros(2000, np.int64)
    w[::4] = 1
    # Execute
    few, many = encode_tensor(0, v, k=3), encode_tensor(0, w, k=500)
    # Assert
    assert few.encoding == Enc.SPARSE_GAPS and few.nbytes == 12 + 8 + 4  # gaps 3, 0xB8 0x05, 0xA2 0x0A
    assert many.encoding == Enc.SPARSE_BITMAP and many.nbytes == 12 + 252 + 500
    for r in (few, many):
        d = Delta("dev", 1, bytes(32), bytes(32), 0, 1, [r])
        back = delta_from_bytes(d.to_bytes()).tensors[0]
        assert np.array_equal(back.indices, r.indices) and np.array_equal(back.values, r.values)
        assert len(d.to_bytes()) == d.size_report().total


def test_every_coordinate_mode_lists_non_zeros_when_smaller():
    v = np.zeros(400, np.int64)
    v[5] = 9
    r = encode_tensor(0, v)
    assert r.encoding == Enc.FILLED_GAPS and r.filled  # unlisted coordinates are zero votes, not absent
    d = Delta("dev", 1, bytes(32), bytes(32), 0, 1, [encode_tensor(2, np.array([0, 0, 0, 0, 0, 4]))])
    assert d.tensors[0].encoding == Enc.DENSE  # 6 int8 values: 8 bytes, the bitmap form is 12 bytes


def test_v1_blobs_still_read_and_v1_writer_reproduces_them():
    plan = gen.golden_plan()
    old, new = _old_new(plan)
    d = encode_delta(plan, old, new, top_k={2: 3}, **HDR)
    v1 = d.to_bytes(version=1)
    back = delta_from_bytes(v1)
    assert v1[4:6] == b"\x01\x00" and back.to_bytes(version=1) == v1
    assert all(np.array_equal(a, b) for a, b in zip(delta_to_dense(back, plan).values(),
                                                   delta_to_dense(d, plan).values()))


def test_error_feedback_keeps_what_top_k_did_not_send():
    # Prepare
    plan = gen.golden_plan()
    old, new = _old_new(plan)
    full = {2: new[2].astype(np.int64).reshape(-1) - old[2].reshape(-1), 3: new[3].astype(np.int64) - old[3]}
    # Execute: round 1 sends the top 1 per tensor, round 2 (no new change) sends the top 1 of the residual
    d1 = encode_delta(plan, old, new, top_k=1, **HDR)
    r1 = residual_after(d1, plan, old, new)
    d2 = encode_delta(plan, old, old, top_k=1, residual=r1, **HDR)
    r2 = residual_after(d2, plan, old, old, r1)
    # Assert: sent + left == everything, at every step
    for tid in (2, 3):
        s1, s2 = delta_to_dense(d1, plan)[tid].reshape(-1), delta_to_dense(d2, plan)[tid].reshape(-1)
        assert np.array_equal(s1 + r1[tid], full[tid]) and np.array_equal(s1 + s2 + r2[tid], full[tid])
        assert np.count_nonzero(s1) <= 1


def test_error_feedback_clips_to_what_a_record_may_carry():
    plan = gen.golden_plan()
    old = {t.id: np.array(t.data) for t in plan.trainable}
    res = {2: np.full(6, 300, np.int64), 3: np.zeros(3, np.int64)}
    d = encode_delta(plan, old, old, residual=res, **HDR)
    assert delta_to_dense(d, plan)[2].max() == 254  # the coordinator's ±254 limit for int8 tensors
    assert (residual_after(d, plan, old, old, res)[2] == 46).all()


def test_topk_round_trip_and_support():
    plan = gen.golden_plan()
    old, new = _old_new(plan)
    d = delta_from_bytes(encode_delta(plan, old, new, top_k={2: 1}, **HDR).to_bytes())
    dense, support = delta_to_dense(d, plan), delta_support(d, plan)
    full = new[2].astype(np.int64) - old[2]
    assert support[2].sum() == 1 and support[3].all()
    assert np.array_equal(dense[2][support[2]], full[support[2]])
    assert (dense[2][~support[2]] == 0).all()


def test_records_section_alone():
    plan = gen.golden_plan()
    d = encode_delta(plan, *_old_new(plan), top_k=3, **HDR)
    for version in (1, 2):  # v1: what v1 firmware returns for GET_DELTA (the default)
        back = delta_from_records(d.records_bytes(version=version), device_id=d.device_id, round_id=d.round_id,
                                  base_hash=d.base_hash, plan_hash=d.plan_hash, counter=d.counter,
                                  sample_count=d.sample_count, version=version)
        assert back.to_bytes() == d.to_bytes()


@pytest.mark.parametrize("edit", ["plan", "personal", "numel", "range"])
def test_delta_that_does_not_fit_the_plan(edit):
    plan = gen.golden_plan()
    d = encode_delta(plan, *_old_new(plan), **HDR)
    code = WireError.PLAN_MISMATCH
    if edit == "plan":
        d.plan_hash = bytes(32)
    elif edit == "personal":
        d.tensors.append(encode_tensor(8, np.ones(4, np.int64)))
    elif edit == "numel":
        d.tensors[0] = encode_tensor(2, np.ones(5, np.int64))
    else:
        d.tensors[0] = encode_tensor(2, np.full(6, 300, np.int64))
        code = WireError.BAD_VALUE
    d = delta_from_bytes(d.to_bytes())
    for convert in (delta_to_dense, delta_to_flat):
        with pytest.raises(WireFormatError) as e:
            convert(d, plan)
        assert e.value.code == code


def test_writer_refusals():
    with pytest.raises(ValueError):
        Delta("a/b", 1, bytes(32), bytes(32), 0, 1).to_bytes()
    with pytest.raises(ValueError):
        Delta("dev", 1, bytes(32), bytes(32), 0, 0).to_bytes()
    with pytest.raises(ValueError):
        Delta("dev", 1, bytes(32), bytes(32), 0, 1, [encode_tensor(0, np.array([2**40]))]).to_bytes()


@pytest.mark.parametrize("top_k", [None, 1, {2: 2}])
def test_delta_to_flat_is_dense_and_support_in_shared_order(top_k):
    # Prepare
    plan = gen.golden_plan()
    d = delta_from_bytes(encode_delta(plan, *_old_new(plan), top_k=top_k, **HDR).to_bytes())
    shared = [t for t in plan.trainable if not t.personal]
    # Execute
    values, mask = delta_to_flat(d, plan)
    again = delta_to_flat(d, plan, plan_hash=d.plan_hash, layout=shared_layout(plan))
    # Assert
    dense, support = delta_to_dense(d, plan), delta_support(d, plan)
    assert values.dtype == np.int64 and mask.dtype == bool and values.shape == (sum(t.numel for t in shared),)
    assert np.array_equal(values, np.concatenate([dense[t.id].reshape(-1) for t in shared]))
    recorded = {td.tensor_id for td in d.tensors}
    votes = np.concatenate([np.full(t.numel, t.id in recorded) for t in shared])
    assert np.array_equal(mask, votes)  # every coordinate of a sent tensor: top-k silence is a 0 vote
    assert np.all(mask >= np.concatenate([support[t.id].reshape(-1) for t in shared]))
    assert np.array_equal(again[0], values) and np.array_equal(again[1], mask)


def _forged(numel: int, enc: Enc, width: int, values, indices=()) -> bytes:
    """One v2 record in exactly the encoding and width asked for, canonical or not."""
    idx = np.asarray(indices, np.int64)
    out = bytearray(struct.pack("<HBBII", 4, int(enc), {1: 1, 2: 2, 4: 3}[width], numel, len(values)))
    if enc in S.BITMAP:
        out += S.encode_bitmap(numel, idx)
    elif enc != Enc.DENSE:
        out += S.encode_varints(S.gaps_of(idx))
    out += bytes(-len(out) % 4) + np.asarray(values, f"<i{width}").tobytes()
    return bytes(out + bytes(-len(out) % 4))


def _read(raw: bytes):
    return S.read_record(Cursor(memoryview(raw), "test", base=0), "record", frozenset(Enc))


@pytest.mark.parametrize("raw", [
    _forged(2000, Enc.SPARSE_BITMAP, 1, [1, 2], [3, 1999]),  # gaps: 4 bytes, bitmap: 252
    _forged(16, Enc.FILLED_GAPS, 1, [1, 2], [0, 15]),  # tie (4 and 4 bytes): bitmap
    _forged(400, Enc.DENSE, 1, [0] * 399 + [5]),  # FILLED_GAPS lists it in 12 + 4 + 4 bytes
    _forged(8, Enc.FILLED_BITMAP, 1, list(range(1, 9)), range(8)),  # 4 + 8 bytes, DENSE 8
    _forged(4, Enc.DENSE, 2, [1, -128, 127, 0]),  # fits int8
    _forged(4, Enc.DENSE, 4, [1, 2, 32767, -32768]),  # fits int16
    _forged(30000, Enc.SPARSE_GAPS, 1, [1, 0], [5, 29999]),  # a listed zero
], ids=["bitmap-not-smallest", "gaps-on-tie", "dense-not-smallest", "filled-not-smaller", "int16", "int32",
        "listed-zero"])
def test_reader_refuses_each_non_canonical_record(raw):
    with pytest.raises(WireFormatError) as e:
        _read(raw)
    assert e.value.code == WireError.NOT_CANONICAL


def test_reader_decodes_multibyte_gaps_and_sizes_them_exactly():
    # Prepare: gaps of 1, 2, 3 and 4 varint bytes; the bitmap of 2**25 coordinates would be 4 MiB
    idx = [0, 200, 200 + 2**14 + 1, 2**22 + 2**14, 2**25 - 1]
    raw = _forged(2**25, Enc.SPARSE_GAPS, 2, [7, -300, 1, 2, 3], idx)
    # Execute
    r = _read(raw)
    # Assert
    assert r.indices.tolist() == idx and r.values.tolist() == [7, -300, 1, 2, 3] and r.nbytes == len(raw)
    assert S.varint_total(np.asarray(idx)) == int(S.varint_sizes(S.gaps_of(idx)).sum())
