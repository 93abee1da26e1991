"""Secure-aggregation messages on the wire (``TFSA`` v1): one writer and one reader for every stage's message.

Layout (little-endian; docs/security.md "Wire format")::

    head  magic "TFSA" | version u8 | kind u8 | reserved u16 = 0 | round_id u32 | body_len u32
    body  (per kind, below)
    crc   CRC32 of head + body, u32

Strings (device ids) are ``u8 len + UTF-8`` matching ``[A-Za-z0-9_.-]{1,64}``; lists are ``u16 count + items``
with at most ``MAX_GROUP`` items; keys are raw 32 bytes; a Shamir share is 66 bytes big-endian, below 2^521 - 1;
an encrypted share pair is 148 bytes (2 x 66 + 16-byte tag). Kinds and bodies:

    1 ADVERTISE      id | c_pk | s_pk                                           device -> coordinator
    2 ROSTER         session (u16 len + bytes, <= 256) | threshold u16 | length u32 | bits u8 | list(id | c_pk | s_pk)
                     | noise u8 (0: none; 1: then clip f64 | resolution u32 | mu f64 | real_units u8)
    3 SHARE_KEYS     id | list(receiver id | ciphertext)                         device -> coordinator
    4 SHARES_FOR     receiver id | list(id) shared | list(sender id | ciphertext)
    5 MASKED_INPUT   id | bits u8 | length u32 | length x (bits / 8) bytes        device -> coordinator
    6 UNMASK_REQUEST list(id) survivors | list(id) dropped
    7 UNMASK         id | list(id | share) self-mask shares | list(id | share) key shares   device -> coordinator
    8 OPEN           task JSON (u32 len + bytes): the round's task, and the word that this round is masked

The reader refuses, with a specific :class:`WireFormatError` code, a bad magic, version, kind, reserved field,
CRC, length, count above its bound, out-of-range share or bits, bad id, and trailing bytes. It does not judge
the protocol (who may send what when): ``device_agent/secagg.py`` and ``fleet/security/secagg.py`` do.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from device_agent.wire.errors import WireError, WireFormatError
from device_agent.wire.secagg import (
    BITS,
    MAX_GROUP,
    PRIME,
    SHARE_BYTES,
    AdvertiseKeys,
    EncryptedShare,
    MaskedInput,
    Noise,
    Roster,
    ShareKeys,
    SharesFor,
    UnmaskRequest,
    UnmaskResponse,
)

MAGIC = b"TFSA"
VERSION = 1
HEAD = struct.Struct("<4sBBHII")  # magic, version, kind, reserved, round_id, body_len
CIPHERTEXT_BYTES = 2 * SHARE_BYTES + 16
MAX_LENGTH = 1 << 26  # integers per masked input (the plan's support x 2), at most
MAX_SESSION = 256
MAX_TASK = 4096
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Open:
    """Coordinator -> one device: the round's task (JSON bytes of ``messages.Task``) for a masked round."""

    task: bytes


Message = Open | AdvertiseKeys | Roster | ShareKeys | SharesFor | MaskedInput | UnmaskRequest | UnmaskResponse
KINDS: dict[type, int] = {AdvertiseKeys: 1, Roster: 2, ShareKeys: 3, SharesFor: 4, MaskedInput: 5,
                          UnmaskRequest: 6, UnmaskResponse: 7, Open: 8}


def _fail(code: WireError, msg: str) -> WireFormatError:
    return WireFormatError(code, f"secagg message: {msg}")


# --- writer -------------------------------------------------------------------------------------------------


def _id(s: str) -> bytes:
    b = s.encode()
    if not _ID.fullmatch(s):
        raise ValueError(f"device id {s!r}: expected [A-Za-z0-9_.-]{{1,64}}")
    return bytes([len(b)]) + b


def _count(n: int) -> bytes:
    if n > MAX_GROUP:
        raise ValueError(f"{n} items, at most {MAX_GROUP} per secure-aggregation group")
    return struct.pack("<H", n)


def _ids(ids) -> bytes:
    ids = list(ids)
    return _count(len(ids)) + b"".join(_id(i) for i in ids)


def _share(v: int) -> bytes:
    if not 0 <= v < PRIME:
        raise ValueError("a Shamir share must be in [0, 2^521 - 1)")
    return v.to_bytes(SHARE_BYTES, "big")


def _keys(k: AdvertiseKeys) -> bytes:
    if len(k.c_pk) != 32 or len(k.s_pk) != 32:
        raise ValueError(f"{k.device_id}: public keys are 32 bytes")
    return _id(k.device_id) + k.c_pk + k.s_pk


def _ct(c: bytes) -> bytes:
    if len(c) != CIPHERTEXT_BYTES:
        raise ValueError(f"an encrypted share pair is {CIPHERTEXT_BYTES} bytes, got {len(c)}")
    return c


