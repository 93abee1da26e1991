"""The Python half of the differential check: the same verdict line firmware/fuzz/decode_cli.c prints.

``plan`` / ``update``: ``ok <sha256>`` over the decoded values (layouts below, field for field those of
decode_cli.c) or ``err <WireError>``; ``frames``: one word per frame a stream holds. Test code only.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from device_agent.engine import ir
from device_agent.wire import ModelUpdate, Verifier, WireFormatError, plan_from_bytes
from device_agent.wire import frames as F
from device_agent.wire.plan import SCHEME_CLASSIFIER_BIAS, SCHEME_CLASSIFIER_WEIGHT


class _H:
    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def u8(self, v: int) -> None:
        self.h.update(struct.pack("<B", v))

    def u32(self, v: int) -> None:
        self.h.update(struct.pack("<I", v & 0xFFFFFFFF))

    def bytes(self, b: bytes) -> None:
        self.u32(len(b))
        self.h.update(b)

    def hex(self) -> str:
        return self.h.hexdigest()


def _le(arr: np.ndarray, dtype: ir.DType) -> bytes:
    return np.asarray(arr).reshape(-1).astype(np.dtype(ir.DTYPE_NUMPY[dtype]).newbyteorder("<")).tobytes()


def plan_digest(p: ir.Plan) -> str:
    """Header ids, arena, scheme, every tensor, every op (attributes in ir.OP_ATTRS order), every string."""
    h = _H()
    for v in (len(p.tensors), len(p.ops), p.input_id, p.label_id, p.logits_id, p.arena_bytes):
        h.u32(v)
    s = p.scheme
    h.u32(s.n_bias_update)
    h.u32((SCHEME_CLASSIFIER_WEIGHT if s.classifier_weight else 0) | (SCHEME_CLASSIFIER_BIAS if s.classifier_bias else 0))
    h.u32(len(s.weight_ratio))
    for conv, ratio in sorted(s.weight_ratio.items()):
        h.u32(conv)
        h.u32(round(ratio * 8))
    for t in p.tensors:
        h.u8(int(t.kind))
        h.u8(int(t.dtype))
        h.u8(len(t.shape))
        h.u8(int(t.personal))
        for d in t.shape:
            h.u32(d)
        h.u32(t.zero_point)
        h.u32(t.offset)
        h.bytes(np.asarray(t.scale, "<f4").tobytes())
        h.bytes(b"" if t.data is None else _le(t.data, t.dtype))
    for op in p.ops:
        h.u8(int(op.type))
        h.u8(len(op.inputs))
        h.u8(len(op.outputs))
        for tid in (*op.inputs, *op.outputs):
            h.u32(tid)
        for name, is_array in ir.OP_ATTRS[op.type]:
            v = op.attrs[name]
            if is_array:
                h.bytes(np.asarray(v).astype("<i4").tobytes())
            else:
                h.u32(int(v))
    for name in [p.name, p.scheme.name] + [t.name for t in p.tensors] + [op.name for op in p.ops]:
        h.bytes(name.encode("utf-8"))
    return h.hex()


_CODE_OF = {np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3}


def update_digest(u: ModelUpdate) -> str:
    """A v1 update: versions, plan hash, per tensor id, dtype code and little-endian values (v2: the board
    does not read it, nothing to compare)."""
    if u.version != 1:
        return f"v{u.version}"
    h = _H()
    h.u32(u.base_version)
    h.u32(u.new_version)
    h.bytes(bytes(u.plan_hash))
    h.u32(len(u.tensors))
    for tid in sorted(u.tensors):
        arr = u.tensors[tid]
        code = _CODE_OF[arr.dtype.newbyteorder("=")]
        h.u32(tid)
        h.u8(code)
        h.bytes(_le(arr, ir.DType(code)))
    return h.hex()


def verdict(fmt: str, data: bytes, verify: Verifier) -> str:
    """What decode_cli prints for ``data`` read as ``fmt`` ("plan", "update", "frames")."""
    if fmt == "frames":
        return frames_words(data)
    try:
        if fmt == "plan":
            return "ok " + plan_digest(plan_from_bytes(data, verify=verify))
        return "ok " + update_digest(ModelUpdate.from_bytes(data, verify=verify))
    except WireFormatError as e:
        return f"err {int(e.code)}"


def frames_words(stream: bytes) -> str:
    """One word per frame the stream (plus a final 0x00) holds: ``ok:<sha256 of seq|code|payload>`` or
    ``err:<WireError>``; ``-`` for none."""
    words = []
    for item in F.Deframer().feed(bytes(stream) + b"\0"):
        if isinstance(item, F.Frame):
            h = _H()
            h.bytes(struct.pack("<HB", item.seq, item.code) + item.payload)
            words.append("ok:" + h.hex())
        else:
            words.append(f"err:{int(item.code)}")
    return " ".join(words) or "-"
