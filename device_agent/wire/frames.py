"""UART frames between the bridge and an MCU: COBS-framed request/response with sequence numbers and CRC16.

A frame is ``seq u16 | code u8 | payload | crc16 u16`` (little-endian), COBS-encoded and terminated by one 0x00
(docs/formats.md, "UART frames"). The bridge sends commands, the MCU answers each with a status and the same
``seq``. Payload layouts live in one table, :data:`PAYLOADS`, used by both :func:`pack` and :func:`unpack`.
This module does no I/O: :class:`Deframer` turns a byte stream into frames, the serial/TCP adapter moves bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import IntEnum

from device_agent.wire.errors import WireError, WireFormatError

PROTOCOL_VERSION = 2  # 2: STORE_SAMPLES + TRAIN_LIST (samples kept on the board, trained by slot)
MAX_PAYLOAD = 512
FRAME_OVERHEAD = 5  # seq u16 + code u8 + crc16 u16
MAX_RAW = MAX_PAYLOAD + FRAME_OVERHEAD
MAX_ENCODED = MAX_RAW + math.ceil(MAX_RAW / 254) + 1  # COBS worst case + the 0x00 delimiter
SEQ_UNKNOWN = 0xFFFF  # the seq of an ERR_CRC response: the request's own seq could not be trusted


class Command(IntEnum):
    PING = 0x01
    LOAD_PLAN = 0x02  # chunked plan blob; the reader runs when the last chunk arrives
    LOAD_UPDATE = 0x03  # chunked model update blob, applied when complete
    PUSH_SAMPLE = 0x04  # chunked private sample (input tensor bytes) + label
    TRAIN = 0x05
    GET_DELTA = 0x06  # chunk of the delta records section (docs/formats.md, "Delta")
    GET_STATS = 0x07
    SELFTEST = 0x08  # the firmware's kernel self-test over its golden vectors (no plan loaded: it uses the arena)
    BOARD_INFO = 0x09  # CPU id, clock, ticks, stack, arena, statics, flash, frame counters
    STATE_HASH = 0x0A  # sha256 of the trainable tensors (Trainer.state_hash), counters, ticks of the last TRAIN
    STORE_SAMPLES = 0x0B  # v2: chunked batch of samples into addressed slots of the board's sample store
    TRAIN_LIST = 0x0C  # v2: one N = 1 step per listed stored slot, in order


# Codes a test build of the firmware may answer (kernel micro-benchmark, stack-overflow fault); never in the
# protocol proper.
TEST_COMMANDS = frozenset({0x7E, 0x7F})


# Command families defined in their own modules (frames_personal, frames_secagg), merged into PAYLOADS below.
PERSONAL_COMMANDS = range(0x20, 0x30)
SECAGG_COMMANDS = range(0x30, 0x40)


class Status(IntEnum):
    OK = 0x00
    ERR_CRC = 0x01  # request failed COBS/CRC: resend it (seq is SEQ_UNKNOWN)
    ERR_UNKNOWN_COMMAND = 0x02
    ERR_BAD_PAYLOAD = 0x03  # payload length or field out of range for the command
    ERR_STATE = 0x04  # not now: TRAIN without a plan, chunk offset not the expected one (payload: expected u32)
    ERR_NO_MEMORY = 0x05  # blob or sample larger than the device's buffer (payload: capacity u32)
    ERR_FORMAT = 0x06  # the format reader refused the blob (payload: WireError u16, reserved u16)
    ERR_BUSY = 0x07
    ERR_INTERNAL = 0x08


# (direction, code) -> (fixed fields struct, field names, variable tail allowed). "req" codes are Commands,
# "resp" codes are Commands for an OK answer; error statuses have their own entries under ("err", Status).
_P = struct.Struct
PAYLOADS: dict[tuple[str, int], tuple[struct.Struct, tuple[str, ...], bool]] = {
    ("req", Command.PING): (_P("<"), (), False),
    ("resp", Command.PING): (_P("<HHII"), ("protocol_version", "max_payload", "blob_capacity", "sram_bytes"), False),
    ("req", Command.LOAD_PLAN): (_P("<II"), ("offset", "total"), True),
    ("resp", Command.LOAD_PLAN): (_P("<I"), ("received",), False),
    ("req", Command.LOAD_UPDATE): (_P("<II"), ("offset", "total"), True),
    ("resp", Command.LOAD_UPDATE): (_P("<I"), ("received",), False),
    ("req", Command.PUSH_SAMPLE): (_P("<IIi"), ("offset", "total", "label"), True),
    ("resp", Command.PUSH_SAMPLE): (_P("<II"), ("received", "samples_held"), False),
    ("req", Command.TRAIN): (_P("<IiiI"), ("steps", "lr_m", "lr_e", "round_id"), False),
    ("resp", Command.TRAIN): (_P("<IIII"), ("steps_done", "samples_used", "correct", "update_counter"), False),
    ("req", Command.GET_DELTA): (_P("<IHH"), ("offset", "max_len", "topk_permille"), False),
    ("resp", Command.GET_DELTA): (_P("<I"), ("total",), True),
    ("req", Command.GET_STATS): (_P("<"), (), False),
    ("resp", Command.GET_STATS): (_P("<IIIIII"), ("samples_held", "steps_total", "update_counter", "arena_bytes",
                                                 "stack_high_water", "plan_bytes"), False),
    ("req", Command.SELFTEST): (_P("<"), (), False),
    ("resp", Command.SELFTEST): (_P("<IIiIQ"), ("cases", "passed", "first_failed", "crc32", "ticks"), False),
    ("req", Command.BOARD_INFO): (_P("<"), (), False),
    ("resp", Command.BOARD_INFO): (_P("<IIQIIIIIIII"), (
        "cpuid", "tick_hz", "ticks", "stack_size", "stack_high_water", "arena_bytes", "static_ram", "flash_used",
        "frames_ok", "frames_bad", "last_error"), False),
    ("req", Command.STATE_HASH): (_P("<"), (), False),
    ("resp", Command.STATE_HASH): (_P("<32sIIIIQ"), ("state_hash", "update_counter", "model_version", "steps_total",
                                                    "p_label_q15", "train_ticks"), False),
    ("req", Command.STORE_SAMPLES): (_P("<III"), ("first_slot", "offset", "total"), True),
    ("resp", Command.STORE_SAMPLES): (_P("<III"), ("received", "samples_stored", "sample_capacity"), False),
    ("req", Command.TRAIN_LIST): (_P("<iiII"), ("lr_m", "lr_e", "round_id", "count"), True),
    ("resp", Command.TRAIN_LIST): (_P("<IIII"), ("steps_done", "samples_used", "correct", "update_counter"), False),
    ("err", Status.ERR_STATE): (_P("<I"), ("expected_offset",), False),
    ("err", Status.ERR_NO_MEMORY): (_P("<I"), ("capacity",), False),
    ("err", Status.ERR_FORMAT): (_P("<HH"), ("wire_error", "reserved"), False),
}


@dataclass(frozen=True)
class Frame:
    seq: int  # u16, the response repeats the request's
    code: int  # a Command (bridge -> MCU) or a Status (MCU -> bridge)
    payload: bytes = b""


def _crc16_table() -> tuple[int, ...]:
    out = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        out.append(crc)
    return tuple(out)


_CRC16 = _crc16_table()  # NOTE: one lookup per byte instead of 8 shifts: ~10x faster on 517-byte frames


def crc16_ccitt(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final xor (check "123456789" = 0x29B1)."""
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the output holds no 0x00 (the delimiter is not appended)."""
    out = bytearray(b"\0")
    code_at, run = 0, 1
    for byte in data:
        if byte:
            out.append(byte)
            run += 1
        if not byte or run == 0xFF:
            out[code_at] = run
            code_at, run = len(out), 1
            out.append(0)
    out[code_at] = run
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of :func:`cobs_encode` (no delimiter). Raises ``BAD_COBS`` on a 0x00 or a run past the end."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise WireFormatError(WireError.BAD_COBS, f"frame: 0x00 inside a COBS frame at byte {i}")
        end = i + code
        if end > n:
            raise WireFormatError(WireError.BAD_COBS, f"frame: COBS run of {code} at byte {i} passes the end ({n})")
        block = data[i + 1: end]
        if 0 in block:
            raise WireFormatError(WireError.BAD_COBS, "frame: 0x00 inside a COBS frame")
        out += block
        i = end
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode_frame(frame: Frame) -> bytes:
    """COBS(seq ‖ code ‖ payload ‖ crc16) followed by the 0x00 delimiter."""
    if len(frame.payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(frame.payload)} bytes, at most {MAX_PAYLOAD}")
    raw = struct.pack("<HB", frame.seq, frame.code) + bytes(frame.payload)
    return cobs_encode(raw + struct.pack("<H", crc16_ccitt(raw))) + b"\0"


def decode_frame(encoded: bytes) -> Frame:
    """One frame from its COBS bytes (the delimiter already stripped). Raises :class:`WireFormatError`."""
    if len(encoded) > MAX_ENCODED:
        raise WireFormatError(WireError.FRAME_TOO_LONG, f"frame: {len(encoded)} encoded bytes, at most {MAX_ENCODED}")
    raw = cobs_decode(bytes(encoded))
    if len(raw) < FRAME_OVERHEAD:
        raise WireFormatError(WireError.TRUNCATED, f"frame: {len(raw)} bytes, at least {FRAME_OVERHEAD}")
    if len(raw) > MAX_RAW:
        raise WireFormatError(WireError.FRAME_TOO_LONG, f"frame: payload of {len(raw) - FRAME_OVERHEAD} bytes, "
                                                        f"at most {MAX_PAYLOAD}")
    (crc,) = struct.unpack_from("<H", raw, len(raw) - 2)
    if crc != crc16_ccitt(raw[:-2]):
        raise WireFormatError(WireError.CRC_MISMATCH, "frame: CRC16 mismatch: corrupted on the line, resend")
    seq, code = struct.unpack_from("<HB", raw, 0)
    return Frame(seq, code, raw[3:-2])


class Deframer:
    """Sans-I/O stream splitter: ``feed(bytes)`` returns the complete frames (or their decoding errors) in order.

    Bytes after an overlong frame are dropped up to the next delimiter, so one bad frame never desynchronizes
    the stream.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._overflow = False

    def feed(self, data: bytes) -> list[Frame | WireFormatError]:
        out: list[Frame | WireFormatError] = []
        for byte in data:
            if byte:
                if len(self._buf) < MAX_ENCODED:
                    self._buf.append(byte)
                else:
                    self._overflow = True
                continue
            if self._overflow:
                out.append(WireFormatError(WireError.FRAME_TOO_LONG, f"frame: above {MAX_ENCODED} encoded bytes"))
            elif self._buf:
                try:
                    out.append(decode_frame(bytes(self._buf)))
                except WireFormatError as e:
                    out.append(e)
            self._buf.clear()
            self._overflow = False
        return out


