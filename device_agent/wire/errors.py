"""The error codes every TinyFleet format reader returns (Python raises them, C returns the same numbers).

One :class:`WireError` enum is shared by the plan blob, model update, delta and UART frames; the numbers are
part of the spec (docs/formats.md, "Error codes") and never change meaning. This module refuses to grow a
second enum per format: add a code here, document it, never renumber.
"""

from __future__ import annotations

from enum import IntEnum


class WireError(IntEnum):
    OK = 0  # C only: success
    TRUNCATED = 1  # the bytes end before the declared length or inside a field
    BAD_MAGIC = 2  # not this format
    UNSUPPORTED_VERSION = 3  # another format version than the reader speaks
    BAD_LENGTH = 4  # a length field disagrees with the layout (header length, signature length, record size)
    TRAILING_BYTES = 5  # more bytes than the header's total length, or bytes after the last section
    CRC_MISMATCH = 6  # CRC32 (blobs) or CRC16 (UART frames) does not match: corrupted in transit
    UNSIGNED = 7  # the reader holds a key and the blob carries no signature
    BAD_SIGNATURE = 8  # the signature does not verify with the reader's key
    SIG_ALG_MISMATCH = 9  # signed with another algorithm than the reader's key
    RESERVED_NONZERO = 10  # a flags/reserved/padding byte is not zero
    BAD_ENUM = 11  # unknown kind, dtype, op type, encoding, signature algorithm, command or status
    BAD_INDEX = 12  # a tensor index out of range (op inputs/outputs, plan ids, top-k indices)
    BAD_SCALE = 13  # a scale that is NaN, Inf or <= 0
    SIZE_OVERFLOW = 14  # a shape product or count above 2**31 - 1, or a count above its documented bound
    OUT_OF_ARENA = 15  # arena offset + size beyond arena_bytes
    BAD_SHAPE = 16  # rank > 4, a zero dimension, unused dims not zero, scale count not 1 or shape[0]
    BAD_OFFSET = 17  # a section offset that is not where the canonical layout puts it
    BAD_STRING = 18  # a string that is not valid UTF-8, too long, or holds forbidden characters
    BAD_VALUE = 19  # a field outside its documented range (booleans, ratios, zero points, versions, arity)
    ID_ORDER = 20  # tensor ids (or top-k indices) not strictly increasing, e.g. a duplicate
    NOT_CANONICAL = 21  # a valid but non-canonical encoding (wider dtype than needed, zero top-k value)
    PLAN_MISMATCH = 22  # an update/delta that does not fit the plan it is applied to
    BAD_COBS = 23  # COBS decoding failed (zero byte inside a frame, code runs past the end)
    FRAME_TOO_LONG = 24  # a UART frame above the maximum size
    HASH_MISMATCH = 25  # an applied model update does not give the version it names (a DIFF on another base)


class WireFormatError(ValueError):
    """Bad bytes: ``code`` is the :class:`WireError` a C reader returns for the same input.

    The message says what was expected, what arrived and, where there is one, what to do.
    """

    def __init__(self, code: WireError, message: str):
        super().__init__(f"[{code.name}={int(code)}] {message}")
        self.code = code
