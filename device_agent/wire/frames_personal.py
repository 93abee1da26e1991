"""UART frame payloads of the personal command family (codes in ``frames.PERSONAL_COMMANDS``; C twin:
firmware/src/proto/tf_proto_personal.c). :mod:`device_agent.wire.frames` merges :data:`PAYLOADS` into its table.

- ``PERSONAL_SETUP`` (0x20): method (:data:`METHOD_CODES`), Ditto's pull ``lam_q15`` and the ids of the tensors the
  personal copy holds (``count`` x u16, ascending); the answer says what the copy costs the board (SRAM bytes; flash
  0: the copy lives in SRAM) and the pool bytes left. Method 0 with no ids drops the copy.
- ``PERSONALIZE`` (0x21): one personal step per listed stored slot (``count`` x u16) at ``lr_m * 2^lr_e``;
  ``flags`` bit 0 "restart" (the first frame of a finetune update starts from the global model).
- ``PERSONAL_HASH`` (0x22): sha256 of the personal model (== Trainer.state_hash of Personalizer.model) and counters.

It refuses nothing itself: lengths are checked by ``frames.unpack`` and :func:`list_payload`.
"""

from __future__ import annotations

import struct

SETUP, PERSONALIZE, HASH = 0x20, 0x21, 0x22
METHOD_CODES = {"none": 0, "ditto": 1, "finetune": 2, "head": 3, "bias": 4}
SETUP_MAX_IDS = 64  # TF_MAX_PERSONAL_TENSORS (tf_device.h)

_P = struct.Struct
# (direction, code) -> (fixed fields struct, field names, variable tail allowed), as frames.PAYLOADS
PAYLOADS: dict[tuple[str, int], tuple[struct.Struct, tuple[str, ...], bool]] = {
    ("req", SETUP): (_P("<BBHi"), ("method", "reserved", "count", "lam_q15"), True),
    ("resp", SETUP): (_P("<III"), ("sram_bytes", "flash_bytes", "pool_free"), False),
    ("req", PERSONALIZE): (_P("<iiBBH"), ("lr_m", "lr_e", "flags", "reserved", "count"), True),
    ("resp", PERSONALIZE): (_P("<III"), ("steps_done", "correct", "personal_steps"), False),
    ("req", HASH): (_P("<"), (), False),
    ("resp", HASH): (_P("<32sBBHII"), ("personal_hash", "method", "has_copy", "reserved", "sram_bytes",
                                       "personal_steps"), False),
}


def list_max(code: int, max_payload: int) -> int:
    """u16 entries that fit one request of ``code`` (SETUP: also the board's tensor limit)."""
    n = (max_payload - PAYLOADS[("req", code)][0].size) // 2
    return min(n, SETUP_MAX_IDS) if code == SETUP else n


def list_payload(values: list[int], limit: int) -> bytes:
    """``count`` x u16 little-endian; ValueError past ``limit`` entries or outside 0..65535."""
    if len(values) > limit or any(not 0 <= v <= 0xFFFF for v in values):
        raise ValueError(f"personal frame: at most {limit} entries in [0, 65535], got {len(values)}")
    return struct.pack(f"<{len(values)}H", *values)
