"""The delta (uplink, .tfd): what one device learned in one round, as integer differences of its shared tensors.

One writer (:meth:`Delta.to_bytes`, built by :func:`encode_delta`), one reader (:func:`delta_from_bytes`);
layout in docs/formats.md, "Delta". Each tensor travels dense or top-k, in the narrowest integer type that holds
its values, so a delta has one canonical encoding. Personal tensors never travel: the encoder skips them and
:func:`delta_to_dense` refuses a delta that names one. The reader refuses wider-than-needed encodings.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from device_agent.engine import ir
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

DELTA = FormatId("delta", b"TFDL", 1, "update the device agent / firmware to the coordinator's delta version")

DELTA_HEADER = struct.Struct("<IIQ32s32sI")  # round_id, sample_count, counter, base_hash, plan_hash, id length
RECORD = struct.Struct("<IBBHII")  # tensor_id, encoding, dtype, reserved u16, numel, count: 16 bytes
MAX_DEVICE_ID = 64
DEVICE_ID = re.compile(rb"[A-Za-z0-9_.-]{1,64}")  # MQTT-topic-safe, as in device_agent.messages
INT8_DELTA_LIMIT = 254  # int8 weights live in [-127, 127]: their difference in [-254, 254]


class Encoding(IntEnum):
    DENSE = 1  # count == numel values
    TOPK = 2  # count u32 indices (strictly increasing) then count non-zero values


_WIDTH = {ir.DType.INT8: 1, ir.DType.INT16: 2, ir.DType.INT32: 4}
_RANGES = ((ir.DType.INT8, 127, -128), (ir.DType.INT16, 32767, -32768), (ir.DType.INT32, 2**31 - 1, -(2**31)))


def narrowest_dtype(values: np.ndarray) -> ir.DType:
    """INT8, INT16 or INT32: the narrowest type holding every value (INT8 for no values)."""
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dt, top, bottom in _RANGES:
        if bottom <= lo and hi <= top:
            return dt
    raise ValueError(f"delta values [{lo}, {hi}] do not fit int32")


@dataclass
class TensorDelta:
    """One tensor's delta: ``values`` (int64) at ``indices`` (uint32, ascending) or everywhere when dense."""

    tensor_id: int
    numel: int
    values: np.ndarray
    indices: np.ndarray | None = None  # None: dense, len(values) == numel

    @property
    def encoding(self) -> Encoding:
        return Encoding.DENSE if self.indices is None else Encoding.TOPK

    @property
    def dtype(self) -> ir.DType:
        return narrowest_dtype(self.values)

    @property
    def nbytes(self) -> int:
        """Exact bytes of this tensor's record on the wire."""
        n = self.values.size
        return RECORD.size + (0 if self.indices is None else 4 * n) + _pad4(n * _WIDTH[self.dtype])


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
    base_hash: bytes  # the model version trained from: update_hash of the last update applied (or the plan hash)
    plan_hash: bytes
    counter: int  # the device's monotonic upload counter (replay protection)
    sample_count: int  # samples trained on this round (FedAvg weight)
    tensors: list[TensorDelta] = field(default_factory=list)  # tensor ids ascending

    def to_bytes(self, signer: Signer | None = None) -> bytes:
        """The blob (uplink deltas are usually unsigned; a per-device HMAC signer is allowed)."""
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
        b.buf += self.records_bytes()
        return seal(DELTA, bytes(b.buf), signer)

    def records_bytes(self) -> bytes:
        """The records section (tensor count + records): the bytes an MCU returns for GET_DELTA."""
        b = Builder()
        b.pack("I", len(self.tensors))
        prev = -1
        for td in self.tensors:
            if td.tensor_id <= prev:
                raise ValueError(f"tensor ids must be strictly increasing, {td.tensor_id} after {prev}")
            prev = td.tensor_id
            dt = td.dtype
            b.pack("IBBHII", td.tensor_id, int(td.encoding), int(dt), 0, td.numel, td.values.size)
            if td.indices is not None:
                b.array(td.indices, "<u4")
            b.array(td.values, f"<i{_WIDTH[dt]}")
        return bytes(b.buf)

    def size_report(self, signer_alg: SigAlg = SigAlg.NONE) -> DeltaSize:
        per = {td.tensor_id: td.nbytes for td in self.tensors}
        header = DELTA_HEADER.size + _pad4(len(self.device_id.encode("utf-8"))) + 4
        env = HEADER_SIZE + SIG_LEN[signer_alg] + CRC_SIZE
        return DeltaSize(env, header, per, env + header + sum(per.values()))


def _pad4(n: int) -> int:
    return n + (-n % 4)


# ---------------------------------------------------------------------------------------------------- encoder