def _merge_families() -> None:
    from device_agent.wire import frames_personal, frames_secagg  # NOTE: they import this module's names

    for codes, table in ((PERSONAL_COMMANDS, frames_personal.PAYLOADS), (SECAGG_COMMANDS, frames_secagg.PAYLOADS)):
        for direction, code in table:
            if code not in codes or (direction, code) in PAYLOADS:
                raise ImportError(f"frame family: code {code:#04x} outside its range or defined twice")
        PAYLOADS.update(table)


_merge_families()


def _layout(direction: str, code: int) -> tuple[struct.Struct, tuple[str, ...], bool]:
    key = (direction, code)
    if key not in PAYLOADS:
        if direction == "err" and code in _STATUSES:
            return struct.Struct("<"), (), False
        raise WireFormatError(WireError.BAD_ENUM, f"frame: no {direction} payload for code {code:#04x}")
    return PAYLOADS[key]


_STATUSES = frozenset(int(s) for s in Status)


def pack(direction: str, code: int, tail: bytes = b"", **fields: int) -> bytes:
    """A payload from :data:`PAYLOADS`: ``direction`` "req" / "resp" (code = Command) or "err" (code = Status)."""
    st, names, has_tail = _layout(direction, code)
    if set(fields) != set(names) or (tail and not has_tail):
        raise ValueError(f"{direction} {code:#04x}: fields {names}{' + tail' if has_tail else ''} expected, "
                         f"got {sorted(fields)}")
    out = st.pack(*(fields[n] for n in names)) + bytes(tail)
    if len(out) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(out)} bytes, at most {MAX_PAYLOAD}")
    return out


