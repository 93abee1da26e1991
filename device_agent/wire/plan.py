"""The plan blob (.ttp): one writer and one reader for :class:`ir.Plan` (layout in docs/formats.md, "Plan blob").

The body is header, scheme ratios, a fixed-size tensor table, op records, the optional RECIPE section (v2: the
training recipe and the optimizer-state slot of every CONV2D_UPDATE, docs/engine.md "Training recipe"), strings,
then one 4-byte aligned data section (per tensor: float32 scales, then CONST/TRAINABLE values) that a C runtime can use in place from flash.
Every offset is the canonical one, so a plan has exactly one encoding and its hash (:func:`plan_hash`) is stable.
The reader refuses anything that could make a runtime read out of bounds; it does not check kernel semantics
(e.g. that a conv's weight shape matches its input): that is the runtime's prepare step.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from device_agent.engine import ir
from device_agent.engine.recipe import OptSlot, PlanRecipe, Recipe, RecipePlan, plan_recipe
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

# NOTE: v2 added the RECIPE section (flag FLAG_RECIPE); v3 the PATCH op (type 9, a variable input count). Older
# blobs are refused (UNSUPPORTED_VERSION) rather than read: the plan hash covers the version, so a silently
# upgraded plan would change identity, and a v2 runtime cannot run a v3 plan's PATCH op.
PLAN = FormatId("plan", b"TFPL", 3, "recompile with `tinyfleet compile`")

MAX_TENSORS = 65535
MAX_OPS = 65535
MAX_RANK = 4
MAX_NAME = 255  # UTF-8 bytes per name
MAX_NUMEL = 2**31 - 1
ARENA_ALIGN = 4  # every arena offset is a multiple of this (fleet/compiler/planner.py ALIGN; kernels read int32 in place)
NONE_ID = -1  # "no tensor": label_id of an inference-only plan, optional op inputs

PLAN_HEADER = struct.Struct("<IIiiiIIIII")  # 40 bytes
TENSOR_REC = struct.Struct("<BBBB4IiiIIII")  # 44 bytes
OP_HEAD = struct.Struct("<BBBBI")  # 8 bytes

FLAG_PERSONAL = 1
SCHEME_CLASSIFIER_WEIGHT = 1
SCHEME_CLASSIFIER_BIAS = 2
FLAG_RECIPE = 4  # header flags: a RECIPE section follows the op records
RECIPE_HEAD = struct.Struct("<HHBBHIIII")  # accum, beta_q15, frac_bits, 0, lr_min_q15, warmup, total, opt bytes, n
RECIPE_SLOT = struct.Struct("<Iiii")  # op index, wbuf_off, bbuf_off, frac_off

ITEMSIZE = {ir.DType.INT8: 1, ir.DType.INT16: 2, ir.DType.INT32: 4}
DATA_KINDS = (ir.Kind.CONST, ir.Kind.TRAINABLE)

# (inputs, allowed output counts) per op type; the wire form of the comments in ir.OpType.
ARITY: dict[ir.OpType, tuple[int, tuple[int, ...]]] = {
    ir.OpType.CONV2D: (3, (1, 2)), ir.OpType.ADD: (2, (1, 2)), ir.OpType.AVGPOOL: (1, (1,)),
    ir.OpType.RESHAPE: (1, (1,)), ir.OpType.EMBEDDING: (2, (1,)), ir.OpType.CLAMP: (1, (1, 2)),
    ir.OpType.SAVE_CHANNELS: (1, (1,)), ir.OpType.PWDW: (5, (1,)), ir.OpType.SOFTMAX_CE: (2, (1,)),
    ir.OpType.APPLY_MASK: (2, (1,)), ir.OpType.CONV2D_BWD_INPUT: (2, (1,)), ir.OpType.CONV2D_UPDATE: (4, (0,)),
    ir.OpType.GRAD_ACCUM: (2, (1,)), ir.OpType.AVGPOOL_BWD: (1, (1,)), ir.OpType.RESHAPE_BWD: (1, (1,)),
    ir.OpType.EMBEDDING_UPDATE: (3, (0,)), ir.OpType.PATCH: (-1, (1,)),
}
# NOTE: -1 inputs: PATCH takes x then a (w, b) pair per conv layer, an odd count in [1, 1 + 2 * PATCH_MAX_CONVS].
PATCH_MAX_CONVS = 16
# (op type, input position) that may be NONE_ID: CONV2D_UPDATE's x_saved when only the bias trains.
OPTIONAL_INPUTS = frozenset({(ir.OpType.CONV2D_UPDATE, 1)})


def tensor_nbytes(dtype: ir.DType, numel: int) -> int:
    """Bytes of a tensor's values: ``numel * itemsize``, MASK bit-packed ``ceil(numel / 8)``."""
    return (numel + 7) // 8 if dtype == ir.DType.MASK else numel * ITEMSIZE[dtype]