def _body(msg: Message) -> bytes:
    if isinstance(msg, AdvertiseKeys):
        return _keys(msg)
    if isinstance(msg, Roster):
        if len(msg.session) > MAX_SESSION or msg.bits not in BITS or not 1 <= msg.length <= MAX_LENGTH:
            raise ValueError("roster: session <= 256 bytes, bits in (32, 64), 1 <= length <= 2^26 expected")
        z = msg.noise
        noise = b"\0" if z is None else struct.pack("<BdIdB", 1, z.clip, z.resolution, z.mu, int(z.real_units))
        return (struct.pack("<H", len(msg.session)) + msg.session
                + struct.pack("<HIB", msg.threshold, msg.length, msg.bits)
                + _count(len(msg.keys)) + b"".join(_keys(k) for k in msg.keys) + noise)
    if isinstance(msg, ShareKeys):
        if any(s.sender != msg.device_id for s in msg.shares):
            raise ValueError(f"{msg.device_id}: every share must be sent by the device itself")
        return _id(msg.device_id) + _count(len(msg.shares)) + b"".join(_id(s.receiver) + _ct(s.ciphertext)
                                                                        for s in msg.shares)
    if isinstance(msg, SharesFor):
        if any(s.receiver != msg.receiver for s in msg.shares):
            raise ValueError(f"shares for {msg.receiver} must all be addressed to it")
        return (_id(msg.receiver) + _ids(msg.shared) + _count(len(msg.shares))
                + b"".join(_id(s.sender) + _ct(s.ciphertext) for s in msg.shares))
    if isinstance(msg, MaskedInput):
        y = np.asarray(msg.y)
        if y.ndim != 1 or y.dtype.kind != "u" or 8 * y.dtype.itemsize not in BITS or not 1 <= y.size <= MAX_LENGTH:
            raise ValueError(f"masked input must be (length,) uint32 or uint64, got {y.shape} {y.dtype}")
        return (_id(msg.device_id) + struct.pack("<BI", 8 * y.dtype.itemsize, y.size)
                + y.astype(y.dtype.newbyteorder("<")).tobytes())
    if isinstance(msg, UnmaskRequest):
        return _ids(msg.survivors) + _ids(msg.dropped)
    if isinstance(msg, UnmaskResponse):
        return (_id(msg.device_id)
                + _count(len(msg.self_mask_shares)) + b"".join(_id(k) + _share(v) for k, v in msg.self_mask_shares.items())
                + _count(len(msg.key_shares)) + b"".join(_id(k) + _share(v) for k, v in msg.key_shares.items()))
    if isinstance(msg, Open):
        if len(msg.task) > MAX_TASK:
            raise ValueError(f"task of {len(msg.task)} bytes, at most {MAX_TASK}")
        return struct.pack("<I", len(msg.task)) + msg.task
    raise TypeError(f"not a secure-aggregation message: {type(msg).__name__}")


def secagg_to_bytes(round_id: int, msg: Message) -> bytes:
    """The ``TFSA`` v1 bytes of ``msg`` for round ``round_id`` (raises ValueError for values the format cannot carry)."""
    if not 0 <= round_id < 1 << 32:
        raise ValueError(f"round id must fit u32, got {round_id}")
    body = _body(msg)
    head = HEAD.pack(MAGIC, VERSION, KINDS[type(msg)], 0, round_id, len(body)) + body
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)


