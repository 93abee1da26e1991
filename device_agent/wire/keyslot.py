"""The key slot: a board's signature policy, provisioned with its firmware image (docs/formats.md "Key slot").

``key_slot_to_bytes`` is the one writer and ``key_slot_from_bytes`` the one reader (the firmware's twin is
``tf_key_slot_read``). The record says which key the board verifies downlink blobs with: the fleet's Ed25519
public key (32 bytes) or a per-device HMAC-SHA256 key (16-64 bytes). An erased slot (first word all 0 or all 1
bits) means "unsigned only"; a damaged record makes the board refuse every blob, never fall back to unsigned.
The slot holds public or device-local material only: it refuses to carry an Ed25519 private key.
"""

from __future__ import annotations

import struct
import zlib

from device_agent.wire.envelope import SigAlg
from device_agent.wire.errors import WireError, WireFormatError

MAGIC = b"TFKY"
VERSION = 1
SLOT_BYTES = 256  # TF_KEY_SLOT_BYTES: the last 256 bytes of the board's flash budget (ELF symbol __key_slot)
HEAD = struct.Struct("<4sHHI")  # magic, version, sig_alg, key_len


def key_slot_to_bytes(alg: SigAlg, key: bytes) -> bytes:
    """The record for ``alg`` (ED25519: the raw 32-byte public key; HMAC_SHA256: the device key)."""
    alg = SigAlg(alg)
    if alg == SigAlg.ED25519 and len(key) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(key)}")
    if alg == SigAlg.HMAC_SHA256 and not 16 <= len(key) <= 64:
        raise ValueError(f"an HMAC-SHA256 device key is 16 to 64 bytes, got {len(key)}")
    if alg == SigAlg.NONE:
        raise ValueError("an unsigned-only board has an erased key slot: write no record")
    head = HEAD.pack(MAGIC, VERSION, alg, len(key)) + bytes(key)
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)


def key_slot_from_bytes(data: bytes) -> tuple[SigAlg, bytes]:
    """``(alg, key)`` of a slot; ``(SigAlg.NONE, b"")`` when erased. Raises :class:`WireFormatError` (the code
    ``tf_key_slot_read`` returns) for a damaged record. Bytes after the record (the rest of the slot) are ignored."""
    data = bytes(data)
    if len(data) < 4:
        raise WireFormatError(WireError.TRUNCATED, f"key slot: {len(data)} bytes, the magic alone is 4")
    if data[:4] in (b"\0" * 4, b"\xff" * 4):
        return SigAlg.NONE, b""
    if data[:4] != MAGIC:
        raise WireFormatError(WireError.BAD_MAGIC, f"key slot: magic {data[:4]!r}, expected {MAGIC!r}")
    if len(data) < HEAD.size:
        raise WireFormatError(WireError.TRUNCATED, f"key slot: {len(data)} bytes, the header is {HEAD.size}")
    _, version, alg, key_len = HEAD.unpack_from(data)
    if version != VERSION:
        raise WireFormatError(WireError.UNSUPPORTED_VERSION,
                              f"key slot v{VERSION} expected, got v{version}: provision the board again")
    if alg not in (SigAlg.ED25519, SigAlg.HMAC_SHA256):
        raise WireFormatError(WireError.BAD_ENUM, f"key slot: sig_alg {alg}, expected 1 (Ed25519) or 2 (HMAC)")
    if (key_len != 32) if alg == SigAlg.ED25519 else not 16 <= key_len <= 64:
        raise WireFormatError(WireError.BAD_LENGTH, f"key slot: {SigAlg(alg).name} key of {key_len} bytes")
    end = HEAD.size + key_len
    if len(data) < end + 4:
        raise WireFormatError(WireError.TRUNCATED, f"key slot: {len(data)} bytes, the record is {end + 4}")
    crc, = struct.unpack_from("<I", data, end)
    if zlib.crc32(data[:end]) & 0xFFFFFFFF != crc:
        raise WireFormatError(WireError.CRC_MISMATCH, "key slot: CRC32 differs (damaged flash: provision again)")
    return SigAlg(alg), data[HEAD.size:end]