def _pad4(n: int) -> int:
    return n + (-n % 4)


# ---------------------------------------------------------------------------------------------------- writer


def plan_to_bytes(plan: ir.Plan, signer: Signer | None = None) -> bytes:
    """Serialize ``plan`` (signed when ``signer`` is given). Raises ValueError for a plan the reader would refuse.

    Parameters
    ----------
    plan : the plan; ``plan.tensors[i].id`` must be ``i``; CONST/TRAINABLE tensors carry ``data``.
    signer : ``Signer.ed25519(key)`` / ``Signer.hmac_sha256(key)``, or None for an unsigned blob.
    """
    try:
        body = _write_body(plan)
    except struct.error as e:
        raise ValueError(f"plan {plan.name!r}: a field does not fit its wire width: {e}") from None
    blob = seal(PLAN, body, signer)
    try:  # NOTE: the writer never emits what the reader refuses; one reader holds every rule.
        _read_body(memoryview(body))
    except WireFormatError as e:
        raise ValueError(f"plan {plan.name!r} cannot be serialized: {e}") from None
    return blob


def _write_body(plan: ir.Plan) -> bytes:
    nt, no = len(plan.tensors), len(plan.ops)
    ratios = sorted(plan.scheme.weight_ratio.items())
    b = Builder()
    pr = plan_recipe(plan)
    flags = (SCHEME_CLASSIFIER_WEIGHT if plan.scheme.classifier_weight else 0) | \
            (SCHEME_CLASSIFIER_BIAS if plan.scheme.classifier_bias else 0) | (FLAG_RECIPE if pr is not None else 0)
    head_at = len(b.buf)
    b.pack("40x")  # header, filled in once the data section offset is known
    for conv, ratio in ratios:
        eighths = ratio * 8
        if eighths != round(eighths):
            raise ValueError(f"scheme weight ratio {ratio} of conv {conv} is not a multiple of 1/8")
        b.pack("II", conv, round(eighths))
    # The data section follows tensors, ops and strings: lay it out first so the tensor table can point into it.
    blobs, table = [], []
    cursor = 0
    for i, t in enumerate(plan.tensors):
        if t.id != i:
            raise ValueError(f"tensor {t.name!r}: id {t.id} at table index {i}")
        scales = np.asarray(t.scale, dtype=np.float64).reshape(-1)
        s32 = scales.astype("<f4")
        data_raw = _tensor_data(t)
        table.append((t, s32.size, cursor, len(data_raw)))
        blobs.append(s32.tobytes())
        blobs.append(data_raw + b"\0" * (-len(data_raw) % 4))
        cursor += s32.nbytes + _pad4(len(data_raw))
    tensors_at = len(b.buf)
    b.pack(f"{TENSOR_REC.size * nt}x")
    for op in plan.ops:
        _write_op(b, op)
    if pr is not None:
        r = pr.recipe
        b.pack(RECIPE_HEAD.format[1:], r.accum_steps, r.beta_q15, r.frac_bits, 0, r.lr_min_q15, r.warmup, r.total,
               pr.optimizer_bytes, len(pr.slots))
        for sl in pr.slots:
            b.pack(RECIPE_SLOT.format[1:], sl.op_index, sl.wbuf_off, sl.bbuf_off, sl.frac_off)
    for s in [plan.name, plan.scheme.name] + [t.name for t in plan.tensors] + [op.name for op in plan.ops]:
        b.string(s, MAX_NAME, "name")
    data_abs = b.abs_pos
    for i, (t, n_scales, rel, data_len) in enumerate(table):
        if len(t.shape) > MAX_RANK:
            raise ValueError(f"tensor {t.name!r}: rank {len(t.shape)} > {MAX_RANK}")
        dims = list(t.shape) + [0] * (MAX_RANK - len(t.shape))
        data_off = data_abs + rel + 4 * n_scales if data_len else 0
        TENSOR_REC.pack_into(b.buf, tensors_at + i * TENSOR_REC.size, int(t.kind), int(t.dtype), len(t.shape),
                             FLAG_PERSONAL if t.personal else 0, *dims, int(t.zero_point), int(t.offset),
                             n_scales, data_abs + rel, data_off, data_len)
    b.buf += b"".join(blobs)
    PLAN_HEADER.pack_into(b.buf, head_at, nt, no, plan.input_id, plan.label_id, plan.logits_id, plan.arena_bytes,
                          plan.scheme.n_bias_update, flags, len(ratios), data_abs)
    return bytes(b.buf)


