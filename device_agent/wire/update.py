"""The model update (downlink, .tfu): new values of a plan's shared trainable tensors, signed by the coordinator.

One writer (:meth:`ModelUpdate.to_bytes`), one reader (:meth:`ModelUpdate.from_bytes`); layout in
docs/formats.md, "Model update". The reader checks the envelope and signature first, then every record on its
own; :func:`apply_update` then checks the update against the plan (hash, ids, dtypes, sizes). Frozen and
personal tensors never travel in an update: the reader of a plan refuses an update that names them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from device_agent.engine import ir
from device_agent.wire.envelope import (
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

UPDATE = FormatId("model update", b"TFUP", 1, "ask the coordinator to publish the model again")

UPDATE_HEADER = struct.Struct("<II32sI")  # base_version, new_version, plan_hash, n_tensors: 44 bytes
RECORD = struct.Struct("<IBBHI")  # tensor_id, dtype, reserved u8, reserved u16, count: 12 bytes
VALUE_DTYPES = (ir.DType.INT8, ir.DType.INT16, ir.DType.INT32)


@dataclass
class ModelUpdate:
    """Model version ``new_version`` of the plan ``plan_hash``, to be applied on top of ``base_version``.

    ``tensors`` maps tensor id -> flat values (int8 / int16 / int32, the tensor's dtype), ids ascending.
    """

    base_version: int
    new_version: int
    plan_hash: bytes
    tensors: dict[int, np.ndarray] = field(default_factory=dict)

    def to_bytes(self, signer: Signer | None = None) -> bytes:
        """The signed blob (unsigned when ``signer`` is None). Raises ValueError on values it cannot encode."""
        if len(self.plan_hash) != 32:
            raise ValueError(f"plan_hash must be 32 bytes, got {len(self.plan_hash)}")
        if not 0 <= self.base_version < self.new_version <= 0xFFFFFFFF:
            raise ValueError(f"versions must satisfy 0 <= base < new < 2**32, got {self.base_version} -> "
                             f"{self.new_version}")
        b = Builder()
        b.pack("II32sI", self.base_version, self.new_version, bytes(self.plan_hash), len(self.tensors))
        for tid in sorted(self.tensors):
            arr = np.asarray(self.tensors[tid]).reshape(-1)
            dtype = _DTYPE_OF.get(arr.dtype.newbyteorder("=").str)
            if dtype is None:
                raise ValueError(f"tensor {tid}: values must be int8, int16 or int32, got {arr.dtype}")
            if not 0 <= tid <= 0xFFFFFFFF or arr.size == 0:
                raise ValueError(f"tensor {tid}: id out of range or no values")
            b.pack("IBBHI", tid, int(dtype), 0, 0, arr.size)
            b.array(arr, f"<i{ITEMSIZE[dtype]}")
        return seal(UPDATE, bytes(b.buf), signer)

    @classmethod
    def from_bytes(cls, data: bytes, *, verify: Verifier) -> ModelUpdate:
        """Parse an update blob; raises :class:`WireFormatError` on any bad input (signature checked first)."""
        c = Cursor(open_blob(UPDATE, data, verify), "model update")
        base, new, phash, n = c.unpack(UPDATE_HEADER, "header")
        if new <= base:
            raise WireFormatError(WireError.BAD_VALUE, f"model update: new version {new} must exceed base {base}")
        if n > MAX_TENSORS:
            raise WireFormatError(WireError.SIZE_OVERFLOW, f"model update: {n} tensors, at most {MAX_TENSORS}")
        tensors: dict[int, np.ndarray] = {}
        prev = -1
        for i in range(n):
            tid, dtype, r8, r16, count = c.unpack(RECORD, f"record {i}")
            what = f"model update: record {i} (tensor {tid})"
            if tid <= prev:
                raise WireFormatError(WireError.ID_ORDER, f"{what}: tensor ids not strictly increasing")
            if dtype not in _VALUE_CODES:
                raise WireFormatError(WireError.BAD_ENUM, f"{what}: dtype {dtype} is not INT8/INT16/INT32")
            if r8 or r16:
                raise WireFormatError(WireError.RESERVED_NONZERO, f"{what}: reserved bytes not zero")
            if count == 0 or count > MAX_NUMEL:
                raise WireFormatError(WireError.SIZE_OVERFLOW, f"{what}: count {count} outside [1, 2**31 - 1]")
            dt = ir.DType(dtype)
            tensors[tid] = c.array(f"<i{ITEMSIZE[dt]}", count, what).astype(ir.DTYPE_NUMPY[dt])
            prev = tid
        c.end()
        return cls(base, new, phash, tensors)


_DTYPE_OF = {np.dtype(ir.DTYPE_NUMPY[d]).str: d for d in VALUE_DTYPES}
_VALUE_CODES = frozenset(int(d) for d in VALUE_DTYPES)


def update_hash(blob: bytes) -> bytes:
    """The model version's 32-byte identity (the ``base_hash`` a delta refers to): SHA-256 of magic ‖ version ‖ body."""
    return content_hash(blob)


def trainable_state(plan: ir.Plan) -> dict[int, np.ndarray]:
    """Copies of every TRAINABLE tensor's values (personal ones included), keyed by tensor id."""
    return {t.id: np.array(t.data, dtype=ir.DTYPE_NUMPY[t.dtype]).reshape(t.shape) for t in plan.trainable}


def update_from_state(plan: ir.Plan, state: dict[int, np.ndarray], *, base_version: int, new_version: int,
                      plan_hash: bytes | None = None) -> ModelUpdate:
    """A :class:`ModelUpdate` carrying ``state``'s values of every shared (non-personal) trainable tensor.

    ``plan_hash`` saves re-serializing the plan when the caller already knows it.
    """
    tensors = {}
    for t in plan.trainable:
        if t.personal:
            continue
        if t.id not in state:
            raise ValueError(f"state lacks trainable tensor {t.id} ({t.name})")
        tensors[t.id] = _checked(t, np.asarray(state[t.id]), ValueError)
    return ModelUpdate(base_version, new_version, plan_hash or _plan_hash(plan), tensors)


def apply_update(update: ModelUpdate, plan: ir.Plan, state: dict[int, np.ndarray] | None = None, *,
                 plan_hash: bytes | None = None) -> dict[int, np.ndarray]:
    """The new trainable state: ``state`` (default: the plan's own values) with the update's tensors replaced.

    Pure: neither ``plan`` nor ``state`` is modified. Raises :class:`WireFormatError` ``PLAN_MISMATCH`` when the
    update is for another plan, names a tensor that is not a shared trainable one, or has a wrong dtype/size.
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
        new[tid] = _checked(t, values, None)
    return new


def _checked(t: ir.Tensor, values: np.ndarray, err: type | None) -> np.ndarray:
    dt = np.dtype(ir.DTYPE_NUMPY[t.dtype])
    if values.dtype != dt or values.size != t.numel:
        msg = f"tensor {t.id} ({t.name}): {t.numel} {dt} values expected, got {values.size} {values.dtype}"
        if err is not None:
            raise err(msg)
        raise WireFormatError(WireError.PLAN_MISMATCH, f"model update: {msg}")
    return values.reshape(t.shape).copy()