# --- reader -------------------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes, pos: int, end: int):
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise _fail(WireError.TRUNCATED, f"body ends inside {what}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def f64(self, what: str) -> float:
        return struct.unpack("<d", self.take(8, what))[0]

    def id(self, what: str = "a device id") -> str:
        n = self.u("<B", what)
        raw = self.take(n, what)
        try:
            s = raw.decode()
        except UnicodeDecodeError:
            raise _fail(WireError.BAD_STRING, f"{what} is not UTF-8") from None
        if not _ID.fullmatch(s):
            raise _fail(WireError.BAD_STRING, f"{what} {s!r} does not match [A-Za-z0-9_.-]{{1,64}}")
        return s

    def count(self, what: str) -> int:
        n = self.u("<H", what)
        if n > MAX_GROUP:
            raise _fail(WireError.SIZE_OVERFLOW, f"{what}: {n} items, at most {MAX_GROUP}")
        return n

    def ids(self, what: str) -> tuple[str, ...]:
        return tuple(self.id(what) for _ in range(self.count(what)))

    def keys(self) -> AdvertiseKeys:
        return AdvertiseKeys(self.id(), self.take(32, "c_pk"), self.take(32, "s_pk"))

    def share(self) -> int:
        v = int.from_bytes(self.take(SHARE_BYTES, "a share"), "big")
        if v >= PRIME:
            raise _fail(WireError.BAD_VALUE, "a Shamir share is not below 2^521 - 1")
        return v

    def shares(self, what: str) -> dict[str, int]:
        out = {}
        for _ in range(self.count(what)):
            k = self.id(what)
            if k in out:
                raise _fail(WireError.ID_ORDER, f"{what}: {k} twice")
            out[k] = self.share()
        return out


def _read_body(kind: int, round_id: int, r: _Reader) -> Message:
    if kind == 1:
        return r.keys()
    if kind == 2:
        session = r.take(r.u("<H", "session length"), "session")
        if len(session) > MAX_SESSION:
            raise _fail(WireError.SIZE_OVERFLOW, f"session of {len(session)} bytes, at most {MAX_SESSION}")
        threshold, length, bits = r.u("<H", "threshold"), r.u("<I", "length"), r.u("<B", "bits")
        if bits not in BITS or not 1 <= length <= MAX_LENGTH:
            raise _fail(WireError.BAD_VALUE, f"roster: bits {bits} (32 or 64), length {length} (1..2^26)")
        keys = tuple(r.keys() for _ in range(r.count("roster")))
        flag = r.u("<B", "noise flag")
        if flag > 1:
            raise _fail(WireError.BAD_ENUM, f"roster: noise flag {flag}, expected 0 or 1")
        noise = None
        if flag:
            clip, res, mu, real = r.f64("clip"), r.u("<I", "resolution"), r.f64("mu"), r.u("<B", "real_units")
            if not (math.isfinite(clip) and clip > 0 and math.isfinite(mu) and mu > 0 and 1 <= res <= 1 << 24
                    and real <= 1):
                raise _fail(WireError.BAD_VALUE, f"roster noise: clip {clip}, resolution {res}, mu {mu}, "
                                                 f"real_units {real}")
            noise = Noise(clip, res, mu, bool(real))
        return Roster(round_id, session, threshold, length, bits, keys, noise)
    if kind == 3:
        sender = r.id()
        return ShareKeys(sender, tuple(EncryptedShare(sender, r.id("receiver"), r.take(CIPHERTEXT_BYTES, "ciphertext"))
                                       for _ in range(r.count("shares"))))
    if kind == 4:
        receiver, shared = r.id(), r.ids("shared")
        return SharesFor(receiver, shared, tuple(EncryptedShare(r.id("sender"), receiver,
                                                                r.take(CIPHERTEXT_BYTES, "ciphertext"))
                                                 for _ in range(r.count("shares"))))
    if kind == 5:
        dev, bits, length = r.id(), r.u("<B", "bits"), r.u("<I", "length")
        if bits not in BITS or not 1 <= length <= MAX_LENGTH:
            raise _fail(WireError.BAD_VALUE, f"masked input: bits {bits} (32 or 64), length {length} (1..2^26)")
        dt = np.dtype(f"<u{bits // 8}")
        return MaskedInput(dev, np.frombuffer(r.take(length * dt.itemsize, "values"), dt).astype(f"u{bits // 8}"))
    if kind == 6:
        return UnmaskRequest(r.ids("survivors"), r.ids("dropped"))
    if kind == 7:
        dev = r.id()
        return UnmaskResponse(dev, r.shares("self-mask shares"), r.shares("key shares"))
    n = r.u("<I", "task length")
    if n > MAX_TASK:
        raise _fail(WireError.SIZE_OVERFLOW, f"task of {n} bytes, at most {MAX_TASK}")
    return Open(r.take(n, "task"))


def secagg_from_bytes(data: bytes) -> tuple[int, Message]:
    """``(round_id, message)`` from ``TFSA`` bytes; raises :class:`WireFormatError` with the reason's code."""
    data = bytes(data)
    if len(data) < 4:
        raise _fail(WireError.TRUNCATED, f"{len(data)} bytes, the magic alone is 4")
    if data[:4] != MAGIC:
        raise _fail(WireError.BAD_MAGIC, f"magic {data[:4]!r}, expected {MAGIC!r}")
    if len(data) < HEAD.size + 4:
        raise _fail(WireError.TRUNCATED, f"{len(data)} bytes, header + CRC are {HEAD.size + 4}")
    _, version, kind, reserved, round_id, body_len = HEAD.unpack_from(data)
    if version != VERSION:
        raise _fail(WireError.UNSUPPORTED_VERSION, f"TFSA v{VERSION} expected, got v{version}: update the device agent")
    total = HEAD.size + body_len + 4
    if len(data) < total:
        raise _fail(WireError.TRUNCATED, f"{len(data)} bytes, the header says {total}")
    if len(data) > total:
        raise _fail(WireError.TRAILING_BYTES, f"{len(data) - total} bytes after the CRC")
    if struct.unpack_from("<I", data, total - 4)[0] != zlib.crc32(data[:total - 4]) & 0xFFFFFFFF:
        raise _fail(WireError.CRC_MISMATCH, "CRC32 does not match: corrupted in transit")
    if reserved:
        raise _fail(WireError.RESERVED_NONZERO, f"reserved field is {reserved}, expected 0")
    if kind not in KINDS.values():
        raise _fail(WireError.BAD_ENUM, f"kind {kind}, expected 1..{len(KINDS)}")
    r = _Reader(data, HEAD.size, total - 4)
    msg = _read_body(kind, round_id, r)
    if r.pos != r.end:
        raise _fail(WireError.TRAILING_BYTES, f"{r.end - r.pos} bytes after the last field of kind {kind}")
    return round_id, msg