def _tensor_data(t: ir.Tensor) -> bytes:
    if t.kind not in DATA_KINDS:
        if t.data is not None:
            raise ValueError(f"tensor {t.name!r}: {t.kind.name} tensors carry no data")
        return b""
    if t.data is None:
        raise ValueError(f"tensor {t.name!r}: {t.kind.name} tensor without data")
    numel = math.prod(t.shape)
    arr = np.asarray(t.data).reshape(-1)
    want = tensor_nbytes(t.dtype, numel) if t.dtype == ir.DType.MASK else numel
    if arr.size != want:
        raise ValueError(f"tensor {t.name!r}: {want} values expected, data has {arr.size}")
    dt = np.dtype(ir.DTYPE_NUMPY[t.dtype]).newbyteorder("<")
    out = arr.astype(dt)
    if not np.array_equal(out.astype(np.int64), arr.astype(np.int64)):
        raise ValueError(f"tensor {t.name!r}: values do not fit {t.dtype.name}")
    return out.tobytes()


def _write_op(b: Builder, op: ir.Op) -> None:
    op.check()
    start = len(b.buf)
    b.pack("BBBBI", int(op.type), len(op.inputs), len(op.outputs), 0, 0)
    b.pack(f"{len(op.inputs) + len(op.outputs)}i", *op.inputs, *op.outputs)
    for name, is_array in ir.OP_ATTRS[op.type]:
        v = op.attrs[name]
        if is_array:
            arr = np.asarray(v).reshape(-1)
            if arr.size and (arr.dtype.kind not in "iu" or arr.min() < -2**31 or arr.max() >= 2**31):
                raise ValueError(f"op {op.name!r}: attr {name} must be int32 values")
            b.pack("I", arr.size)
            b.array(arr, "<i4")
        else:
            if isinstance(v, np.ndarray) and v.size != 1:
                raise ValueError(f"op {op.name!r}: attr {name} is a scalar, got an array of {v.size}")
            b.pack("i", int(v))
    struct.pack_into("<I", b.buf, start + 4, len(b.buf) - start)


# ---------------------------------------------------------------------------------------------------- reader


def plan_from_bytes(data: bytes, *, verify: Verifier) -> ir.Plan:
    """Parse a plan blob; raises :class:`WireFormatError` (with a :class:`WireError` code) on any bad input.

    Parameters
    ----------
    data : the whole blob.
    verify : the signature policy, e.g. ``Verifier.ed25519(fleet_public_key)``; checked before the body is read.
    """
    return _read_body(open_blob(PLAN, data, verify))


def plan_hash(plan_or_blob: ir.Plan | bytes) -> bytes:
    """The plan's 32-byte identity: SHA-256 of ``magic ‖ version ‖ body`` (signature and flags excluded)."""
    blob = plan_to_bytes(plan_or_blob) if isinstance(plan_or_blob, ir.Plan) else bytes(plan_or_blob)
    return content_hash(blob)


