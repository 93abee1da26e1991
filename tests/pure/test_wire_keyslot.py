"""The key slot record (device_agent/wire/keyslot.py): round trip, erased slots, every refusal with its code."""

from __future__ import annotations

import pytest

from device_agent.wire.envelope import SigAlg
from device_agent.wire.errors import WireError, WireFormatError
from device_agent.wire.keyslot import SLOT_BYTES, key_slot_from_bytes, key_slot_to_bytes

PUB = bytes(range(32))


@pytest.mark.parametrize("alg,key", [(SigAlg.ED25519, PUB), (SigAlg.HMAC_SHA256, b"k" * 16),
                                     (SigAlg.HMAC_SHA256, b"k" * 64)])
def test_round_trip_in_a_padded_slot(alg: SigAlg, key: bytes) -> None:
    rec = key_slot_to_bytes(alg, key)
    assert len(rec) == 16 + len(key) and rec[:4] == b"TFKY"
    assert key_slot_from_bytes(rec + b"\xff" * (SLOT_BYTES - len(rec))) == (alg, key)


@pytest.mark.parametrize("fill", [b"\0", b"\xff"])
def test_erased_slot_is_unsigned_only(fill: bytes) -> None:
    assert key_slot_from_bytes(fill * SLOT_BYTES) == (SigAlg.NONE, b"")


def _code(data: bytes) -> WireError:
    with pytest.raises(WireFormatError) as e:
        key_slot_from_bytes(data)
    return e.value.code


def test_refusals() -> None:
    rec = bytearray(key_slot_to_bytes(SigAlg.ED25519, PUB))
    assert _code(b"TF") == WireError.TRUNCATED
    assert _code(b"XFKY" + bytes(rec[4:])) == WireError.BAD_MAGIC
    assert _code(bytes(rec[:10])) == WireError.TRUNCATED
    assert _code(bytes(rec[:4]) + b"\x02\x00" + bytes(rec[6:])) == WireError.UNSUPPORTED_VERSION
    assert _code(bytes(rec[:6]) + b"\x03\x00" + bytes(rec[8:])) == WireError.BAD_ENUM
    assert _code(bytes(rec[:8]) + b"\x1f\x00\x00\x00" + bytes(rec[12:])) == WireError.BAD_LENGTH
    assert _code(bytes(rec[:-1])) == WireError.TRUNCATED
    rec[20] ^= 1
    assert _code(bytes(rec)) == WireError.CRC_MISMATCH


def test_writer_refuses_wrong_keys() -> None:
    with pytest.raises(ValueError):
        key_slot_to_bytes(SigAlg.ED25519, PUB + b"x")  # e.g. a private key + public key blob
    with pytest.raises(ValueError):
        key_slot_to_bytes(SigAlg.HMAC_SHA256, b"short")
    with pytest.raises(ValueError):
        key_slot_to_bytes(SigAlg.NONE, b"")
