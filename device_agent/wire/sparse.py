"""The v2 tensor record shared by the delta (TFDL v2) and the model update (TFUP v2): one tensor's integers.

A record carries every value (DENSE) or only listed coordinates, whose indices travel as a bitmap or as varint
gaps, whichever is smaller; values use the narrowest integer type that holds them. Layout and canonical-form
rules in docs/formats.md, "Tensor record (v2)". One writer (:func:`write_record`), one reader
(:func:`read_record`); the reader refuses every non-canonical encoding, so one tensor has one encoding. What an
unlisted coordinate means (not sent, or zero) is the encoding's business; which encodings a format allows is
the format's.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from device_agent.engine import ir
from device_agent.wire.envelope import Builder, Cursor
from device_agent.wire.errors import WireError, WireFormatError

RECORD = struct.Struct("<HBBII")  # tensor_id u16, encoding u8, dtype u8, numel u32, count u32: 12 bytes
MAX_NUMEL = 2**31 - 1
MAX_TENSOR_ID = 0xFFFF


class Enc(IntEnum):
    DENSE = 1  # count == numel values, index section absent
    SPARSE_BITMAP = 2  # listed coordinates carry values; unlisted ones were NOT sent (delta only)
    SPARSE_GAPS = 3
    FILLED_BITMAP = 4  # listed coordinates carry values; unlisted ones are 0
    FILLED_GAPS = 5


SPARSE = frozenset({Enc.SPARSE_BITMAP, Enc.SPARSE_GAPS})
FILLED = frozenset({Enc.FILLED_BITMAP, Enc.FILLED_GAPS})
BITMAP = frozenset({Enc.SPARSE_BITMAP, Enc.FILLED_BITMAP})
WIDTH = {ir.DType.INT8: 1, ir.DType.INT16: 2, ir.DType.INT32: 4}
_RANGES = ((ir.DType.INT8, 127, -128), (ir.DType.INT16, 32767, -32768), (ir.DType.INT32, 2**31 - 1, -(2**31)))


def narrowest_dtype(values: np.ndarray) -> ir.DType:
    """INT8, INT16 or INT32: the narrowest type holding every value (INT8 for no values)."""
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dt, top, bottom in _RANGES:
        if bottom <= lo and hi <= top:
            return dt
    raise ValueError(f"values [{lo}, {hi}] do not fit int32")


def pad4(n: int) -> int:
    return n + (-n % 4)


# ---------------------------------------------------------------------------------------------------- indices


def varint_sizes(gaps: np.ndarray) -> np.ndarray:
    """Bytes of each unsigned LEB128 varint (1..5 for values < 2**32)."""
    g = np.asarray(gaps, np.int64)
    return 1 + (g >= 1 << 7) + (g >= 1 << 14) + (g >= 1 << 21) + (g >= 1 << 28)


def gaps_of(indices: np.ndarray) -> np.ndarray:
    """First index, then the number of skipped coordinates before each next one (``idx[i] - idx[i-1] - 1``)."""
    idx = np.asarray(indices, np.int64)
    return np.diff(idx, prepend=-1) - 1


def index_bytes(numel: int, indices: np.ndarray) -> tuple[int, int]:
    """(bitmap bytes, varint-gap bytes), both padded to 4: the two candidate index sections."""
    return pad4((numel + 7) // 8), pad4(int(varint_sizes(gaps_of(indices)).sum()))


def uses_gaps(numel: int, indices: np.ndarray) -> bool:
    """The canonical index coding: gaps when strictly smaller than the bitmap (ties: bitmap)."""
    bitmap, gaps = index_bytes(numel, indices)
    return gaps < bitmap


def encode_varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128, vectorized: 7 bits per byte, low group first, high bit = more follows."""
    v = np.asarray(values, np.uint64)
    if v.size == 0:
        return b""
    n = varint_sizes(v.astype(np.int64))
    out = np.zeros((v.size, 5), np.uint8)
    for j in range(5):
        out[:, j] = ((v >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8) | np.where(j + 1 < n, 0x80, 0)
    return out[np.arange(5)[None, :] < n[:, None]].tobytes()


def encode_bitmap(numel: int, indices: np.ndarray) -> bytes:
    bits = np.zeros(numel, np.uint8)
    bits[np.asarray(indices, np.int64)] = 1
    return np.packbits(bits, bitorder="little").tobytes()


# ---------------------------------------------------------------------------------------------------- record


@dataclass
class Record:
    """One tensor's integers: ``values`` (int64) at ``indices`` (ascending) or everywhere (``indices`` None)."""

    tensor_id: int
    numel: int
    values: np.ndarray
    indices: np.ndarray | None = None
    filled: bool = True  # listed records: unlisted coordinates are 0 (True) or were not sent (False)

    @property
    def dtype(self) -> ir.DType:
        return narrowest_dtype(self.values)

    @property
    def encoding(self) -> Enc:
        if self.indices is None:
            return Enc.DENSE
        gaps = uses_gaps(self.numel, self.indices)
        if self.filled:
            return Enc.FILLED_GAPS if gaps else Enc.FILLED_BITMAP
        return Enc.SPARSE_GAPS if gaps else Enc.SPARSE_BITMAP

    @property
    def nbytes(self) -> int:
        """Exact bytes of this record on the wire."""
        vals = pad4(self.values.size * WIDTH[self.dtype])
        if self.indices is None:
            return RECORD.size + vals
        return RECORD.size + min(index_bytes(self.numel, self.indices)) + vals


def full_record(tensor_id: int, values: np.ndarray) -> Record:
    """Every coordinate of ``values``: DENSE, or FILLED (non-zeros listed) when that is strictly smaller."""
    flat = np.asarray(values, np.int64).reshape(-1)
    dense = Record(tensor_id, flat.size, flat)
    nz = np.flatnonzero(flat)
    filled = Record(tensor_id, flat.size, flat[nz], nz.astype(np.int64), filled=True)
    return filled if filled.nbytes < dense.nbytes else dense


def write_record(b: Builder, r: Record) -> None:
    """Append ``r`` in its canonical encoding. Raises ValueError on what it cannot encode."""
    if not 0 <= r.tensor_id <= MAX_TENSOR_ID or not 1 <= r.numel <= MAX_NUMEL:
        raise ValueError(f"tensor {r.tensor_id}: id must be < 2**16 and numel in [1, 2**31 - 1], got {r.numel}")
    dt = r.dtype
    if r.indices is None:
        if r.values.size != r.numel:
            raise ValueError(f"tensor {r.tensor_id}: dense record of {r.values.size} values for numel {r.numel}")
    else:
        idx = np.asarray(r.indices, np.int64)
        if idx.size != r.values.size or (idx.size and (idx[0] < 0 or idx[-1] >= r.numel or np.any(np.diff(idx) <= 0))):
            raise ValueError(f"tensor {r.tensor_id}: indices must be strictly increasing in [0, numel), one per value")
        if not r.values.all():
            raise ValueError(f"tensor {r.tensor_id}: listed values must be non-zero")
    enc = r.encoding
    b.pack("HBBII", r.tensor_id, int(enc), int(dt), r.numel, r.values.size)
    if enc != Enc.DENSE:
        assert r.indices is not None  # NOTE: the encoding is DENSE exactly when a record lists no indices
        raw = encode_bitmap(r.numel, r.indices) if enc in BITMAP else encode_varints(gaps_of(r.indices))
        b.buf += raw
        b.pad()
    b.array(r.values, f"<i{WIDTH[dt]}")


_VALUE_DTYPES = frozenset(int(d) for d in WIDTH)
_ENC_OF = {int(e): e for e in Enc}
_WIDTH_OF = {int(d): w for d, w in WIDTH.items()}
_NUMPY_OF: dict[int, np.dtype] = {1: np.dtype("<i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4")}
_NARROWER = {2: (-128, 127), 4: (-32768, 32767)}  # width -> the range a narrower type would hold
_VARINT_STEPS = (1 << 7, 1 << 14, 1 << 21, 1 << 28)


def varint_total(indices: np.ndarray) -> int:
    """Σ varint bytes of the gaps of ascending ``indices`` (the unpadded GAPS index section), without
    materializing the section: one byte per gap plus one per 7-bit step each gap crosses."""
    n = int(indices.size)
    if n == 0:
        return 0
    g = np.diff(indices) - 1  # gaps after the first; the first gap is the first index
    first = int(indices[0])
    top = max(first, int(g.max())) if g.size else first
    total = n
    for step in _VARINT_STEPS:
        if top < step:
            break
        total += int(np.count_nonzero(g >= step)) + (first >= step)
    return total


def read_record(c: Cursor, what: str, allowed: frozenset[Enc], prev: int = -1,
                expect: Mapping[int, int] | None = None) -> Record:
    """One record at the cursor (``prev``: the previous record's tensor id); every check of docs/formats.md
    "Tensor record (v2)", in its order.

    ``expect`` (tensor id -> numel, e.g. :func:`shared_numel` of the plan the record belongs to): a record naming
    another tensor or another numel is ``PLAN_MISMATCH`` right after the 12-byte record header, before any index
    section is read, so nothing the reader allocates is sized by more than the plan allows.

    NOTE: the canonical-form checks compare section sizes computed from counts (bitmap ``ceil(numel / 8)``,
    varint bytes of the gaps, ``numel * width``) instead of re-encoding the record: same verdicts, a fraction of
    the time. The alternative that is dearer to size (the gap bytes of a bitmap's indices, the FILLED form of a
    DENSE record) is sized only when a lower bound does not already settle the comparison.
    """
    tid, enc, dtype, numel, count = c.unpack(RECORD, what)
    if tid <= prev:
        raise WireFormatError(WireError.ID_ORDER, f"{what} (tensor {tid}): tensor ids not strictly increasing")
    if enc not in allowed or dtype not in _VALUE_DTYPES:
        raise WireFormatError(WireError.BAD_ENUM,
                              f"{what} (tensor {tid}): encoding {enc} / dtype {dtype} not allowed here")
    enc = _ENC_OF[enc]
    if not 1 <= numel <= MAX_NUMEL:
        raise WireFormatError(WireError.SIZE_OVERFLOW, f"{what} (tensor {tid}): numel {numel} outside [1, 2**31 - 1]")
    if (enc == Enc.DENSE and count != numel) or count > numel:
        raise WireFormatError(WireError.BAD_LENGTH, f"{what} (tensor {tid}): count {count} for numel {numel}")
    check_expected(expect, tid, numel, what)
    bitmap_bytes = pad4((numel + 7) // 8)
    idx = None
    index_bytes = 0
    if enc in BITMAP:
        idx = _read_bitmap(c, numel, count, f"{what} (tensor {tid})")
        index_bytes = bitmap_bytes
    elif enc != Enc.DENSE:
        start = c.pos
        idx = _read_gaps(c, count, numel, f"{what} (tensor {tid})")
        index_bytes = c.pos - start  # canonical varints, then zero padding: pad4(Σ varint bytes)
    width = _WIDTH_OF[dtype]
    raw = _read_values(c, _NUMPY_OF[width], count, f"{what} (tensor {tid}) values")
    if width in _NARROWER:  # the narrowest type: some value must need this width (none at all needs INT8)
        lo, hi = _NARROWER[width]
        if not count or (lo <= int(raw.min()) and int(raw.max()) <= hi):
            raise WireFormatError(WireError.NOT_CANONICAL,
                                  f"{what} (tensor {tid}): {ir.DType(dtype).name} values fit a narrower type")
    values = raw.astype(np.int64)
    dense_bytes = pad4(numel * width)
    if idx is not None:
        if not raw.all():
            raise WireFormatError(WireError.NOT_CANONICAL, f"{what} (tensor {tid}): listed values must be non-zero")
        if enc in BITMAP:  # bitmap unless the gaps are strictly smaller: gap bytes >= count bounds them below
            smallest = pad4(count) >= bitmap_bytes or pad4(varint_total(idx)) >= bitmap_bytes
        else:
            smallest = index_bytes < bitmap_bytes
        if not smallest:
            raise WireFormatError(WireError.NOT_CANONICAL,
                                  f"{what} (tensor {tid}): {enc.name} is not the smallest index coding")
        if enc in FILLED and index_bytes + pad4(count * width) >= dense_bytes:
            raise WireFormatError(WireError.NOT_CANONICAL, f"{what} (tensor {tid}): {enc.name} is not smaller than DENSE")
    elif _filled_is_smaller(raw, numel, width, bitmap_bytes, dense_bytes):
        raise WireFormatError(WireError.NOT_CANONICAL,
                              f"{what} (tensor {tid}): DENSE where listing the non-zeros is smaller")
    return Record(tid, numel, values, idx, filled=enc not in SPARSE)


def check_expected(expect: Mapping[int, int] | None, tid: int, numel: int, what: str) -> None:
    """``PLAN_MISMATCH`` unless ``expect`` (None: anything goes) holds tensor ``tid`` with ``numel`` values."""
    if expect is None:
        return
    want = expect.get(tid)
    if want is None:
        raise WireFormatError(WireError.PLAN_MISMATCH, f"{what}: tensor {tid} is not a shared trainable tensor of "
                                                       f"the plan (expected one of {sorted(expect)[:8]})")
    if numel != want:
        raise WireFormatError(WireError.PLAN_MISMATCH, f"{what} (tensor {tid}): numel {numel}, the plan's tensor "
                                                       f"has {want}")


def shared_numel(plan: ir.Plan) -> dict[int, int]:
    """Tensor id -> numel of every shared (non-personal) trainable tensor: what an update or delta may carry."""
    return {t.id: t.numel for t in plan.trainable if not t.personal}


def _filled_is_smaller(raw: np.ndarray, numel: int, width: int, bitmap_bytes: int, dense_bytes: int) -> bool:
    """Whether the FILLED record of the non-zeros of DENSE ``raw`` is strictly smaller than the DENSE one.

    The non-zeros need the same width (a zero fits every type), so FILLED costs ``pad4(nnz * width)`` plus the
    smaller index section; gap bytes are at least one per listed coordinate.
    """
    nnz = int(np.count_nonzero(raw))
    listed = pad4(nnz * width)
    if listed + min(bitmap_bytes, pad4(nnz)) >= dense_bytes:
        return False
    if listed + bitmap_bytes < dense_bytes:
        return True
    return listed + pad4(varint_total(np.flatnonzero(raw))) < dense_bytes


def _read_values(c: Cursor, dt: np.dtype, count: int, what: str) -> np.ndarray:
    """``count`` values of ``dt`` at the cursor (a read-only view into the body), then zero padding."""
    c.need(count * dt.itemsize, what)
    out = np.frombuffer(c.buf, dt, count, c.pos)
    c.pos += count * dt.itemsize
    c.pad(what)
    return out


def _read_bitmap(c: Cursor, numel: int, count: int, what: str) -> np.ndarray:
    """The bitmap index section -> ascending indices; bits beyond ``numel`` must be 0, set bits == ``count``."""
    nbytes = (numel + 7) // 8
    c.need(nbytes, f"{what} bitmap")
    raw = np.frombuffer(c.buf, np.uint8, nbytes, c.pos)
    c.pos += nbytes
    c.pad(f"{what} bitmap")
    if numel % 8 and int(raw[-1]) >> (numel % 8):
        raise WireFormatError(WireError.RESERVED_NONZERO, f"{what}: bitmap bits beyond numel are set")
    idx = np.flatnonzero(np.unpackbits(raw, count=numel, bitorder="little"))
    if idx.size != count:
        raise WireFormatError(WireError.BAD_LENGTH, f"{what}: bitmap lists {idx.size} coordinates, count {count}")
    return idx


def _read_gaps(c: Cursor, count: int, numel: int, what: str) -> np.ndarray:
    """``count`` LEB128 gaps -> absolute indices, checked varint by varint in stream order.

    Per varint: more than 32 bits -> BAD_INDEX, overlong (a final 0x00 after other bytes) -> NOT_CANONICAL, the
    index it reaches >= numel -> BAD_INDEX; the bytes end first -> TRUNCATED. Vectorized, but the first failing
    varint decides, exactly as a byte-by-byte reader (the C one) would.
    """
    if count <= c.remaining:  # NOTE: the common case, every gap below 128: one byte each, nothing to decode
        head = np.frombuffer(c.buf, np.uint8, count, c.pos)
        if not count or int(head.max()) < 0x80:
            idx = np.cumsum(head, dtype=np.int64)
            idx += np.arange(count)
            if count and int(idx[-1]) >= numel:
                i = int(np.searchsorted(idx, numel))
                raise WireFormatError(WireError.BAD_INDEX, f"{what}: index {int(idx[i])} (gap {i}) >= numel {numel}")
            c.pos += count
            c.pad(f"{what} indices")
            return idx
    # NOTE: count valid varints never take more than 5 * count bytes, so that bounds the scan.
    avail = min(c.remaining, 5 * count)
    buf = np.frombuffer(c.buf, np.uint8, count=avail, offset=c.pos)
    ends = np.flatnonzero(buf < 0x80)[:count]
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)[: ends.size]
    lens = ends - starts + 1
    bad_big = (lens > 5) | ((lens == 5) & (buf[ends] > 0x0F))
    bad_long = (lens > 1) & (buf[ends] == 0)
    first = int(np.flatnonzero(bad_big | bad_long)[0]) if (bad_big | bad_long).any() else ends.size
    ok = first
    lens_ok, starts_ok = lens[:ok], starts[:ok]
    nbytes = int(lens_ok.sum())
    if ok:
        vid = np.repeat(np.arange(ok), lens_ok)
        shift = ((np.arange(nbytes) - starts_ok[vid]) * 7).astype(np.uint64)
        contrib = (buf[:nbytes] & 0x7F).astype(np.uint64) << shift
        gaps = np.add.reduceat(contrib, starts_ok).astype(np.int64)
    else:
        gaps = np.zeros(0, np.int64)
    idx = np.cumsum(gaps + 1) - 1
    out_of_range = np.flatnonzero(idx >= numel)
    if out_of_range.size:
        i = int(out_of_range[0])
        raise WireFormatError(WireError.BAD_INDEX, f"{what}: index {int(idx[i])} (gap {i}) >= numel {numel}")
    if first < ends.size:
        if bad_big[first]:
            raise WireFormatError(WireError.BAD_INDEX, f"{what}: index gap {first} above 2**32 - 1")
        raise WireFormatError(WireError.NOT_CANONICAL, f"{what}: overlong varint for index gap {first}")
    if ends.size < count:
        tail = avail - (int(ends[-1]) + 1 if ends.size else 0)
        if tail >= 5:  # the 5th byte of an unfinished varint carries the continuation bit: above 32 bits
            raise WireFormatError(WireError.BAD_INDEX, f"{what}: index gap {ends.size} above 2**32 - 1")
        raise WireFormatError(WireError.TRUNCATED, f"{what}: {count} index gaps expected, the bytes end after "
                                                   f"{ends.size}")
    c.pos += nbytes
    c.pad(f"{what} indices")
    return idx