def _fail(code: WireError, msg: str) -> WireFormatError:
    return WireFormatError(code, f"plan: {msg}")


def _read_body(body: memoryview) -> ir.Plan:
    c = Cursor(body, "plan")
    nt, no, input_id, label_id, logits_id, arena, n_bias, sflags, n_ratios, data_abs = c.unpack(PLAN_HEADER,
                                                                                               "header")
    if nt > MAX_TENSORS or no > MAX_OPS:
        raise _fail(WireError.SIZE_OVERFLOW, f"{nt} tensors / {no} ops, at most {MAX_TENSORS} / {MAX_OPS}")
    for what, tid, allow_none in (("input_id", input_id, False), ("label_id", label_id, True),
                                  ("logits_id", logits_id, False)):
        if not (0 <= tid < nt or (allow_none and tid == NONE_ID)):
            raise _fail(WireError.BAD_INDEX, f"{what} {tid} out of range [0, {nt})")
    if arena > 2**31 - 1:
        raise _fail(WireError.SIZE_OVERFLOW, f"arena_bytes {arena} above 2**31 - 1")
    if sflags & ~(SCHEME_CLASSIFIER_WEIGHT | SCHEME_CLASSIFIER_BIAS | FLAG_RECIPE):
        raise _fail(WireError.RESERVED_NONZERO, f"scheme flags {sflags:#x} has reserved bits set")
    c.need(8 * n_ratios, "scheme ratios")
    ratios: dict[int, float] = {}
    prev = -1
    for _ in range(n_ratios):
        conv, eighths = c.unpack(_RATIO, "scheme ratio")
        if conv <= prev:
            raise _fail(WireError.ID_ORDER, f"scheme conv indices not strictly increasing at {conv}")
        if not 0 <= eighths <= 8:
            raise _fail(WireError.BAD_VALUE, f"weight ratio of conv {conv}: {eighths}/8 is outside [0, 8]/8")
        prev = conv
        ratios[conv] = eighths / 8
    c.need(TENSOR_REC.size * nt, "tensor table")
    recs = [c.unpack(TENSOR_REC, f"tensor {i}") for i in range(nt)]
    ops = [_read_op(c, i, nt) for i in range(no)]
    recipe = _read_recipe(c, ops) if sflags & FLAG_RECIPE else None
    names = [c.string(MAX_NAME, "name") for _ in range(2 + nt + no)]
    if c.abs_pos != data_abs:
        raise _fail(WireError.BAD_OFFSET, f"data section at offset {data_abs}, the layout puts it at {c.abs_pos}")
    tensors = [_read_tensor(c, i, rec, arena, names[2 + i]) for i, rec in enumerate(recs)]
    c.end()
    for i, op in enumerate(ops):
        op.name = names[2 + nt + i]
    scheme = ir.SparseScheme(names[1], n_bias, ratios, bool(sflags & SCHEME_CLASSIFIER_WEIGHT),
                             bool(sflags & SCHEME_CLASSIFIER_BIAS))
    if recipe is not None:
        return RecipePlan(tensors, ops, input_id, label_id, logits_id, arena, scheme, names[0], recipe)
    return ir.Plan(tensors, ops, input_id, label_id, logits_id, arena, scheme, names[0])


_RATIO = struct.Struct("<II")


