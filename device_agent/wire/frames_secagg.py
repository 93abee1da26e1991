"""UART frame payloads of the secagg command family (codes in ``frames.SECAGG_COMMANDS``; C twin:
firmware/src/proto/tf_proto_secagg.c). :mod:`device_agent.wire.frames` merges :data:`PAYLOADS` into its table.

One masked round on a board, in order: SEAL (the trained delta stays on the board), BEGIN (keys), ROSTER +
ROSTER_ADD (the members), SHARE_KEYS, GET_SHARE per other member, PUT_SHARE per received share, MASK (U2),
GET_MASKED (chunks), UNMASK (survivors, dropped), GET_REVEAL (chunks of shares); STATS (ticks per step) for
measurements. A refusal answers ERR_STATE (u32 reason), ERR_FORMAT (u16 reason, u16 0), ERR_NO_MEMORY (u32
capacity) or ERR_BAD_PAYLOAD (malformed); reasons: ``device_agent.board_secagg.REASONS``. It refuses nothing
itself: layouts only.
"""

from __future__ import annotations

import struct
from enum import IntEnum


class SecAggCommand(IntEnum):
    SEAL = 0x30  # copy the trained delta (new - base of the shared tensors) into the board's masked-round area
    BEGIN = 0x31  # round, weight, host entropy, session label, device id -> the round's two X25519 public keys
    ROSTER = 0x32  # group size, threshold, input length, bits, noise -> members the board can hold
    ROSTER_ADD = 0x33  # members (id_len u8 | id | c_pk | s_pk) appended in roster order
    SHARE_KEYS = 0x34  # check the roster, make the Shamir shares -> (n, own index)
    GET_SHARE = 0x35  # the encrypted share pair for one member (148 bytes)
    PUT_SHARE = 0x36  # another member's encrypted share pair for this board
    MASK = 0x37  # U2 (member indices) -> the masked input is ready
    GET_MASKED = 0x38  # chunk of the masked input (u32 little-endian words)
    UNMASK = 0x39  # survivors then dropped (member indices): one request per round
    GET_REVEAL = 0x3A  # chunk of revealed shares: survivors' self-mask shares, then dropped devices' key shares
    STATS = 0x3B  # core ticks spent in each step SEAL..GET_REVEAL since reset (u64 each)


_P = struct.Struct
C = SecAggCommand
# (direction, code) -> (fixed fields struct, field names, variable tail allowed), as frames.PAYLOADS
PAYLOADS: dict[tuple[str, int], tuple[struct.Struct, tuple[str, ...], bool]] = {
    ("req", C.SEAL): (_P("<"), (), False),
    ("resp", C.SEAL): (_P("<I"), ("length",), False),
    ("req", C.BEGIN): (_P("<II32sHH"), ("round_id", "weight", "entropy", "session_len", "id_len"), True),
    ("resp", C.BEGIN): (_P("<32s32s"), ("c_pk", "s_pk"), False),
    ("req", C.ROSTER): (_P("<HHIBB"), ("n", "threshold", "length", "bits", "noise"), False),
    ("resp", C.ROSTER): (_P("<I"), ("capacity",), False),
    ("req", C.ROSTER_ADD): (_P("<HH"), ("first", "count"), True),
    ("resp", C.ROSTER_ADD): (_P("<H"), ("loaded",), False),
    ("req", C.SHARE_KEYS): (_P("<"), (), False),
    ("resp", C.SHARE_KEYS): (_P("<HH"), ("n", "own"), False),
    ("req", C.GET_SHARE): (_P("<H"), ("index",), False),
    ("resp", C.GET_SHARE): (_P("<H"), ("index",), True),
    ("req", C.PUT_SHARE): (_P("<H"), ("sender",), True),
    ("resp", C.PUT_SHARE): (_P("<H"), ("held",), False),
    ("req", C.MASK): (_P("<H"), ("count",), True),
    ("resp", C.MASK): (_P("<I"), ("length",), False),
    ("req", C.GET_MASKED): (_P("<IH"), ("offset", "max_len"), False),
    ("resp", C.GET_MASKED): (_P("<I"), ("total",), True),
    ("req", C.UNMASK): (_P("<HH"), ("survivors", "dropped"), True),
    ("resp", C.UNMASK): (_P("<H"), ("reveals",), False),
    ("req", C.GET_REVEAL): (_P("<HH"), ("first", "count"), False),
    ("resp", C.GET_REVEAL): (_P("<H"), ("count",), True),
    ("req", C.STATS): (_P("<"), (), False),
    ("resp", C.STATS): (_P("<11Q"), tuple(f"{c.name.lower()}_ticks" for c in C if c <= C.GET_REVEAL), False),
}
