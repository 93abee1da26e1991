"""The delta (uplink, .tfd): what one device learned in one round, as integer differences of its shared tensors.

One writer (:meth:`Delta.to_bytes`, built by :func:`encode_delta`), one reader (:func:`delta_from_bytes`);
layout in docs/formats.md, "Delta". Version 2 (written) carries each tensor as a v2 tensor record
(``wire.sparse``: dense, or listed coordinates with bitmap / varint-gap indices); version 1 (fixed 16-byte
records, u32 top-k indices) is still read, because v1 firmware returns v1 records for GET_DELTA, and written
only on request (``version=1``). Personal tensors never travel: the encoder skips them and
:func:`delta_to_dense` refuses a delta that names one. Readers refuse non-canonical encodings. (Over 400 lines:
one format, defined once: both versions' writer and reader and the plan-bound checks live together.)
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from device_agent.engine import ir
from device_agent.wire import sparse as S
from device_agent.wire.envelope import (
    CRC_SIZE,
    HEADER_SIZE,
    SIG_LEN,
    Builder,
    Cursor,
    FormatId,
    SigAlg,
    Signer,
    Verifier,
    open_blob,
    seal,
)
from device_agent.wire.errors import WireError, WireFormatError
from device_agent.wire.plan import MAX_NUMEL, MAX_TENSORS
from device_agent.wire.plan import plan_hash as _plan_hash
from device_agent.wire.sparse import Record, narrowest_dtype

DELTA = FormatId("delta", b"TFDL", 2, "update the device agent / firmware to the coordinator's delta version")
DELTA_V1 = FormatId("delta", b"TFDL", 1, DELTA.remedy)

DELTA_HEADER = struct.Struct("<IIQ32s32sI")  # round_id, sample_count, counter, base_hash, plan_hash, id length
RECORD_V1 = struct.Struct("<IBBHII")  # tensor_id, encoding, dtype, reserved u16, numel, count: 16 bytes
MAX_DEVICE_ID = 64
DEVICE_ID = re.compile(rb"[A-Za-z0-9_.-]{1,64}")  # MQTT-topic-safe, as in device_agent.wire.messages
INT8_DELTA_LIMIT = 254  # int8 weights live in [-127, 127]: their difference in [-254, 254]
_INT32 = (-(2**31), 2**31 - 1)

# v2 records in a delta: every encoding (SPARSE: unlisted coordinates not sent; FILLED: unlisted are 0)
DELTA_ENCODINGS = frozenset(S.Enc)

TensorDelta = Record  # one tensor's delta (``values`` int64, ``indices`` or None for dense, ``filled``)


class Encoding(IntEnum):
    """Version 1 record encodings (read for v1 firmware; v2 uses ``wire.sparse.Enc``)."""

    DENSE = 1  # count == numel values
    TOPK = 2  # count u32 indices (strictly increasing) then count non-zero values


_WIDTH = S.WIDTH


@dataclass(frozen=True)
class DeltaSize:
    """Exact byte counts of a delta blob: ``total == len(delta.to_bytes(signer))``."""

    envelope: int  # header + signature + CRC
    header: int  # fixed fields + device id + tensor count
    tensors: dict[int, int]  # tensor id -> record bytes
    total: int


@dataclass
class Delta:
    device_id: str
    round_id: int
    base_hash: bytes  # the model version trained from: the model hash of the update applied last
    plan_hash: bytes
    counter: int  # the device's monotonic upload counter (replay protection)
    sample_count: int  # samples trained on this round (FedAvg weight)
    tensors: list[Record] = field(default_factory=list)  # tensor ids ascending

    def to_bytes(self, signer: Signer | None = None, *, version: int = DELTA.version) -> bytes:
        """The blob (uplink deltas are usually unsigned; a per-device HMAC signer is allowed).

        ``version=1`` writes the v1 layout (listed-as-zero records become dense): for v1 readers only.
        """
        b = Builder()
        raw_id = self.device_id.encode("utf-8")
        if not DEVICE_ID.fullmatch(raw_id):
            raise ValueError(f"device id {self.device_id!r} must match [A-Za-z0-9_.-]{{1,64}}")
        if len(self.base_hash) != 32 or len(self.plan_hash) != 32:
            raise ValueError("base_hash and plan_hash must be 32 bytes each")
        try:
            b.pack("IIQ32s32sI", self.round_id, self.sample_count, self.counter, bytes(self.base_hash),
                   bytes(self.plan_hash), len(raw_id))
        except struct.error as e:
            raise ValueError(f"delta header field out of range: {e}") from None
        if self.sample_count < 1:
            raise ValueError(f"sample_count must be >= 1, got {self.sample_count}")
        b.buf += raw_id
        b.pad()
        b.buf += self.records_bytes(version=version)
        return seal(DELTA if version == DELTA.version else _fmt(version), bytes(b.buf), signer)

    def records_bytes(self, *, version: int = DELTA.version) -> bytes:
        """The records section (tensor count + records); ``version=1`` is what v1 firmware returns for GET_DELTA."""
        b = Builder()
        b.pack("I", len(self.tensors))
        prev = -1
        for td in self.tensors:
            if td.tensor_id <= prev:
                raise ValueError(f"tensor ids must be strictly increasing, {td.tensor_id} after {prev}")
            prev = td.tensor_id
            if version == 1:
                _write_v1(b, td)
            else:
                S.write_record(b, td)
        return bytes(b.buf)

    def size_report(self, signer_alg: SigAlg = SigAlg.NONE) -> DeltaSize:
        """Exact sizes of the v2 blob."""
        per = {td.tensor_id: td.nbytes for td in self.tensors}
        header = DELTA_HEADER.size + S.pad4(len(self.device_id.encode("utf-8"))) + 4
        env = HEADER_SIZE + SIG_LEN[signer_alg] + CRC_SIZE
        return DeltaSize(env, header, per, env + header + sum(per.values()))


def _fmt(version: int) -> FormatId:
    if version not in (1, 2):
        raise ValueError(f"delta version 1 or 2, got {version}")
    return DELTA_V1 if version == 1 else DELTA


def _write_v1(b: Builder, td: Record) -> None:
    if td.indices is not None and td.filled:  # v1 has no "unlisted are zero": send every coordinate
        flat = np.zeros(td.numel, np.int64)
        flat[td.indices] = td.values
        td = Record(td.tensor_id, td.numel, flat)
    dt = td.dtype
    enc = Encoding.DENSE if td.indices is None else Encoding.TOPK
    b.pack("IBBHII", td.tensor_id, int(enc), int(dt), 0, td.numel, td.values.size)
    if td.indices is not None:
        b.array(td.indices, "<u4")
    b.array(td.values, f"<i{_WIDTH[dt]}")


# ---------------------------------------------------------------------------------------------------- encoder


def topk_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` indices of the largest non-zero ``|values|`` (ties: lower index first), returned ascending."""
    nz = np.flatnonzero(values)
    if k >= nz.size:
        return nz.astype(np.int64)
    order = np.lexsort((nz, -np.abs(values[nz])))  # primary key last: magnitude descending, then index
    return np.sort(nz[order[:k]]).astype(np.int64)