def _read_op(c: Cursor, index: int, nt: int) -> ir.Op:
    start = c.pos
    typ, n_in, n_out, reserved, size = c.unpack(OP_HEAD, f"op {index}")
    if typ not in _OP_TYPES:
        raise _fail(WireError.BAD_ENUM, f"op {index}: unknown op type {typ}")
    typ = ir.OpType(typ)
    if reserved:
        raise _fail(WireError.RESERVED_NONZERO, f"op {index}: reserved byte {reserved}")
    want_in, want_out = ARITY[typ]
    ok_in = n_in % 2 == 1 and n_in <= 1 + 2 * PATCH_MAX_CONVS if want_in < 0 else n_in == want_in
    if not ok_in or n_out not in want_out:
        want = f"1 + 2k (k <= {PATCH_MAX_CONVS})" if want_in < 0 else str(want_in)
        raise _fail(WireError.BAD_VALUE, f"op {index} {typ.name}: {want} inputs / {want_out} outputs expected, "
                                         f"got {n_in} / {n_out}")
    ids = c.unpack(struct.Struct(f"<{n_in + n_out}i"), f"op {index} tensor ids")
    for pos, tid in enumerate(ids):
        if not (0 <= tid < nt or (tid == NONE_ID and (typ, pos) in OPTIONAL_INPUTS)):
            raise _fail(WireError.BAD_INDEX, f"op {index} {typ.name}: tensor index {tid} out of range [0, {nt})")
    attrs: dict[str, int | np.ndarray] = {}
    for name, is_array in ir.OP_ATTRS[typ]:
        if is_array:
            count = c.u32(f"op {index} attr {name} count")
            attrs[name] = c.array("<i4", count, f"op {index} attr {name}").astype(np.int32)
        else:
            attrs[name] = c.i32(f"op {index} attr {name}")
    if size != c.pos - start:
        raise _fail(WireError.BAD_LENGTH, f"op {index}: record size {size}, its fields take {c.pos - start}")
    return ir.Op(typ, list(ids[:n_in]), list(ids[n_in:]), attrs)


def _read_recipe(c: Cursor, ops: list[ir.Op]) -> PlanRecipe:
    """The RECIPE section: options in range, one slot per CONV2D_UPDATE in op order, offsets aligned inside the
    optimizer region (that they are the canonical layout is the runtime's prepare check, recipe.check_plan_recipe)."""
    accum, beta, frac, reserved, lr_min, warmup, total, opt_bytes, n_slots = c.unpack(RECIPE_HEAD, "recipe")
    if reserved:
        raise _fail(WireError.RESERVED_NONZERO, f"recipe: reserved byte {reserved}")
    if not (1 <= accum and beta <= 32767 and frac in (0, 8, 16) and lr_min <= 32768
            and (total == 0 or total > warmup)):
        raise _fail(WireError.BAD_VALUE, f"recipe: accum_steps {accum} (>= 1), beta_q15 {beta} (<= 32767), "
                                         f"frac_bits {frac} (0/8/16), lr_min_q15 {lr_min} (<= 32768), "
                                         f"warmup {warmup} < total {total} (or total 0)")
    if opt_bytes > 2**31 - 1:
        raise _fail(WireError.SIZE_OVERFLOW, f"recipe: optimizer_bytes {opt_bytes} above 2**31 - 1")
    updates = [i for i, op in enumerate(ops) if op.type == ir.OpType.CONV2D_UPDATE]
    r = Recipe(accum, beta / 32768, frac, warmup, total, lr_min)
    if not r.active or n_slots != len(updates) or any(op.type == ir.OpType.EMBEDDING_UPDATE for op in ops):
        raise _fail(WireError.BAD_VALUE, f"recipe: {n_slots} slots for {len(updates)} CONV2D_UPDATE ops, no "
                                         f"EMBEDDING_UPDATE, options not all default expected")
    c.need(RECIPE_SLOT.size * n_slots, "recipe slots")
    slots = []
    for want in updates:
        op_index, *offs = c.unpack(RECIPE_SLOT, "recipe slot")
        if op_index != want:
            raise _fail(WireError.BAD_INDEX, f"recipe slot for op {op_index}, the next CONV2D_UPDATE is op {want}")
        for off in offs:
            if off != -1 and not (0 <= off < opt_bytes and off % 4 == 0):
                raise _fail(WireError.BAD_OFFSET, f"recipe slot of op {want}: offset {off} outside the "
                                                  f"{opt_bytes}-byte optimizer region or not 4-aligned")
        slots.append(OptSlot(op_index, *offs))
    return PlanRecipe(r, opt_bytes, tuple(slots))


_OP_TYPES = frozenset(int(t) for t in ir.OpType)
_KINDS = frozenset(int(k) for k in ir.Kind)
_DTYPES = frozenset(int(d) for d in ir.DType)