def unpack(direction: str, code: int, payload: bytes) -> tuple[dict[str, int], bytes]:
    """Fields and variable tail of a payload; ``TRUNCATED`` / ``TRAILING_BYTES`` when its length is wrong."""
    st, names, has_tail = _layout(direction, code)
    if len(payload) < st.size:
        raise WireFormatError(WireError.TRUNCATED, f"frame: {direction} {code:#04x} payload of {len(payload)} "
                                                   f"bytes, at least {st.size}")
    if len(payload) > st.size and not has_tail:
        raise WireFormatError(WireError.TRAILING_BYTES, f"frame: {direction} {code:#04x} payload of "
                                                        f"{len(payload)} bytes, exactly {st.size}")
    return dict(zip(names, st.unpack_from(payload, 0))), bytes(payload[st.size:])


def blob_chunks(command: Command, blob: bytes, first_seq: int = 0, max_payload: int = MAX_PAYLOAD) -> list[Frame]:
    """LOAD_PLAN / LOAD_UPDATE request frames carrying ``blob`` in order (``seq`` counts up, wrapping at 2**16)."""
    if command not in (Command.LOAD_PLAN, Command.LOAD_UPDATE):
        raise ValueError(f"{command!r} does not carry a blob")
    step = max_payload - 8
    return [Frame((first_seq + i) & 0xFFFF, command,
                  pack("req", command, blob[off: off + step], offset=off, total=len(blob)))
            for i, off in enumerate(range(0, len(blob), step))]


