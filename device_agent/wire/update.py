"""The model update (downlink, .tfu): a model version of a plan's shared trainable tensors, signed by the coordinator.

One writer (:meth:`ModelUpdate.to_bytes`), one reader (:meth:`ModelUpdate.from_bytes`); layout in
docs/formats.md, "Model update". Version 2 (written) comes in two forms: FULL (every shared tensor's values, for
a device that holds no usable base) and DIFF (only what changed since ``base_version``, as v2 tensor records),
and names the version by its ``model_hash``, which the receiver checks after applying, so a DIFF applied to the
wrong base is refused instead of silently diverging. Version 1 (full values, fixed records) is still read, and
written only on request (``version=1``) for v1 firmware on the bridge's UART leg. Frozen and personal tensors
never travel: applying an update that names them is ``PLAN_MISMATCH``.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from device_agent.engine import ir
from device_agent.wire import sparse as S
from device_agent.wire.envelope import (
    HEADER_SIZE,
    Builder,
    Cursor,
    FormatId,
    Signer,
    Verifier,
    content_hash,
    open_blob,
    seal,
)
from device_agent.wire.errors import WireError, WireFormatError
from device_agent.wire.plan import ITEMSIZE, MAX_NUMEL, MAX_TENSORS
from device_agent.wire.plan import plan_hash as _plan_hash

UPDATE = FormatId("model update", b"TFUP", 2, "ask the coordinator to publish the model again")
UPDATE_V1 = FormatId("model update", b"TFUP", 1, UPDATE.remedy)

UPDATE_HEADER = struct.Struct("<IIB3x32s32sI")  # base, new, form, reserved[3], plan_hash, model_hash, n: 80 bytes
RESERVED_AT = 9  # body offset of the 3 reserved bytes (checked: zero)
MODEL_HASH_AT = HEADER_SIZE + 44  # absolute offset of model_hash in a v2 blob
UPDATE_HEADER_V1 = struct.Struct("<II32sI")  # base_version, new_version, plan_hash, n_tensors: 44 bytes
RECORD_V1 = struct.Struct("<IBBHI")  # tensor_id, dtype, reserved u8, reserved u16, count: 12 bytes
VALUE_DTYPES = (ir.DType.INT8, ir.DType.INT16, ir.DType.INT32)
UPDATE_ENCODINGS = frozenset({S.Enc.DENSE, S.Enc.FILLED_BITMAP, S.Enc.FILLED_GAPS})
MODEL_HASH_TAG = b"TFMH"
# NOTE: the reader expands FILLED records to dense arrays; without a bound a 130-byte blob naming numel 2**31 - 1
# would ask for 16 GB. 2**24 values is far above any trainable set a device holds (docs/formats.md).
MAX_UPDATE_VALUES = 2**24


class Form(IntEnum):
    FULL = 1  # every shared trainable tensor, its new values (unlisted coordinates of a FILLED record: 0)
    DIFF = 2  # changed tensors only, ``new - base`` (INT32 tensors: modulo 2**32); absent tensors unchanged


@dataclass
class ModelUpdate:
    """Model version ``new_version`` of the plan ``plan_hash``.

    ``tensors`` maps tensor id -> flat values: FULL form (and v1) the new values in the tensor's dtype (int8 /
    int16 / int32); DIFF form the int64 differences to ``base_version``. ``model_hash`` names the version (the
    ``base_hash`` of the next delta): v2 carries it; for FULL it may be left None and is computed from the
    tensors; for a v1 blob it is the blob's content hash.
    """

    base_version: int
    new_version: int
    plan_hash: bytes
    tensors: dict[int, np.ndarray] = field(default_factory=dict)
    form: Form = Form.FULL
    model_hash: bytes | None = None
    version: int = UPDATE.version  # the layout it was read from

    def to_bytes(self, signer: Signer | None = None, *, version: int = UPDATE.version) -> bytes:
        """The signed blob (unsigned when ``signer`` is None). Raises ValueError on values it cannot encode.

        ``version=1`` writes the v1 layout (FULL form only) for v1 firmware.
        """
        if len(self.plan_hash) != 32:
            raise ValueError(f"plan_hash must be 32 bytes, got {len(self.plan_hash)}")
        if not 0 <= self.base_version < self.new_version <= 0xFFFFFFFF:
            raise ValueError(f"versions must satisfy 0 <= base < new < 2**32, got {self.base_version} -> "
                             f"{self.new_version}")
        if version == 1:
            return self._to_bytes_v1(signer)
        if version != UPDATE.version:
            raise ValueError(f"model update version 1 or 2, got {version}")
        if self.form == Form.DIFF and self.base_version == 0:
            raise ValueError("a DIFF update needs a base_version >= 1")
        mh = self.model_hash if self.model_hash is not None else self._full_hash()
        if len(mh) != 32:
            raise ValueError(f"model_hash must be 32 bytes, got {len(mh)}")
        b = Builder()
        b.pack("IIB3x32s32sI", self.base_version, self.new_version, int(self.form), bytes(self.plan_hash), mh,
               len(self.tensors))
        for tid in sorted(self.tensors):
            arr = np.asarray(self.tensors[tid]).reshape(-1)
            if not np.issubdtype(arr.dtype, np.integer) or arr.size == 0:
                raise ValueError(f"tensor {tid}: integer values expected, got {arr.size} {arr.dtype}")
            S.write_record(b, S.full_record(tid, arr))
        return seal(UPDATE, bytes(b.buf), signer)

    def _full_hash(self) -> bytes:
        if self.form != Form.FULL:
            raise ValueError("a DIFF update needs its model_hash (update_from_states computes it)")
        items = [(tid, _dtype_of(tid, np.asarray(v).reshape(-1)), np.asarray(v).reshape(-1))
                 for tid, v in sorted(self.tensors.items())]
        return _hash_items(self.new_version, self.plan_hash, items)

    def _to_bytes_v1(self, signer: Signer | None) -> bytes:
        if self.form != Form.FULL:
            raise ValueError("model update v1 carries full values only: build it with update_from_state")
        b = Builder()
        b.pack("II32sI", self.base_version, self.new_version, bytes(self.plan_hash), len(self.tensors))
        for tid in sorted(self.tensors):
            arr = np.asarray(self.tensors[tid]).reshape(-1)
            dtype = _dtype_of(tid, arr)
            if not 0 <= tid <= 0xFFFFFFFF or arr.size == 0:
                raise ValueError(f"tensor {tid}: id out of range or no values")
            b.pack("IBBHI", tid, int(dtype), 0, 0, arr.size)
            b.array(arr, f"<i{ITEMSIZE[dtype]}")
        return seal(UPDATE_V1, bytes(b.buf), signer)

    @classmethod
    def from_bytes(cls, data: bytes, *, verify: Verifier, plan: ir.Plan | None = None,
                   plan_hash: bytes | None = None) -> ModelUpdate:
        """Parse a v2 (or v1) update blob; raises :class:`WireFormatError` on bad input (signature checked first).

        ``plan`` (with its ``plan_hash`` if the caller knows it): the plan the update must fit. Then an update for
        another plan, a tensor that is not one of its shared trainable tensors, or a tensor size other than the
        plan's is ``PLAN_MISMATCH`` before anything is expanded, so the reader allocates at most what the plan's
        shared tensors take (int64). Without a plan only the format bound (:data:`MAX_UPDATE_VALUES`) applies.
        """
        raw = bytes(data[:6]) if len(data) >= 16 else b""
        v1 = raw[:4] == UPDATE.magic and int.from_bytes(raw[4:6], "little") == 1
        expect, want = (None, None) if plan is None else (S.shared_numel(plan), plan_hash or _plan_hash(plan))
        if v1:
            u = cls._from_body_v1(open_blob(UPDATE_V1, data, verify), expect, want)
            u.model_hash = content_hash(bytes(data))
            return u
        c = Cursor(open_blob(UPDATE, data, verify), "model update")
        base, new, form, phash, mhash, n = c.unpack(UPDATE_HEADER, "header")
        if form not in (Form.FULL, Form.DIFF):
            raise WireFormatError(WireError.BAD_ENUM, f"model update: form {form}, expected 1 FULL or 2 DIFF")
        if any(c.buf[RESERVED_AT: RESERVED_AT + 3]):
            raise WireFormatError(WireError.RESERVED_NONZERO, "model update: reserved header bytes not zero")
        if new <= base or (form == Form.DIFF and base == 0):
            raise WireFormatError(WireError.BAD_VALUE, f"model update: versions {base} -> {new} (form {form}): new "
                                                       "must exceed base, and a DIFF needs base >= 1")
        if n > MAX_TENSORS:
            raise WireFormatError(WireError.SIZE_OVERFLOW, f"model update: {n} tensors, at most {MAX_TENSORS}")
        _check_plan_hash(phash, want)
        tensors: dict[int, np.ndarray] = {}
        prev = -1
        values_total = 0
        for i in range(n):
            r = S.read_record(c, f"model update: record {i}", UPDATE_ENCODINGS, prev, expect)
            values_total += r.numel
            if values_total > MAX_UPDATE_VALUES:
                raise WireFormatError(WireError.SIZE_OVERFLOW, f"model update: record {i} (tensor {r.tensor_id}) "
                                                               f"takes the update above {MAX_UPDATE_VALUES} values")
            if form == Form.DIFF and r.values.size == 0:
                raise WireFormatError(WireError.NOT_CANONICAL, f"model update: record {i} (tensor {r.tensor_id}): "
                                                               "an unchanged tensor is left out of a DIFF")
            flat = np.zeros(r.numel, np.int64)
            if r.indices is None:
                flat[:] = r.values
            else:
                flat[r.indices] = r.values
            tensors[r.tensor_id] = flat
            prev = r.tensor_id
        c.end()
        return cls(base, new, phash, tensors, Form(form), mhash, UPDATE.version)

    @classmethod
    def _from_body_v1(cls, body: memoryview, expect: dict[int, int] | None, want: bytes | None) -> ModelUpdate:
        c = Cursor(body, "model update")
        base, new, phash, n = c.unpack(UPDATE_HEADER_V1, "header")
        if new <= base:
            raise WireFormatError(WireError.BAD_VALUE, f"model update: new version {new} must exceed base {base}")
        if n > MAX_TENSORS:
            raise WireFormatError(WireError.SIZE_OVERFLOW, f"model update: {n} tensors, at most {MAX_TENSORS}")
        _check_plan_hash(phash, want)
        tensors: dict[int, np.ndarray] = {}
        prev = -1
        for i in range(n):
            tid, dtype, r8, r16, count = c.unpack(RECORD_V1, f"record {i}")
            what = f"model update: record {i} (tensor {tid})"
            if tid <= prev:
                raise WireFormatError(WireError.ID_ORDER, f"{what}: tensor ids not strictly increasing")
            if dtype not in _VALUE_CODES:
                raise WireFormatError(WireError.BAD_ENUM, f"{what}: dtype {dtype} is not INT8/INT16/INT32")
            if r8 or r16:
                raise WireFormatError(WireError.RESERVED_NONZERO, f"{what}: reserved bytes not zero")
            if count == 0 or count > MAX_NUMEL:
                raise WireFormatError(WireError.SIZE_OVERFLOW, f"{what}: count {count} outside [1, 2**31 - 1]")
            S.check_expected(expect, tid, count, what)
            dt = ir.DType(dtype)
            tensors[tid] = c.array(f"<i{ITEMSIZE[dt]}", count, what).astype(ir.DTYPE_NUMPY[dt])
            prev = tid
        c.end()
        return cls(base, new, phash, tensors, Form.FULL, None, 1)


def _check_plan_hash(got: bytes, want: bytes | None) -> None:
    if want is not None and bytes(got) != want:
        raise WireFormatError(WireError.PLAN_MISMATCH, f"model update is for plan {bytes(got).hex()[:16]}..., this "
                                                       f"plan is {want.hex()[:16]}...: load the right plan")


_DTYPE_OF = {np.dtype(ir.DTYPE_NUMPY[d]).str: d for d in VALUE_DTYPES}
_VALUE_CODES = frozenset(int(d) for d in VALUE_DTYPES)


def _dtype_of(tid: int, arr: np.ndarray) -> ir.DType:
    dtype = _DTYPE_OF.get(arr.dtype.newbyteorder("=").str)
    if dtype is None:
        raise ValueError(f"tensor {tid}: full values must be int8, int16 or int32, got {arr.dtype}")
    return dtype


def _hash_items(version: int, plan_hash: bytes, items) -> bytes:
    h = hashlib.sha256()
    h.update(MODEL_HASH_TAG + struct.pack("<I", version) + bytes(plan_hash))
    for tid, dtype, values in items:
        h.update(struct.pack("<II", tid, values.size))
        h.update(np.ascontiguousarray(values, dtype=f"<i{ITEMSIZE[dtype]}").tobytes())
    return h.digest()


def model_hash(plan: ir.Plan, state: dict[int, np.ndarray], version: int, *, plan_hash: bytes | None = None) -> bytes:
    """The 32-byte identity of model ``version``: SHA-256 of "TFMH" ‖ version ‖ plan hash ‖ per shared trainable
    tensor in id order (id u32, numel u32, values little-endian in the tensor's dtype) (docs/formats.md)."""
    ph = plan_hash or _plan_hash(plan)
    items = []
    for t in sorted(plan.trainable, key=lambda t: t.id):
        if not t.personal:
            items.append((t.id, t.dtype, np.asarray(state[t.id]).reshape(-1)))
    return _hash_items(version, ph, items)


def update_hash(blob: bytes) -> bytes:
    """The model version's 32-byte identity (the ``base_hash`` a delta refers to) from an update blob that
    passed the reader: the v2 ``model_hash`` field (same for the FULL and DIFF form of one version); for a v1
    blob, SHA-256 of magic ‖ version ‖ body."""
    if bytes(blob[:4]) == UPDATE.magic and int.from_bytes(bytes(blob[4:6]), "little") == UPDATE.version:
        if len(blob) < MODEL_HASH_AT + 32:
            raise WireFormatError(WireError.TRUNCATED, f"update_hash: {len(blob)} bytes is not a v2 update")
        return bytes(blob[MODEL_HASH_AT: MODEL_HASH_AT + 32])
    return content_hash(blob)


def trainable_state(plan: ir.Plan) -> dict[int, np.ndarray]:
    """Copies of every TRAINABLE tensor's values (personal ones included), keyed by tensor id."""
    return {t.id: np.array(t.data, dtype=ir.DTYPE_NUMPY[t.dtype]).reshape(t.shape) for t in plan.trainable}


def update_from_state(plan: ir.Plan, state: dict[int, np.ndarray], *, base_version: int, new_version: int,
                      plan_hash: bytes | None = None) -> ModelUpdate:
    """The FULL form: ``state``'s values of every shared (non-personal) trainable tensor (for any receiver).

    ``plan_hash`` saves re-serializing the plan when the caller already knows it.
    """
    ph = plan_hash or _plan_hash(plan)
    tensors = {}
    for t in plan.trainable:
        if t.personal:
            continue
        if t.id not in state:
            raise ValueError(f"state lacks trainable tensor {t.id} ({t.name})")
        tensors[t.id] = _checked(t, np.asarray(state[t.id]), ValueError).reshape(-1)
    return ModelUpdate(base_version, new_version, ph, tensors, Form.FULL,
                       model_hash(plan, tensors, new_version, plan_hash=ph))


def update_from_states(plan: ir.Plan, old_state: dict[int, np.ndarray], new_state: dict[int, np.ndarray], *,
                       base_version: int, new_version: int, plan_hash: bytes | None = None) -> ModelUpdate:
    """The DIFF form: what changed from ``old_state`` (model ``base_version``) to ``new_state``.

    Only changed tensors travel; INT32 tensors' differences wrap modulo 2**32 so they always fit. A receiver
    holding another base refuses it (``HASH_MISMATCH``) and needs the FULL form (:func:`update_from_state`).
    """
    ph = plan_hash or _plan_hash(plan)
    tensors, new = {}, {}
    for t in plan.trainable:
        if t.personal:
            continue
        for name, st in (("old", old_state), ("new", new_state)):
            if t.id not in st:
                raise ValueError(f"{name} state lacks trainable tensor {t.id} ({t.name})")
        o = _checked(t, np.asarray(old_state[t.id]), ValueError).reshape(-1).astype(np.int64)
        n = _checked(t, np.asarray(new_state[t.id]), ValueError).reshape(-1)
        new[t.id] = n
        d = n.astype(np.int64) - o
        if t.dtype == ir.DType.INT32:
            d = (d + 2**31) % 2**32 - 2**31
        if d.any():
            tensors[t.id] = d
    return ModelUpdate(base_version, new_version, ph, tensors, Form.DIFF,
                       model_hash(plan, new, new_version, plan_hash=ph))


_RANGE = {ir.DType.INT8: (-128, 127), ir.DType.INT16: (-32768, 32767), ir.DType.INT32: (-(2**31), 2**31 - 1)}


def apply_update(update: ModelUpdate, plan: ir.Plan, state: dict[int, np.ndarray] | None = None, *,
                 plan_hash: bytes | None = None) -> dict[int, np.ndarray]:
    """The new trainable state: ``state`` (default: the plan's own values) with the update applied.

    FULL replaces the tensors it carries (a v2 FULL must carry every shared one); DIFF adds its differences to
    ``state``, which must be model ``base_version``. Pure: neither ``plan`` nor ``state`` is modified.
    Raises :class:`WireFormatError`: ``PLAN_MISMATCH`` (another plan, a tensor that is not a shared trainable
    one, wrong dtype/size, a FULL lacking a tensor), ``BAD_VALUE`` (a difference taking an INT8/INT16 value out
    of range), ``HASH_MISMATCH`` (v2: the result is not the version the update names, e.g. a DIFF on another
    base: fetch the FULL form).
    """
    want = plan_hash or _plan_hash(plan)
    if bytes(update.plan_hash) != want:
        raise WireFormatError(WireError.PLAN_MISMATCH, f"model update is for plan {bytes(update.plan_hash).hex()[:16]}"
                                                       f"…, this plan is {want.hex()[:16]}…: load the right plan")
    new = {k: np.array(v) for k, v in (trainable_state(plan) if state is None else state).items()}
    by_id = {t.id: t for t in plan.trainable}
    for tid, values in update.tensors.items():
        t = by_id.get(tid)
        if t is None or t.personal:
            raise WireFormatError(WireError.PLAN_MISMATCH,
                                  f"model update: tensor {tid} is not a shared trainable tensor of this plan")
        if update.form == Form.FULL:
            new[tid] = _checked(t, _as_dtype(t, values), None)
        else:
            new[tid] = _added(t, new[tid], values)
    if update.version == 1:
        return new
    if update.form == Form.FULL:
        missing = sorted(t.id for t in plan.trainable if not t.personal and t.id not in update.tensors)
        if missing:
            raise WireFormatError(WireError.PLAN_MISMATCH, f"model update: FULL form lacks shared tensors {missing}")
    got = model_hash(plan, new, update.new_version, plan_hash=want)
    if got != bytes(update.model_hash or b""):
        raise WireFormatError(WireError.HASH_MISMATCH,
                              f"model update v{update.new_version}: the applied state does not hash to the update's "
                              f"model hash (base v{update.base_version} not held?): fetch the FULL model")
    return new


def _as_dtype(t: ir.Tensor, values: np.ndarray) -> np.ndarray:
    """v2 FULL values arrive as int64 (narrowest on the wire): back to the tensor's dtype, range-checked."""
    dt = np.dtype(ir.DTYPE_NUMPY[t.dtype])
    if values.dtype == dt or values.dtype != np.int64:
        return values
    lo, hi = _RANGE[t.dtype]
    if values.size and (values.min() < lo or values.max() > hi):
        raise WireFormatError(WireError.PLAN_MISMATCH, f"model update: tensor {t.id} ({t.name}) values outside "
                                                       f"{t.dtype.name}")
    return values.astype(dt)


def _added(t: ir.Tensor, old: np.ndarray, diff: np.ndarray) -> np.ndarray:
    dt = np.dtype(ir.DTYPE_NUMPY[t.dtype])
    if old.size != t.numel or diff.size != t.numel:
        raise WireFormatError(WireError.PLAN_MISMATCH, f"model update: tensor {t.id} ({t.name}) has {t.numel} "
                                                       f"values, the diff {diff.size}, the state {old.size}")
    s = old.reshape(-1).astype(np.int64) + np.asarray(diff, np.int64).reshape(-1)
    if t.dtype == ir.DType.INT32:
        s = (s + 2**31) % 2**32 - 2**31
    lo, hi = _RANGE[t.dtype]
    if s.size and (s.min() < lo or s.max() > hi):
        raise WireFormatError(WireError.BAD_VALUE, f"model update: diff takes tensor {t.id} ({t.name}) out of "
                                                   f"{t.dtype.name}")
    return s.astype(dt).reshape(t.shape)


def _checked(t: ir.Tensor, values: np.ndarray, err: type | None) -> np.ndarray:
    dt = np.dtype(ir.DTYPE_NUMPY[t.dtype])
    if values.dtype != dt or values.size != t.numel:
        msg = f"tensor {t.id} ({t.name}): {t.numel} {dt} values expected, got {values.size} {values.dtype}"
        if err is not None:
            raise err(msg)
        raise WireFormatError(WireError.PLAN_MISMATCH, f"model update: {msg}")
    return values.reshape(t.shape).copy()
