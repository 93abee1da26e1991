"""The Python decoders under fuzz: one function per target that feeds bytes to every reader of that format.

A target returns normally when the reader accepted or refused the bytes with :class:`WireFormatError`; anything
else escaping (IndexError, a numpy ValueError, MemoryError, a failed round-trip assertion) is a bug the fuzzer
reports. Accepted blobs must round-trip: the writer re-emits exactly the bytes read (one value, one encoding).
Used by the atheris entry points (``fuzz_*.py``) and by tests/pure/test_decoders_robust.py; test code only.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from device_agent.wire import (
    ModelUpdate,
    Verifier,
    content_hash,
    delta_from_bytes,
    plan_from_bytes,
    plan_to_bytes,
)
from device_agent.wire import frames as F
from device_agent.wire.delta import DELTA, DELTA_V1, read_records
from device_agent.wire.envelope import Cursor, open_blob
from device_agent.wire.errors import WireError, WireFormatError
from device_agent.wire.messages import MESSAGES, MessageError, parse
from device_agent.wire.plan import PLAN
from device_agent.wire.update import UPDATE, UPDATE_V1, update_hash

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"


def _policies() -> list[Verifier]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pub = Ed25519PublicKey.from_public_bytes((VECTORS / "keys" / "test_ed25519.pub").read_bytes())
    return [Verifier.unsigned(), Verifier.hmac_sha256((VECTORS / "keys" / "test_hmac.key").read_bytes()),
            Verifier.ed25519(pub), Verifier.skip()]


POLICIES = _policies()
UNSIGNED = POLICIES[0]


def reseal(data: bytes) -> bytes | None:
    """The input as an unsigned blob of its own length with a right CRC (the Python twin of
    firmware/fuzz/fuzz_util.h ``tf_fuzz_reseal``), so mutated bodies reach the body checks; None if too short."""
    if len(data) < 20:
        return None
    b = bytearray(data)
    struct.pack_into("<HIHH", b, 6, 0, len(b), 0, 0)
    struct.pack_into("<I", b, len(b) - 4, zlib.crc32(b[:-4]) & 0xFFFFFFFF)
    return bytes(b)


def refused(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None when it refused the bytes with a proper WireFormatError."""
    try:
        return fn(*args, **kwargs)
    except WireFormatError as e:
        if not isinstance(e.code, WireError) or e.code == WireError.OK:
            raise AssertionError(f"WireFormatError with code {e.code!r}") from e
        return None


def _variants(data: bytes) -> list[tuple[bytes, Verifier]]:
    out = [(data, v) for v in POLICIES]
    sealed = reseal(data)
    if sealed is not None:
        out.append((sealed, UNSIGNED))
    return out


def plan_target(data: bytes) -> None:
    for blob, verify in _variants(data):
        plan = refused(plan_from_bytes, blob, verify=verify)
        if plan is not None and verify is UNSIGNED:
            assert plan_to_bytes(plan) == blob, "plan: accepted blob does not round-trip"
            content_hash(blob)


def update_target(data: bytes) -> None:
    for blob, verify in _variants(data):
        u = refused(ModelUpdate.from_bytes, blob, verify=verify)
        if u is None:
            continue
        update_hash(blob)
        if verify is UNSIGNED:
            assert u.to_bytes(version=u.version) == blob, "model update: accepted blob does not round-trip"


def delta_target(data: bytes) -> None:
    for blob, verify in _variants(data):
        d = refused(delta_from_bytes, blob, verify=verify)
        if d is not None and verify is UNSIGNED:
            version = int.from_bytes(blob[4:6], "little")
            assert d.to_bytes(version=version) == blob, "delta: accepted blob does not round-trip"
    for version in (1, 2):  # the bare records section (GET_DELTA payload)
        refused(_records, data, version)


def _records(data: bytes, version: int) -> None:
    c = Cursor(memoryview(data), "records", base=0)
    read_records(c, version)
    c.end()


def frames_target(data: bytes) -> None:
    frame = refused(F.decode_frame, data)
    if frame is not None:
        assert F.decode_frame(F.encode_frame(frame)[:-1]) == frame, "frame: accepted frame does not round-trip"
        for direction in ("req", "resp", "err"):
            refused(F.unpack, direction, frame.code, frame.payload)
    for item in F.Deframer().feed(data + b"\0"):
        assert isinstance(item, (F.Frame, WireFormatError)), f"Deframer yielded {item!r}"


def envelope_target(data: bytes) -> None:
    for fmt in (PLAN, UPDATE, UPDATE_V1, DELTA, DELTA_V1):
        for blob, verify in _variants(data):
            body = refused(open_blob, fmt, blob, verify)
            if body is not None:
                c = Cursor(body, "fuzz")
                refused(c.string, 255, "s")
                refused(c.array, "<i2", c.remaining // 3, "a")
                refused(c.end)
                content_hash(blob)


def messages_target(data: bytes) -> None:
    """The JSON control-message parser (``device_agent.wire.messages.parse``): bytes from any MQTT client.

    Only :class:`MessageError` is a refusal; anything else escaping parse (e.g. RecursionError from json.loads
    on deeply nested arrays, ``b"[" * 995``) is a crash the fuzzer reports. Accepted messages round-trip."""
    try:
        msg = parse(data)
    except MessageError:
        return
    assert type(msg) in MESSAGES.values(), f"parse returned {type(msg).__name__}"
    again = msg.to_json()
    assert parse(again) == msg, "message: accepted message does not round-trip"
    for cls in MESSAGES.values():  # the typed entry point refuses other types with MessageError only
        try:
            parse(data, expect=cls)
        except MessageError:
            pass


TARGETS = {"plan": plan_target, "update": update_target, "delta": delta_target, "frames": frames_target,
           "envelope": envelope_target, "messages": messages_target}
