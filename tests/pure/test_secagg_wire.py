"""``TFSA`` v1: every secure-aggregation message round-trips, and bad bytes are refused with their specific code."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from device_agent.wire.errors import WireError, WireFormatError
from device_agent.wire.secagg import (
    PRIME,
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
from device_agent.wire.secagg_frames import CIPHERTEXT_BYTES, HEAD, Open, secagg_from_bytes, secagg_to_bytes

K = [AdvertiseKeys(f"d{i}", bytes([i]) * 32, bytes([100 + i]) * 32) for i in range(3)]
CT = bytes(range(CIPHERTEXT_BYTES))
MESSAGES = [
    K[0],
    Roster(7, b"tinyfleet-secagg plan=" + bytes(32), 2, 1400, 32, tuple(K)),
    Roster(7, b"s", 2, 701, 64, tuple(K), Noise(0.5, 4096, 8.4e6, True)),
    ShareKeys("d0", (EncryptedShare("d0", "d1", CT), EncryptedShare("d0", "d2", CT[::-1]))),
    SharesFor("d1", ("d0", "d1", "d2"), (EncryptedShare("d0", "d1", CT), EncryptedShare("d2", "d1", CT))),
    MaskedInput("d2", np.array([0, 1, 2**32 - 1, 12345], np.uint32)),
    MaskedInput("d2", np.array([2**64 - 1, 5], np.uint64)),
    UnmaskRequest(("d0", "d2"), ("d1",)),
    UnmaskResponse("d0", {"d0": 1, "d2": PRIME - 1}, {"d1": 2**300}),
    UnmaskRequest((), ()),
    Open(b'{"type": "task", "round_id": 7}'),
]


def _eq(a, b) -> bool:
    if isinstance(a, MaskedInput):
        return a.device_id == b.device_id and a.y.dtype == b.y.dtype and np.array_equal(a.y, b.y)
    return a == b


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = secagg_to_bytes(7, msg)
    round_id, back = secagg_from_bytes(data)
    assert round_id == 7 and _eq(back, msg)
    assert secagg_to_bytes(7, back) == data  # one canonical encoding


def _recrc(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]) & 0xFFFFFFFF)


def _patch(data: bytes, pos: int, new: bytes) -> bytes:
    return _recrc(data[:pos] + new + data[pos + len(new):])


GOOD = secagg_to_bytes(3, MESSAGES[1])


@pytest.mark.parametrize("bad, code", [
    (b"TF", WireError.TRUNCATED),
    (b"XXXX" + GOOD[4:], WireError.BAD_MAGIC),
    (_patch(GOOD, 4, b"\x02"), WireError.UNSUPPORTED_VERSION),
    (_patch(GOOD, 5, b"\x09"), WireError.BAD_ENUM),
    (_patch(GOOD, 6, b"\x01"), WireError.RESERVED_NONZERO),
    (GOOD[:-1], WireError.TRUNCATED),
    (GOOD + b"\0", WireError.TRAILING_BYTES),
    (GOOD[:-4] + bytes(4), WireError.CRC_MISMATCH),
    (_patch(GOOD, HEAD.size + 2 + 54 + 6, b"\x10"), WireError.BAD_VALUE),  # bits 16
    (_patch(GOOD, HEAD.size + 2 + 54 + 7, b"\xff\xff"), WireError.SIZE_OVERFLOW),  # 65535 roster members
    (_patch(GOOD, HEAD.size + 2 + 54 + 10, b"/"), WireError.BAD_STRING),  # device id "/0"
    (_patch(secagg_to_bytes(1, MESSAGES[8]), HEAD.size + 3 + 2 + 3, b"\xff" * 2),
     WireError.BAD_VALUE),  # a share above 2^521 - 1
])
def test_refuses_bad_bytes_with_a_specific_code(bad, code):
    with pytest.raises(WireFormatError) as e:
        secagg_from_bytes(bad)
    assert e.value.code == code, e.value


def test_inner_length_mismatch_is_refused():
    data = secagg_to_bytes(1, MESSAGES[0])
    body_len = HEAD.unpack_from(data)[5]
    grown = data[:HEAD.size - 4] + struct.pack("<I", body_len + 1) + data[HEAD.size:-4] + b"\0"
    with pytest.raises(WireFormatError) as e:
        secagg_from_bytes(_recrc(grown + bytes(4)))
    assert e.value.code == WireError.TRAILING_BYTES


def test_writer_refuses_what_the_format_cannot_carry():
    with pytest.raises(ValueError, match="device id"):
        secagg_to_bytes(1, AdvertiseKeys("a/b", bytes(32), bytes(32)))
    with pytest.raises(ValueError, match="148"):
        secagg_to_bytes(1, ShareKeys("d0", (EncryptedShare("d0", "d1", b"short"),)))
    with pytest.raises(ValueError, match="uint32 or uint64"):
        secagg_to_bytes(1, MaskedInput("d0", np.zeros(3, np.int32)))
    with pytest.raises(ValueError, match="u32"):
        secagg_to_bytes(2**32, UnmaskRequest((), ()))


def test_roster_noise_fields_are_checked():
    data = secagg_to_bytes(1, MESSAGES[2])
    end = len(data) - 4 - 22  # the noise block: flag u8, clip f64, resolution u32, mu f64, real_units u8
    with pytest.raises(WireFormatError) as e:
        secagg_from_bytes(_recrc(data[:end] + b"\x02" + data[end + 1:]))
    assert e.value.code == WireError.BAD_ENUM
    with pytest.raises(WireFormatError) as e:
        secagg_from_bytes(_recrc(data[:end + 1] + struct.pack("<d", -1.0) + data[end + 9:]))
    assert e.value.code == WireError.BAD_VALUE