TRAIN_LIST_MAX = (MAX_PAYLOAD - PAYLOADS[("req", Command.TRAIN_LIST)][0].size) // 2  # slots in one frame


def sample_records(samples: list[tuple[bytes, int]], input_nbytes: int) -> bytes:
    """A STORE_SAMPLES batch: per sample ``label i32 | input bytes | zero pad to 4`` (docs/formats.md)."""
    pad = -input_nbytes % 4
    out = bytearray()
    for x, label in samples:
        if len(x) != input_nbytes:
            raise ValueError(f"sample of {len(x)} bytes, the plan's input has {input_nbytes}")
        out += struct.pack("<i", label) + bytes(x) + bytes(pad)
    return bytes(out)


def read_sample_records(batch: bytes, input_nbytes: int) -> list[tuple[bytes, int]]:
    """Inverse of :func:`sample_records`; ``BAD_LENGTH`` / ``RESERVED_NONZERO`` as the board refuses them."""
    rec = 4 + input_nbytes + (-input_nbytes % 4)
    if len(batch) % rec:
        raise WireFormatError(WireError.BAD_LENGTH, f"sample batch of {len(batch)} bytes: not whole records of "
                                                    f"{rec} bytes")
    out = []
    for off in range(0, len(batch), rec):
        if any(batch[off + 4 + input_nbytes: off + rec]):
            raise WireFormatError(WireError.RESERVED_NONZERO, f"sample batch: non-zero padding in record "
                                                             f"{off // rec}")
        (label,) = struct.unpack_from("<i", batch, off)
        out.append((bytes(batch[off + 4: off + 4 + input_nbytes]), label))
    return out


def train_list_payload(slots: list[int], lr_m: int, lr_e: int, round_id: int = 0) -> bytes:
    """TRAIN_LIST request payload: the fixed fields, then ``count`` x u16 slot indices."""
    if len(slots) > TRAIN_LIST_MAX or any(not 0 <= s <= 0xFFFF for s in slots):
        raise ValueError(f"TRAIN_LIST: at most {TRAIN_LIST_MAX} slots in [0, 65535] per frame, got {len(slots)}")
    return pack("req", Command.TRAIN_LIST, struct.pack(f"<{len(slots)}H", *slots), lr_m=lr_m, lr_e=lr_e,
                round_id=round_id, count=len(slots))


def read_train_list(payload: bytes) -> tuple[dict[str, int], list[int]]:
    """Inverse of :func:`train_list_payload`: fields and slots; ``BAD_LENGTH`` if count and length disagree."""
    fields, tail = unpack("req", Command.TRAIN_LIST, payload)
    if len(tail) != 2 * fields["count"]:
        raise WireFormatError(WireError.BAD_LENGTH, f"TRAIN_LIST: count {fields['count']} but {len(tail)} slot bytes")
    return fields, list(struct.unpack(f"<{fields['count']}H", tail))


def topk_from_permille(numel: int, permille: int) -> int | None:
    """GET_DELTA's k per tensor: None (dense) for 0, else ``max(1, ceil(numel * permille / 1000))``."""
    if permille == 0:
        return None
    return max(1, (numel * permille + 999) // 1000)
