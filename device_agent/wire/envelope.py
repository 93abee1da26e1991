"""The envelope all TinyFleet blobs share: 16-byte header, body, optional signature, CRC32 (docs/formats.md).

``seal`` is the one writer and ``open_blob`` the one reader of the envelope; the format modules (plan, update,
delta) only write and read bodies. ``open_blob`` checks magic, version, length, CRC and the signature before
handing out a single body byte. It refuses to guess: a reader always gets an explicit :class:`Verifier`.
This module also holds the bounds-checked byte cursor and the padded writer the body codecs use.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import cast

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agent.wire.errors import WireError, WireFormatError

HEADER = struct.Struct("<4sHHIHH")  # magic, version, flags, total length, sig_alg, sig_len
HEADER_SIZE = HEADER.size  # 16
CRC_SIZE = 4
MAX_BLOB = 0x7FFFFFFF


class SigAlg(IntEnum):
    NONE = 0
    ED25519 = 1  # RFC 8032 Ed25519 over the signed bytes; 64-byte signature, 32-byte public key
    HMAC_SHA256 = 2  # HMAC-SHA256 with a per-device key; 32-byte tag


SIG_LEN = {SigAlg.NONE: 0, SigAlg.ED25519: 64, SigAlg.HMAC_SHA256: 32}


@dataclass(frozen=True)
class Signer:
    """Signs outgoing downlink blobs. Build with :meth:`ed25519` or :meth:`hmac_sha256`."""

    alg: SigAlg
    _key: object

    @classmethod
    def ed25519(cls, private_key: Ed25519PrivateKey) -> Signer:
        return cls(SigAlg.ED25519, private_key)

    @classmethod
    def hmac_sha256(cls, key: bytes) -> Signer:
        if len(key) < 16:
            raise ValueError(f"HMAC key must be at least 16 bytes, got {len(key)}")
        return cls(SigAlg.HMAC_SHA256, bytes(key))

    def sign(self, message: bytes) -> bytes:
        if self.alg == SigAlg.ED25519:
            return self._key.sign(message)  # type: ignore[attr-defined]
        return hmac.new(cast(bytes, self._key), message, hashlib.sha256).digest()


@dataclass(frozen=True)
class Verifier:
    """The reader's signature policy. Every downlink reader takes one explicitly.

    ``Verifier.ed25519(pub)`` / ``Verifier.hmac_sha256(key)``: only blobs signed with that key pass; unsigned
    blobs are refused (``UNSIGNED``). ``Verifier.unsigned()``: only unsigned blobs pass (tests, local files).
    ``Verifier.skip()``: any blob passes without checking (inspection tools only, never on a device).
    """

    mode: str
    _key: object = None

    @classmethod
    def ed25519(cls, public_key: Ed25519PublicKey) -> Verifier:
        return cls("ed25519", public_key)

    @classmethod
    def hmac_sha256(cls, key: bytes) -> Verifier:
        return cls("hmac", bytes(key))

    @classmethod
    def unsigned(cls) -> Verifier:
        return cls("unsigned")

    @classmethod
    def skip(cls) -> Verifier:
        return cls("skip")

    def check(self, alg: SigAlg, message: bytes, signature: bytes, what: str) -> None:
        if self.mode == "skip":
            return
        if self.mode == "unsigned":
            if alg != SigAlg.NONE:
                raise WireFormatError(WireError.SIG_ALG_MISMATCH,
                                      f"{what}: reader expects an unsigned blob, got one signed with {alg.name}; "
                                      "give the reader the signing key")
            return
        want = SigAlg.ED25519 if self.mode == "ed25519" else SigAlg.HMAC_SHA256
        if alg == SigAlg.NONE:
            raise WireFormatError(WireError.UNSIGNED,
                                  f"{what}: unsigned blob refused, the reader holds a {want.name} key; "
                                  "sign it with the fleet key")
        if alg != want:
            raise WireFormatError(WireError.SIG_ALG_MISMATCH,
                                  f"{what}: signed with {alg.name}, the reader holds a {want.name} key")
        if want == SigAlg.ED25519:
            try:
                self._key.verify(signature, message)  # type: ignore[attr-defined]
            except InvalidSignature:
                raise WireFormatError(WireError.BAD_SIGNATURE,
                                      f"{what}: Ed25519 signature does not verify; the blob was altered or "
                                      "signed with another key") from None
            return
        tag = hmac.new(cast(bytes, self._key), message, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, signature):
            raise WireFormatError(WireError.BAD_SIGNATURE,
                                  f"{what}: HMAC-SHA256 tag does not verify; altered, or another device key")


@dataclass(frozen=True)
class FormatId:
    """Which format a blob is: its magic, the one version this code speaks, what to do on a version mismatch."""

    name: str  # "plan", "model update", "delta"
    magic: bytes
    version: int
    remedy: str  # e.g. "recompile with `tinyfleet compile`"


def seal(fmt: FormatId, body: bytes, signer: Signer | None = None) -> bytes:
    """Header + body (+ signature) + CRC32: the only envelope writer."""
    alg = signer.alg if signer is not None else SigAlg.NONE
    sig_len = SIG_LEN[alg]
    total = HEADER_SIZE + len(body) + sig_len + CRC_SIZE
    if total > MAX_BLOB:
        raise ValueError(f"{fmt.name}: blob of {total} bytes exceeds the 2**31 - 1 limit")
    signed = HEADER.pack(fmt.magic, fmt.version, 0, total, alg, sig_len) + body
    sig = signer.sign(signed) if signer is not None else b""
    assert len(sig) == sig_len
    head = signed + sig
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)


def open_blob(fmt: FormatId, data: bytes | bytearray | memoryview, verify: Verifier) -> memoryview:
    """Check the envelope (magic, version, length, CRC, flags, signature) and return the body bytes.

    Nothing of the body is read before the signature passed (docs/formats.md, "Check order").
    """
    if not isinstance(verify, Verifier):
        raise TypeError(f"verify must be a Verifier, got {type(verify).__name__}")
    data = memoryview(bytes(data)) if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    n = len(data)
    what = fmt.name
    if n < 4:
        raise WireFormatError(WireError.TRUNCATED, f"{what}: {n} bytes, shorter than the 4-byte magic")
    if bytes(data[:4]) != fmt.magic:
        raise WireFormatError(WireError.BAD_MAGIC,
                              f"{what}: magic {fmt.magic!r} expected, got {bytes(data[:4])!r}: not a {what} blob")
    if n < HEADER_SIZE:
        raise WireFormatError(WireError.TRUNCATED, f"{what}: {n} bytes, shorter than the {HEADER_SIZE}-byte header")
    _, version, flags, total, alg, sig_len = HEADER.unpack_from(data, 0)
    if version != fmt.version:
        raise WireFormatError(WireError.UNSUPPORTED_VERSION,
                              f"{what} v{fmt.version} expected, got v{version}: {fmt.remedy}")
    if total < HEADER_SIZE + CRC_SIZE or total > MAX_BLOB:
        raise WireFormatError(WireError.BAD_LENGTH, f"{what}: header length {total} out of range")
    if n < total:
        raise WireFormatError(WireError.TRUNCATED, f"{what}: header says {total} bytes, got {n}: incomplete transfer")
    if n > total:
        raise WireFormatError(WireError.TRAILING_BYTES, f"{what}: header says {total} bytes, got {n}")
    if alg not in SIG_LEN:
        raise WireFormatError(WireError.BAD_ENUM, f"{what}: unknown signature algorithm {alg}")
    alg = SigAlg(alg)
    if sig_len != SIG_LEN[alg] or total < HEADER_SIZE + sig_len + CRC_SIZE:
        raise WireFormatError(WireError.BAD_LENGTH,
                              f"{what}: signature length {SIG_LEN[alg]} expected for {alg.name}, got {sig_len}")
    (crc,) = struct.unpack_from("<I", data, total - CRC_SIZE)
    got = zlib.crc32(data[: total - CRC_SIZE]) & 0xFFFFFFFF
    if crc != got:
        raise WireFormatError(WireError.CRC_MISMATCH,
                              f"{what}: CRC32 {crc:#010x} stored, {got:#010x} computed: corrupted, fetch it again")
    if flags != 0:
        raise WireFormatError(WireError.RESERVED_NONZERO, f"{what}: header flags must be 0, got {flags:#06x}")
    sig_start = total - CRC_SIZE - sig_len
    verify.check(alg, bytes(data[:sig_start]), bytes(data[sig_start: total - CRC_SIZE]), what)
    return data[HEADER_SIZE:sig_start]


def content_hash(data: bytes) -> bytes:
    """SHA-256 over ``magic ‖ version ‖ body``: the blob's identity, independent of signature and flags.

    The plan hash and the model version hash are this hash. Call it on a blob that passed ``open_blob``.
    """
    if len(data) < HEADER_SIZE + CRC_SIZE:
        raise WireFormatError(WireError.TRUNCATED, f"content_hash: {len(data)} bytes is not a blob")
    sig_len = struct.unpack_from("<H", data, 14)[0]
    end = len(data) - CRC_SIZE - sig_len
    h = hashlib.sha256()
    h.update(bytes(data[:6]))
    h.update(bytes(data[HEADER_SIZE:end]))
    return h.digest()


class Cursor:
    """Bounds-checked little-endian reader over a body; every overrun is ``TRUNCATED``, never an IndexError.

    ``base`` is the body's offset in the blob so error messages and absolute offsets match the spec.
    """

    def __init__(self, buf: memoryview, what: str, base: int = HEADER_SIZE):
        self.buf = buf
        self.pos = 0
        self.what = what
        self.base = base

    @property
    def abs_pos(self) -> int:
        return self.base + self.pos

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, field: str) -> None:
        if n < 0 or n > self.remaining:
            raise WireFormatError(WireError.TRUNCATED,
                                  f"{self.what}: {field} needs {n} bytes at offset {self.abs_pos}, "
                                  f"{self.remaining} left")

    def unpack(self, st: struct.Struct, field: str) -> tuple:
        self.need(st.size, field)
        out = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return out

    def u32(self, field: str) -> int:
        return self.unpack(_U32, field)[0]

    def i32(self, field: str) -> int:
        return self.unpack(_I32, field)[0]

    def raw(self, n: int, field: str) -> bytes:
        self.need(n, field)
        out = bytes(self.buf[self.pos: self.pos + n])
        self.pos += n
        return out

    def array(self, dtype: str, count: int, field: str) -> np.ndarray:
        """``count`` little-endian values of numpy ``dtype`` (e.g. "<i2"), copied; then zero padding to 4."""
        size = np.dtype(dtype).itemsize
        self.need(count * size, field)
        if count == 0:
            self.pad(field)
            return np.zeros(0, dtype=dtype)
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * size
        self.pad(field)
        return out

    def pad(self, field: str) -> None:
        n = -self.pos % 4
        if n:
            padding = self.raw(n, f"{field} padding")
            if any(padding):
                raise WireFormatError(WireError.RESERVED_NONZERO, f"{self.what}: {field} padding is not zero")

    def string(self, max_len: int, field: str) -> str:
        n = self.u32(f"{field} length")
        if n > max_len:
            raise WireFormatError(WireError.BAD_STRING, f"{self.what}: {field} of {n} bytes, at most {max_len}")
        raw = self.raw(n, field)
        self.pad(field)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WireFormatError(WireError.BAD_STRING, f"{self.what}: {field} is not valid UTF-8") from None

    def end(self) -> None:
        if self.remaining:
            raise WireFormatError(WireError.TRAILING_BYTES,
                                  f"{self.what}: {self.remaining} bytes after the last section")


_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")


class Builder:
    """The body writer: little-endian fields, arrays and strings zero-padded to 4 bytes."""

    def __init__(self, base: int = HEADER_SIZE):
        self.buf = bytearray()
        self.base = base

    @property
    def abs_pos(self) -> int:
        return self.base + len(self.buf)

    def pack(self, fmt: str, *values) -> None:
        self.buf += struct.pack("<" + fmt, *values)

    def array(self, values: np.ndarray, dtype: str) -> None:
        self.buf += np.ascontiguousarray(values, dtype=dtype).tobytes()
        self.pad()

    def pad(self) -> None:
        self.buf += b"\0" * (-len(self.buf) % 4)

    def string(self, s: str, max_len: int, field: str) -> None:
        raw = s.encode("utf-8")
        if len(raw) > max_len:
            raise ValueError(f"{field} {s!r}: {len(raw)} UTF-8 bytes, at most {max_len}")
        self.pack("I", len(raw))
        self.buf += raw
        self.pad()