def _read_tensor(c: Cursor, i: int, rec: tuple, arena: int, name: str) -> ir.Tensor:
    kind, dtype, rank, flags, d0, d1, d2, d3, zp, offset, n_scales, scales_off, data_off, data_len = rec
    what = f"tensor {i} ({name})"
    if kind not in _KINDS:
        raise _fail(WireError.BAD_ENUM, f"{what}: unknown kind {kind}")
    if dtype not in _DTYPES:
        raise _fail(WireError.BAD_ENUM, f"{what}: unknown dtype {dtype}")
    kind, dtype = ir.Kind(kind), ir.DType(dtype)
    if flags & ~FLAG_PERSONAL:
        raise _fail(WireError.RESERVED_NONZERO, f"{what}: flags {flags:#x} has reserved bits set")
    personal = bool(flags & FLAG_PERSONAL)
    if personal and kind != ir.Kind.TRAINABLE:
        raise _fail(WireError.BAD_VALUE, f"{what}: only TRAINABLE tensors can be personal, this is {kind.name}")
    dims = (d0, d1, d2, d3)
    if rank > MAX_RANK:
        raise _fail(WireError.BAD_SHAPE, f"{what}: rank {rank} > {MAX_RANK}")
    if any(d == 0 for d in dims[:rank]) or any(dims[rank:]):
        raise _fail(WireError.BAD_SHAPE, f"{what}: dims {dims[:rank]} must be >= 1, unused dims 0, got {dims}")
    numel = math.prod(dims[:rank])
    if numel > MAX_NUMEL:
        raise _fail(WireError.SIZE_OVERFLOW, f"{what}: {numel} elements, at most 2**31 - 1")
    nbytes = tensor_nbytes(dtype, numel)
    if dtype == ir.DType.INT8 and not -128 <= zp <= 127:
        raise _fail(WireError.BAD_VALUE, f"{what}: int8 zero point {zp} outside [-128, 127]")
    if offset != -1 and (offset < 0 or offset + nbytes > arena):
        raise _fail(WireError.OUT_OF_ARENA, f"{what}: arena offset {offset} + {nbytes} bytes beyond arena {arena}")
    if offset != -1 and offset % ARENA_ALIGN:
        raise _fail(WireError.BAD_OFFSET, f"{what}: arena offset {offset} is not a multiple of {ARENA_ALIGN}")
    if n_scales != 1 and not (rank >= 1 and n_scales == dims[0]):
        raise _fail(WireError.BAD_SHAPE, f"{what}: {n_scales} scales, expected 1 or shape[0]")
    if scales_off != c.abs_pos:
        raise _fail(WireError.BAD_OFFSET, f"{what}: scales at {scales_off}, the layout puts them at {c.abs_pos}")
    scales = c.array("<f4", n_scales, f"{what} scales").astype(np.float32)
    if not (np.isfinite(scales).all() and (scales > 0).all()):
        raise _fail(WireError.BAD_SCALE, f"{what}: scales must be finite and > 0, got {scales[:4]}...")
    data = None
    if kind in DATA_KINDS:
        if data_len != nbytes:
            raise _fail(WireError.BAD_LENGTH, f"{what}: {nbytes} data bytes expected, record says {data_len}")
        if data_off != c.abs_pos:
            raise _fail(WireError.BAD_OFFSET, f"{what}: data at {data_off}, the layout puts it at {c.abs_pos}")
        if dtype == ir.DType.MASK:
            data = c.array("<u1", nbytes, f"{what} data")
        else:
            data = c.array(f"<i{ITEMSIZE[dtype]}", numel, f"{what} data")
            data = data.astype(ir.DTYPE_NUMPY[dtype]).reshape(dims[:rank])
    elif data_off or data_len:
        raise _fail(WireError.BAD_VALUE, f"{what}: {kind.name} tensors carry no data, record has {data_len} bytes")
    return ir.Tensor(i, name, tuple(dims[:rank]), dtype, kind, scales, zp, data, offset, personal)