def topk_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` indices of the largest non-zero ``|values|`` (ties: lower index first), returned ascending."""
    nz = np.flatnonzero(values)
    order = np.lexsort((nz, -np.abs(values[nz])))  # primary key last: magnitude descending, then index
    return np.sort(nz[order[:k]]).astype(np.uint32)


def encode_tensor(tensor_id: int, delta: np.ndarray, k: int | None = None) -> TensorDelta:
    """Dense, or top-``k`` when that record is strictly smaller than the dense one (docs/formats.md)."""
    flat = np.asarray(delta, dtype=np.int64).reshape(-1)
    dense = TensorDelta(tensor_id, flat.size, flat)
    if k is None:
        return dense
    idx = topk_indices(flat, k)
    sparse = TensorDelta(tensor_id, flat.size, flat[idx], idx)
    return sparse if sparse.nbytes < dense.nbytes else dense


def encode_delta(plan: ir.Plan, old_state: dict[int, np.ndarray], new_state: dict[int, np.ndarray], *,
                 device_id: str, round_id: int, base_hash: bytes, counter: int, sample_count: int,
                 top_k: int | dict[int, int] | None = None, plan_hash: bytes | None = None) -> Delta:
    """``new - old`` for every shared (non-personal) trainable tensor of ``plan``, ids ascending.

    Parameters
    ----------
    old_state, new_state : tensor id -> values (the trainer's state before and after the round).
    top_k : None (all dense), one k for every tensor, or tensor id -> k (missing ids: dense).
    plan_hash : the plan's hash if the caller has it (saves serializing the plan).
    """
    tensors = []
    for t in sorted(plan.trainable, key=lambda t: t.id):
        if t.personal:
            continue
        d = np.asarray(new_state[t.id], dtype=np.int64) - np.asarray(old_state[t.id], dtype=np.int64)
        if d.size != t.numel:
            raise ValueError(f"tensor {t.id} ({t.name}): {t.numel} values expected, got {d.size}")
        k = top_k.get(t.id) if isinstance(top_k, dict) else top_k
        tensors.append(encode_tensor(t.id, d, k))
    return Delta(device_id, round_id, base_hash, plan_hash or _plan_hash(plan), counter, sample_count, tensors)


# ---------------------------------------------------------------------------------------------------- reader


def delta_from_bytes(data: bytes, *, verify: Verifier | None = None) -> Delta:
    """Parse a delta blob; raises :class:`WireFormatError` on any bad input. ``verify`` defaults to unsigned."""
    c = Cursor(open_blob(DELTA, data, verify or Verifier.unsigned()), "delta")
    round_id, samples, counter, base_hash, phash, id_len = c.unpack(DELTA_HEADER, "header")
    if samples < 1:
        raise WireFormatError(WireError.BAD_VALUE, "delta: sample_count must be >= 1, got 0")
    if not 1 <= id_len <= MAX_DEVICE_ID:
        raise WireFormatError(WireError.BAD_STRING, f"delta: device id of {id_len} bytes, expected 1..64")
    raw_id = c.raw(id_len, "device id")
    c.pad("device id")
    if not DEVICE_ID.fullmatch(raw_id):
        raise WireFormatError(WireError.BAD_STRING, f"delta: device id {raw_id!r} must match [A-Za-z0-9_.-]{{1,64}}")
    tensors = _read_records(c)
    c.end()
    return Delta(raw_id.decode("ascii"), round_id, base_hash, phash, counter, samples, tensors)


def delta_from_records(records: bytes, *, device_id: str, round_id: int, base_hash: bytes, plan_hash: bytes,
                       counter: int, sample_count: int) -> Delta:
    """A :class:`Delta` from a records section (what an MCU returns for GET_DELTA) plus the bridge's header."""
    c = Cursor(memoryview(bytes(records)), "delta records", base=0)
    tensors = _read_records(c)
    c.end()
    return Delta(device_id, round_id, base_hash, plan_hash, counter, sample_count, tensors)


_ENCODINGS = frozenset(int(e) for e in Encoding)
_VALUE_DTYPES = frozenset(int(d) for d in _WIDTH)


def _read_records(c: Cursor) -> list[TensorDelta]:
    n = c.u32("tensor count")
    if n > MAX_TENSORS:
        raise WireFormatError(WireError.SIZE_OVERFLOW, f"{c.what}: {n} tensors, at most {MAX_TENSORS}")
    out: list[TensorDelta] = []
    prev = -1
    for i in range(n):
        tid, enc, dtype, reserved, numel, count = c.unpack(RECORD, f"record {i}")
        what = f"{c.what}: record {i} (tensor {tid})"
        if tid <= prev:
            raise WireFormatError(WireError.ID_ORDER, f"{what}: tensor ids not strictly increasing")
        prev = tid
        if enc not in _ENCODINGS or dtype not in _VALUE_DTYPES:
            raise WireFormatError(WireError.BAD_ENUM, f"{what}: encoding {enc} / dtype {dtype} unknown")
        if reserved:
            raise WireFormatError(WireError.RESERVED_NONZERO, f"{what}: reserved field {reserved}")
        if not 1 <= numel <= MAX_NUMEL:
            raise WireFormatError(WireError.SIZE_OVERFLOW, f"{what}: numel {numel} outside [1, 2**31 - 1]")
        if (enc == Encoding.DENSE and count != numel) or count > numel:
            raise WireFormatError(WireError.BAD_LENGTH, f"{what}: count {count} for numel {numel}")
        idx = None
        if enc == Encoding.TOPK:
            idx = c.array("<u4", count, f"{what} indices")
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
        out.append(TensorDelta(tid, numel, values, idx))
    return out


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
            flat[td.indices.astype(np.int64)] = td.values
    return out


def delta_support(delta: Delta, plan: ir.Plan, *, plan_hash: bytes | None = None) -> dict[int, np.ndarray]:
    """Tensor id -> bool mask of the coordinates the device sent (all for dense, the top-k indices otherwise)."""
    _check_plan(delta, plan, plan_hash)
    out = {t.id: np.zeros(t.shape, bool) for t in plan.trainable if not t.personal}
    for td in delta.tensors:
        t = _shared_tensor(delta, plan, td, plan_hash)
        flat = out[t.id].reshape(-1)
        if td.indices is None:
            flat[:] = True
        else:
            flat[td.indices.astype(np.int64)] = True
    return out