def encode_tensor(tensor_id: int, delta: np.ndarray, k: int | None = None) -> Record:
    """Every coordinate (DENSE, or FILLED when that is strictly smaller); with ``k``, the top-``k`` as SPARSE
    when that is strictly smaller than DENSE, else DENSE (which carries everything top-k would have)."""
    flat = np.asarray(delta, dtype=np.int64).reshape(-1)
    if k is None:
        return S.full_record(tensor_id, flat)
    dense = Record(tensor_id, flat.size, flat)
    idx = topk_indices(flat, k)
    sparse = Record(tensor_id, flat.size, flat[idx], idx, filled=False)
    return sparse if sparse.nbytes < dense.nbytes else dense


def shared_change(plan: ir.Plan, old_state: dict[int, np.ndarray], new_state: dict[int, np.ndarray],
                  residual: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Tensor id -> flat int64 ``new - old (+ residual)`` for every shared trainable tensor of ``plan``."""
    out = {}
    for t in sorted(plan.trainable, key=lambda t: t.id):
        if t.personal:
            continue
        d = np.asarray(new_state[t.id], dtype=np.int64).reshape(-1) - np.asarray(old_state[t.id], np.int64).reshape(-1)
        if d.size != t.numel:
            raise ValueError(f"tensor {t.id} ({t.name}): {t.numel} values expected, got {d.size}")
        if residual is not None and t.id in residual:
            d = d + np.asarray(residual[t.id], np.int64).reshape(-1)
        out[t.id] = d
    return out


def _sendable(t: ir.Tensor, d: np.ndarray) -> np.ndarray:
    """What a record may carry for tensor ``t``: int8 tensors within ±254, others within int32."""
    lim = (-INT8_DELTA_LIMIT, INT8_DELTA_LIMIT) if t.dtype == ir.DType.INT8 else _INT32
    return np.clip(d, *lim)


def encode_delta(plan: ir.Plan, old_state: dict[int, np.ndarray], new_state: dict[int, np.ndarray], *,
                 device_id: str, round_id: int, base_hash: bytes, counter: int, sample_count: int,
                 top_k: int | dict[int, int] | None = None, plan_hash: bytes | None = None,
                 residual: dict[int, np.ndarray] | None = None) -> Delta:
    """``new - old`` (plus ``residual``) for every shared (non-personal) trainable tensor of ``plan``, ids ascending.

    Parameters
    ----------
    old_state, new_state : tensor id -> values (the trainer's state before and after the round).
    top_k : None (every coordinate), one k for every tensor, or tensor id -> k (missing ids: every coordinate).
    plan_hash : the plan's hash if the caller has it (saves serializing the plan).
    residual : error feedback (tensor id -> int64): what earlier rounds computed but did not send; added to
        the change before selection. :func:`residual_after` gives the next round's residual. Values beyond what
        a record may carry (±254 for int8 tensors, int32 otherwise) are clipped; the rest stays in the residual.
    """
    change = shared_change(plan, old_state, new_state, residual)
    tensors = []
    for tid, d in change.items():
        k = top_k.get(tid) if isinstance(top_k, dict) else top_k
        tensors.append(encode_tensor(tid, _sendable(plan.tensors[tid], d), k))
    return Delta(device_id, round_id, base_hash, plan_hash or _plan_hash(plan), counter, sample_count, tensors)


def residual_after(delta: Delta, plan: ir.Plan, old_state: dict[int, np.ndarray], new_state: dict[int, np.ndarray],
                   residual: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """Error feedback: ``new - old + residual`` minus what ``delta`` sent (tensor id -> flat int64).

    Zero everywhere when the delta sent every coordinate unclipped; otherwise what top-k left for later.
    """
    change = shared_change(plan, old_state, new_state, residual)
    sent = {td.tensor_id: td for td in delta.tensors}
    out = {}
    for tid, d in change.items():
        td = sent.get(tid)
        r = d.copy()
        if td is not None:
            if td.indices is None:
                r -= td.values
            else:
                r[td.indices] -= td.values  # FILLED: the others were sent as 0, SPARSE: not sent
        out[tid] = r
    return out


# ---------------------------------------------------------------------------------------------------- reader


def _open(data: bytes, verify: Verifier) -> tuple[memoryview, int]:
    """The envelope of a v1 or v2 delta (the version picks the layout; anything else is refused as v2 would)."""
    raw = bytes(data[:6]) if len(data) >= 16 else b""
    version = int.from_bytes(raw[4:6], "little") if raw[:4] == DELTA.magic else DELTA.version
    fmt = DELTA_V1 if version == 1 else DELTA
    return open_blob(fmt, data, verify), fmt.version


def delta_from_bytes(data: bytes, *, verify: Verifier | None = None, plan: ir.Plan | None = None,
                     plan_hash: bytes | None = None) -> Delta:
    """Parse a v2 (or v1) delta blob; raises :class:`WireFormatError` on bad input. ``verify``: unsigned by default.

    ``plan`` (with its ``plan_hash`` if the caller knows it): when the delta names this plan, a record for a
    tensor that is not one of its shared trainable tensors, or of another size, is ``PLAN_MISMATCH`` before its
    index section is read, so what the reader allocates is bounded by the plan. A delta naming another plan is
    read with the format's bounds only (its allocations stay within a small multiple of its own length) and
    left to the caller to refuse (the coordinator: ``WRONG_PLAN``).
    """
    body, version = _open(data, verify or Verifier.unsigned())
    c = Cursor(body, "delta")
    round_id, samples, counter, base_hash, phash, id_len = c.unpack(DELTA_HEADER, "header")
    expect = None
    if plan is not None and bytes(phash) == (plan_hash or _plan_hash(plan)):
        expect = S.shared_numel(plan)
    if samples < 1:
        raise WireFormatError(WireError.BAD_VALUE, "delta: sample_count must be >= 1, got 0")
    if not 1 <= id_len <= MAX_DEVICE_ID:
        raise WireFormatError(WireError.BAD_STRING, f"delta: device id of {id_len} bytes, expected 1..64")
    raw_id = c.raw(id_len, "device id")
    c.pad("device id")
    if not DEVICE_ID.fullmatch(raw_id):
        raise WireFormatError(WireError.BAD_STRING, f"delta: device id {raw_id!r} must match [A-Za-z0-9_.-]{{1,64}}")
    tensors = read_records(c, version, expect)
    c.end()
    return Delta(raw_id.decode("ascii"), round_id, base_hash, phash, counter, samples, tensors)


def delta_from_records(records: bytes, *, device_id: str, round_id: int, base_hash: bytes, plan_hash: bytes,
                       counter: int, sample_count: int, version: int = 1, plan: ir.Plan | None = None) -> Delta:
    """A :class:`Delta` from a records section plus the bridge's header.

    ``version`` is the records' layout: 1 (default) is what v1 firmware returns for GET_DELTA. ``plan``: the
    records must name its shared trainable tensors with their sizes (``PLAN_MISMATCH`` otherwise).
    """
    c = Cursor(memoryview(bytes(records)), "delta records", base=0)
    tensors = read_records(c, _fmt(version).version, None if plan is None else S.shared_numel(plan))
    c.end()
    return Delta(device_id, round_id, base_hash, plan_hash, counter, sample_count, tensors)


def max_records_bytes(plan: ir.Plan) -> int:
    """An upper bound of a records section for ``plan`` in either layout: count, then per shared tensor its
    record header (16 bytes at most), u32 indices or a bitmap (4 bytes per value at most) and int32 values, padded."""
    return 4 + sum(16 + 8 * n + 8 for n in S.shared_numel(plan).values())


def read_records(c: Cursor, version: int = DELTA.version, expect: dict[int, int] | None = None) -> list[Record]:
    """The records section at the cursor, in the given layout version; ``expect`` as in :func:`S.read_record`."""
    n = c.u32("tensor count")
    if n > MAX_TENSORS:
        raise WireFormatError(WireError.SIZE_OVERFLOW, f"{c.what}: {n} tensors, at most {MAX_TENSORS}")
    out: list[Record] = []
    prev = -1
    for i in range(n):
        td = (_read_v1(c, i, prev, expect) if version == 1
              else S.read_record(c, f"{c.what}: record {i}", DELTA_ENCODINGS, prev, expect))
        prev = td.tensor_id
        out.append(td)
    return out


_read_records = read_records  # NOTE: old private name, used by tests and the bridge


_ENCODINGS = frozenset(int(e) for e in Encoding)
_VALUE_DTYPES = frozenset(int(d) for d in _WIDTH)


def _read_v1(c: Cursor, i: int, prev: int, expect: dict[int, int] | None = None) -> Record:
    tid, enc, dtype, reserved, numel, count = c.unpack(RECORD_V1, f"record {i}")
    what = f"{c.what}: record {i} (tensor {tid})"
    if tid <= prev:
        raise WireFormatError(WireError.ID_ORDER, f"{what}: tensor ids not strictly increasing")
    if enc not in _ENCODINGS or dtype not in _VALUE_DTYPES:
        raise WireFormatError(WireError.BAD_ENUM, f"{what}: encoding {enc} / dtype {dtype} unknown")
    if reserved:
        raise WireFormatError(WireError.RESERVED_NONZERO, f"{what}: reserved field {reserved}")
    if not 1 <= numel <= MAX_NUMEL:
        raise WireFormatError(WireError.SIZE_OVERFLOW, f"{what}: numel {numel} outside [1, 2**31 - 1]")
    if (enc == Encoding.DENSE and count != numel) or count > numel:
        raise WireFormatError(WireError.BAD_LENGTH, f"{what}: count {count} for numel {numel}")
    S.check_expected(expect, tid, numel, what)
    idx = None
    if enc == Encoding.TOPK:
        idx = c.array("<u4", count, f"{what} indices").astype(np.int64)
        if count and (np.any(idx[1:] <= idx[:-1])):
            raise WireFormatError(WireError.ID_ORDER, f"{what}: top-k indices not strictly increasing")
        if count and int(idx[-1]) >= numel:
            raise WireFormatError(WireError.BAD_INDEX, f"{what}: top-k index {int(idx[-1])} >= numel {numel}")
    dt = ir.DType(dtype)
    values = c.array(f"<i{_WIDTH[dt]}", count, f"{what} values").astype(np.int64)
    if narrowest_dtype(values) != dt:
        raise WireFormatError(WireError.NOT_CANONICAL, f"{what}: {dt.name} values fit a narrower type")
    if idx is not None and not values.all():
        raise WireFormatError(WireError.NOT_CANONICAL, f"{what}: top-k values must be non-zero")
    return Record(tid, numel, values, idx, filled=False)


# ---------------------------------------------------------------------------------------------------- to plan


def _shared_tensor(delta: Delta, plan: ir.Plan, td: TensorDelta, plan_hash: bytes | None) -> ir.Tensor:
    if td.tensor_id >= len(plan.tensors):
        raise WireFormatError(WireError.PLAN_MISMATCH, f"delta: tensor {td.tensor_id} not in the plan")
    t = plan.tensors[td.tensor_id]
    if t.kind != ir.Kind.TRAINABLE or t.personal or t.numel != td.numel:
        raise WireFormatError(WireError.PLAN_MISMATCH,
                              f"delta: tensor {t.id} ({t.name}) is not a shared trainable tensor of "
                              f"{td.numel} values (kind {t.kind.name}, personal {t.personal}, numel {t.numel})")
    if t.dtype == ir.DType.INT8 and td.values.size and np.abs(td.values).max() > INT8_DELTA_LIMIT:
        raise WireFormatError(WireError.BAD_VALUE, f"delta: int8 tensor {t.id} has a delta beyond ±254")
    return t


def _check_plan(delta: Delta, plan: ir.Plan, plan_hash: bytes | None) -> None:
    want = plan_hash or _plan_hash(plan)
    if bytes(delta.plan_hash) != want:
        raise WireFormatError(WireError.PLAN_MISMATCH,
                              f"delta is for plan {bytes(delta.plan_hash).hex()[:16]}…, not {want.hex()[:16]}…")


def delta_to_dense(delta: Delta, plan: ir.Plan, *, plan_hash: bytes | None = None) -> dict[int, np.ndarray]:
    """Tensor id -> int64 delta of the tensor's shape for every shared trainable tensor (zeros where not sent).

    Raises :class:`WireFormatError` ``PLAN_MISMATCH`` / ``BAD_VALUE`` when the delta does not fit ``plan``.
    """
    _check_plan(delta, plan, plan_hash)
    out = {t.id: np.zeros(t.shape, np.int64) for t in plan.trainable if not t.personal}
    for td in delta.tensors:
        t = _shared_tensor(delta, plan, td, plan_hash)
        flat = out[t.id].reshape(-1)
        if td.indices is None:
            flat[:] = td.values
        else:
            flat[td.indices] = td.values
    return out


@dataclass(frozen=True)
class SharedLayout:
    """Where each shared (non-personal) trainable tensor of a plan sits in the flat delta vector: ids ascending,
    each tensor's values in C order. Build with :func:`shared_layout`."""

    slots: dict[int, tuple[int, int, bool]]  # tensor id -> (offset, numel, is int8)
    size: int  # D, the vector's length


def shared_layout(plan: ir.Plan) -> SharedLayout:
    slots, off = {}, 0
    for t in plan.tensors:
        if t.kind == ir.Kind.TRAINABLE and not t.personal:
            n = t.numel
            slots[t.id] = (off, n, t.dtype == ir.DType.INT8)
            off += n
    return SharedLayout(slots, off)


def delta_to_flat(delta: Delta, plan: ir.Plan, *, plan_hash: bytes | None = None,
                  layout: SharedLayout | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(values, mask)`` over the shared tensors of ``plan``, flattened in :func:`shared_layout` order.

    Parameters
    ----------
    plan_hash, layout : the plan's hash and ``shared_layout(plan)`` if the caller has them (a coordinator
        decoding many deltas against one plan computes them once).

    Returns
    -------
    values : (D,) int64, the delta (0 where not sent).
    mask : (D,) bool, the coordinates the device votes on: every coordinate of a tensor it sent a record for,
        none of an absent tensor. A SPARSE (top-k) record votes 0 on the coordinates it leaves out, exactly as a
        FILLED one does: with error feedback the device still holds that change and sends it in a later round,
        so counting the silence as "no vote" would give the few devices that did send a coordinate the weight of
        all (measured: ImuCNN fleet, top-1%, 0.65 vs 0.79 with zero votes, every coordinate 0.80;
        ``benchmarks/topk_accuracy.py``). The encoding (SPARSE or FILLED) therefore never changes the aggregate.

    Raises :class:`WireFormatError` ``PLAN_MISMATCH`` / ``BAD_VALUE`` as :func:`delta_to_dense` does.
    """
    _check_plan(delta, plan, plan_hash)
    layout = layout or shared_layout(plan)
    values = np.zeros(layout.size, np.int64)
    mask = np.zeros(layout.size, bool)
    for td in delta.tensors:
        slot = layout.slots.get(td.tensor_id)
        if slot is None or slot[1] != td.numel:
            _shared_tensor(delta, plan, td, plan_hash)  # raises, saying what the tensor is
            raise WireFormatError(WireError.PLAN_MISMATCH, f"delta: tensor {td.tensor_id} is not a shared tensor")
        off, n, int8 = slot
        v = td.values
        if int8 and v.size and (v.max() > INT8_DELTA_LIMIT or v.min() < -INT8_DELTA_LIMIT):
            raise WireFormatError(WireError.BAD_VALUE, f"delta: int8 tensor {td.tensor_id} has a delta beyond ±254")
        if td.indices is None:
            values[off:off + n] = v
        else:
            values[off:off + n][td.indices] = v
        mask[off:off + n] = True  # NOTE: a top-k record votes 0 where it is silent (see the docstring)
    return values, mask


def delta_support(delta: Delta, plan: ir.Plan, *, plan_hash: bytes | None = None) -> dict[int, np.ndarray]:
    """Tensor id -> bool mask of the coordinates the device sent (all for DENSE / FILLED, the listed ones for
    SPARSE); a tensor without a record: none."""
    _check_plan(delta, plan, plan_hash)
    out = {t.id: np.zeros(t.shape, bool) for t in plan.trainable if not t.personal}
    for td in delta.tensors:
        t = _shared_tensor(delta, plan, td, plan_hash)
        flat = out[t.id].reshape(-1)
        if td.indices is None or td.filled:
            flat[:] = True
        else:
            flat[td.indices] = True
    return out
