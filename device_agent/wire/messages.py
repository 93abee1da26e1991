"""JSON control messages of the fleet protocol (hello, status, task, ack): one schema each, strict both ways.

Binary payloads (plan, model update, delta) are not here: they live in ``device_agent.wire``. This module
refuses anything it was not told about: unknown or missing fields, wrong types (``true`` is not an integer),
out-of-range values, a protocol version other than :data:`PROTOCOL_VERSION`, payloads over
:data:`MAX_PAYLOAD` bytes, nesting deeper than :data:`MAX_DEPTH` (checked on the bytes before any decoding, so
no input reaches the JSON decoder's recursion). A refusal is a :class:`MessageError` carrying a
:class:`MsgError` code; nothing else escapes :func:`parse`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar, TypeVar, overload

PROTOCOL_VERSION = 1
MAX_PAYLOAD = 4096  # bytes; control messages are small, a bigger one is a bug or an attack
MAX_DEPTH = 4  # nested objects/lists; every message is an object holding at most a list of strings (depth 2)
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # MQTT-topic-safe: no '/', '+', '#'
_HEX = re.compile(r"^[0-9a-f]{2,128}$")
_U32 = 2**32 - 1


class MsgError(IntEnum):
    TOO_LARGE = 1
    NOT_JSON = 2
    NOT_OBJECT = 3
    BAD_VERSION = 4
    UNKNOWN_TYPE = 5
    MISSING_FIELD = 6
    UNKNOWN_FIELD = 7
    BAD_FIELD_TYPE = 8
    BAD_VALUE = 9
    TOO_DEEP = 10


class MessageError(ValueError):
    """A control message that does not match its schema; ``code`` says which rule it broke."""

    def __init__(self, code: MsgError, detail: str):
        self.code = code
        self.detail = detail
        super().__init__(f"{code.name}: {detail}")


# --- field checks: each takes (name, value) and raises MessageError or returns the parsed value -----------


def _int(lo: int, hi: int):
    def check(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise MessageError(MsgError.BAD_FIELD_TYPE, f"{name}: expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise MessageError(MsgError.BAD_VALUE, f"{name}: expected {lo}..{hi}, got {v}")
        return v
    return check


def _num(lo: float, hi: float, lo_open: bool = False):
    def check(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise MessageError(MsgError.BAD_FIELD_TYPE, f"{name}: expected a number, got {v!r}")
        try:
            v = float(v)
        except OverflowError:  # an integer of hundreds of digits
            raise MessageError(MsgError.BAD_VALUE, f"{name}: expected a number in [{lo}, {hi}], got an integer "
                                                   "too large for a float") from None
        if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
            raise MessageError(MsgError.BAD_VALUE, f"{name}: expected {'(' if lo_open else '['}{lo}, {hi}], got {v}")
        return v
    return check


def _str(pattern: re.Pattern | None = None, choices: tuple[str, ...] = (), max_len: int = 64):
    def check(name: str, v: Any) -> str:
        if not isinstance(v, str):
            raise MessageError(MsgError.BAD_FIELD_TYPE, f"{name}: expected a string, got {v!r}")
        if len(v) > max_len or (pattern is not None and not pattern.fullmatch(v)) or (choices and v not in choices):
            want = f"one of {', '.join(choices)}" if choices else f"a string matching {pattern.pattern if pattern else '.*'}"
            raise MessageError(MsgError.BAD_VALUE, f"{name}: expected {want}, got {v!r}")
        return v
    return check


def _list(item, max_items: int):
    def check(name: str, v: Any) -> tuple:
        if not isinstance(v, list):
            raise MessageError(MsgError.BAD_FIELD_TYPE, f"{name}: expected a list, got {v!r}")
        if len(v) > max_items:
            raise MessageError(MsgError.BAD_VALUE, f"{name}: at most {max_items} items, got {len(v)}")
        return tuple(item(f"{name}[{i}]", x) for i, x in enumerate(v))
    return check


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise MessageError(MsgError.BAD_FIELD_TYPE, f"{name}: expected true/false, got {v!r}")
    return v


_DEVICE_ID = _str(_ID)
_HASH = _str(_HEX, max_len=128)
_U32_CHECK = _int(0, _U32)
_REASON = _str(re.compile(r"^[a-z][a-z_]{0,31}$"), max_len=32)  # a lowercase name: ok, stale_base, no_samples, ...
_SESSION = _int(0, 2**53 - 1)  # a connection number (JSON-safe integer), growing per device
MAX_DETAIL = 256
_DETAIL = _str(re.compile(rf"^[ -~]{{0,{MAX_DETAIL}}}$"), max_len=MAX_DETAIL)  # printable ASCII, one line


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


class _Message:
    """Base: ``to_json()`` writes ``{"v": 1, "type": TYPE, ...fields}``; ``parse`` checks against ``SCHEMA``.

    Every field of ``SCHEMA`` is required except those in ``OPTIONAL``: an optional field whose value is None is
    left out by the writer and comes back as None from the reader (``null`` on the wire is refused).
    ``_check_fields`` is a per-type rule across fields (e.g. a failed status names its round).
    """

    TYPE: ClassVar[str]
    SCHEMA: ClassVar[dict[str, Any]]  # field name -> check
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def to_json(self) -> bytes:
        body = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        for k in _field_names(type(self)):  # type: ignore[arg-type]  # NOTE: a class is hashable; not asdict, which deep-copies every field (flat scalars here)
            v = getattr(self, k)
            if v is None and k in self.OPTIONAL:
                continue
            body[k] = list(v) if isinstance(v, tuple) else v
        for k, check in self.SCHEMA.items():  # a writer never emits what a reader would refuse
            if k in body:
                check(k, body[k])
        self._check_fields(body)
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_obj(cls, obj: dict) -> _Message:
        missing = [k for k in cls.SCHEMA if k not in obj and k not in cls.OPTIONAL]
        if missing:
            raise MessageError(MsgError.MISSING_FIELD, f"{cls.TYPE}: missing {', '.join(missing)}")
        extra = sorted(set(obj) - set(cls.SCHEMA) - {"v", "type"})
        if extra:
            raise MessageError(MsgError.UNKNOWN_FIELD, f"{cls.TYPE}: unknown field(s) {', '.join(extra)}")
        cls._check_fields(obj)
        return cls(**{k: check(k, obj[k]) if k in obj else None for k, check in cls.SCHEMA.items()})

    @classmethod
    def _check_fields(cls, obj: dict) -> None:
        """Rules across fields (raise MessageError); field-by-field checks are in ``SCHEMA``."""


@dataclass(frozen=True)
class Hello(_Message):
    """Device -> coordinator, ``dev/<id>/hello`` (retained): who I am and what I can hold."""

    TYPE: ClassVar[str] = "hello"
    device_id: str
    board: str
    sram: int  # bytes available for training (arena + trainable)
    flash: int  # bytes
    plan_hashes: tuple[str, ...] = ()  # plans already in flash (hex)
    firmware: str = ""
    session: int | None = None  # this connection's number, growing (see Status.session)
    SCHEMA: ClassVar[dict[str, Any]] = {
        "device_id": _DEVICE_ID, "board": _str(_ID), "sram": _int(0, _U32), "flash": _int(0, _U32),
        "plan_hashes": _list(_HASH, 16), "firmware": _str(re.compile(r"^[ -~]{0,64}$")), "session": _SESSION,
    }
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"session"})


@dataclass(frozen=True)
class Status(_Message):
    """Device -> coordinator, ``dev/<id>/status`` (retained; the Last Will is ``state = "offline"``).

    ``failed``: the device cannot train round ``round_id`` (``reason`` says why, one of :data:`FAIL_REASONS`
    for the Python agent); the device is still online, the coordinator stops waiting for its delta.
    ``round_id`` and ``reason`` are present exactly when ``state`` is ``failed``. An ``offline`` status may leave
    out ``model_version`` and ``samples`` (the Last Will does: it is registered at connect time, so it would
    report a stale version); a receiver must not read them from an offline status.
    """

    TYPE: ClassVar[str] = "status"
    STATES: ClassVar[tuple[str, ...]] = ("online", "busy", "offline", "failed")
    device_id: str
    state: str
    model_version: int | None = 0  # None: left out (offline only)
    samples: int | None = 0  # private samples currently buffered; None: left out (offline only)
    round_id: int | None = None  # failed only: the round the device cannot train
    reason: str | None = None  # failed only: why, lowercase (FAIL_REASONS)
    # NOTE: the connection this status belongs to (birth/death numbering, as Sparkplug's bdSeq): a Last Will or
    # status of an older connection that the broker delivers late is stale, and a receiver ignores it
    session: int | None = None
    SCHEMA: ClassVar[dict[str, Any]] = {
        "device_id": _DEVICE_ID, "state": _str(choices=STATES), "model_version": _U32_CHECK,
        "samples": _U32_CHECK, "round_id": _int(1, _U32), "reason": _REASON, "session": _SESSION,
    }
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"model_version", "samples", "round_id", "reason", "session"})

    @classmethod
    def _check_fields(cls, obj: dict) -> None:
        state = obj.get("state")
        failed = [k for k in ("round_id", "reason") if obj.get(k) is not None]
        if state == "failed" and len(failed) != 2:
            raise MessageError(MsgError.MISSING_FIELD, "status: a failed status needs round_id and reason")
        if state != "failed" and failed:
            raise MessageError(MsgError.UNKNOWN_FIELD, f"status: {', '.join(failed)} only in a failed status, "
                                                       f"this one is {state!r}")
        if state != "offline" and any(obj.get(k) is None for k in ("model_version", "samples")):
            raise MessageError(MsgError.MISSING_FIELD, f"status: model_version and samples are required unless "
                                                       f"the state is offline, got state {state!r}")


# what the Python agent puts in a failed status's reason (other devices may send other lowercase names)
FAIL_REASONS = ("no_samples", "bad_samples", "wrong_plan", "wrong_model", "train_error")


@dataclass(frozen=True)
class Task(_Message):
    """Coordinator -> device, ``dev/<id>/task``: train on model ``model_version`` for round ``round_id``."""

    TYPE: ClassVar[str] = "task"
    round_id: int
    plan_hash: str
    model_version: int
    model_hash: str
    lr: float
    local_steps: int
    batch_size: int
    deadline: float  # coordinator clock (seconds); a delta arriving later is not counted
    topk_permille: int = 0  # send the k = ceil(numel * permille / 1000) largest changes per tensor; 0: no request
    SCHEMA: ClassVar[dict[str, Any]] = {
        "round_id": _int(1, _U32), "plan_hash": _HASH, "model_version": _U32_CHECK, "model_hash": _HASH,
        "lr": _num(0.0, 1e6, lo_open=True), "local_steps": _int(1, 1_000_000), "batch_size": _int(1, 4096),
        "deadline": _num(0.0, 1e12), "topk_permille": _int(0, 1000),
    }


@dataclass(frozen=True)
class Ack(_Message):
    """Coordinator -> device, ``dev/<id>/ack``: what became of the delta with ``content_hash``."""

    TYPE: ClassVar[str] = "ack"
    round_id: int
    content_hash: str
    accepted: bool
    reason: str = "ok"  # a round.Reject name (lowercase) when not accepted, "duplicate" for a redelivery
    detail: str | None = None  # optional: what the coordinator found wrong, e.g. the WireError of a MALFORMED delta
    SCHEMA: ClassVar[dict[str, Any]] = {
        "round_id": _U32_CHECK, "content_hash": _HASH, "accepted": _bool, "reason": _REASON, "detail": _DETAIL,
    }
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"detail"})


@dataclass(frozen=True)
class PlanIndex(_Message):
    """Coordinator -> all, ``plan/index`` (retained) beside a nested plan family's ``plan/<hash>`` blobs: the bytes
    of SRAM each plan needs. A device trains the plan with the largest need that fits the SRAM in its hello (the
    coordinator assigns the same one); a device below every need is never asked to train."""

    TYPE: ClassVar[str] = "plans"
    plan_hashes: tuple[str, ...]
    sram: tuple[int, ...]  # bytes, one per plan hash, in the same order
    SCHEMA: ClassVar[dict[str, Any]] = {"plan_hashes": _list(_HASH, 16), "sram": _list(_U32_CHECK, 16)}

    @classmethod
    def _check_fields(cls, obj: dict) -> None:
        hashes, sram = obj.get("plan_hashes", ()), obj.get("sram", ())
        if not hashes or len(hashes) != len(sram) or len(set(hashes)) != len(hashes):
            raise MessageError(MsgError.BAD_VALUE, f"plans: plan_hashes and sram must be equally long, non-empty "
                                                   f"and without repeats, got {len(hashes)} hashes and {len(sram)} sizes")

    def choose(self, sram: int) -> str | None:
        """The hash of the plan with the largest need <= ``sram``, or None when none fits."""
        fits = [(need, h) for h, need in zip(self.plan_hashes, self.sram) if need <= sram]
        return max(fits)[1] if fits else None


def ack_detail(text: str) -> str:
    """``text`` made fit for :attr:`Ack.detail`: one line of printable ASCII, at most :data:`MAX_DETAIL` chars
    (other characters become ``?``; a longer text is cut and ends with ``...``, so a cut is visible)."""
    line = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return line if len(line) <= MAX_DETAIL else line[:MAX_DETAIL - 3] + "..."


MESSAGES: dict[str, type[_Message]] = {m.TYPE: m for m in (Hello, Status, Task, Ack, PlanIndex)}

# --- topics: everything lives under tinyfleet/<fleet>/ (docs/protocol.md) -------------------------------------

TOPIC_ROOT = "tinyfleet"
DEVICE_UP = ("hello", "status", "delta", "secagg")  # device -> coordinator, on dev/<id>/<kind>
DEVICE_DOWN = ("task", "ack", "model", "secagg_relay")  # coordinator -> one device, on dev/<id>/<kind>; model: a FULL update


@dataclass(frozen=True)
class Publish:
    """Publish intent of a sans-I/O state machine: QoS 1 on ``tinyfleet/<fleet>/<topic>``."""

    topic: str  # relative to tinyfleet/<fleet>/, e.g. "dev/d01/task", "model/current"
    payload: bytes
    retain: bool = False


def full_topic(fleet: str, topic: str) -> str:
    return f"{TOPIC_ROOT}/{fleet}/{topic}"


def split_topic(fleet: str, topic: str) -> tuple[str, str] | None:
    """``tinyfleet/<fleet>/dev/<id>/<kind>`` -> ``(id, kind)``; ``.../model/current`` -> ``("", "model")``;
    ``.../plan/<hash>`` -> ``(hash, "plan")``; anything else -> None."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != TOPIC_ROOT or parts[1] != fleet:
        return None
    rest = parts[2:]
    if len(rest) == 3 and rest[0] == "dev" and _ID.fullmatch(rest[1]) and rest[2] in DEVICE_UP + DEVICE_DOWN:
        return rest[1], rest[2]
    if rest == ["model", "current"]:
        return "", "model"
    if len(rest) == 2 and rest[0] == "plan" and _HEX.fullmatch(rest[1]):
        return rest[1], "plan"
    return None


M = TypeVar("M", bound=_Message)


@overload
def parse(payload: bytes, expect: type[M]) -> M: ...


@overload
def parse(payload: bytes, expect: None = None) -> _Message: ...


def parse(payload: bytes, expect: type[_Message] | None = None) -> _Message:
    """Parse one control message; ``expect`` restricts the type (e.g. only ``Task`` on a task topic).

    Raises :class:`MessageError` (and nothing else) for any input: size and nesting are checked on the bytes
    before the JSON decoder sees them.
    """
    if not isinstance(payload, (bytes, bytearray)):
        raise MessageError(MsgError.NOT_JSON, f"expected bytes, got {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD:
        raise MessageError(MsgError.TOO_LARGE, f"{len(payload)} bytes > {MAX_PAYLOAD}")
    payload = bytes(payload)
    depth = nesting_depth(payload)
    if depth > MAX_DEPTH:
        raise MessageError(MsgError.TOO_DEEP, f"JSON nested deeper than {MAX_DEPTH} levels (objects and lists)")
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise MessageError(MsgError.NOT_JSON, str(e)) from None
    if not isinstance(obj, dict):
        raise MessageError(MsgError.NOT_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    v = obj.get("v")
    if isinstance(v, bool) or v != PROTOCOL_VERSION:
        raise MessageError(MsgError.BAD_VERSION, f"protocol v{PROTOCOL_VERSION} expected, got v={_short(v)}: "
                           "update the device agent or the coordinator so both speak the same version")
    typ = obj.get("type")
    cls = MESSAGES.get(typ) if isinstance(typ, str) else None
    if cls is None or (expect is not None and cls is not expect):
        want = expect.TYPE if expect is not None else "|".join(MESSAGES)
        raise MessageError(MsgError.UNKNOWN_TYPE, f"type {want} expected, got {_short(typ)}")
    return cls.from_obj(obj)


# a JSON string literal (escapes included; an unterminated one runs to the end) or a bracket: one pass, no
# backtracking, so a hostile payload costs linear time
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


def nesting_depth(payload: bytes) -> int:
    """How deep ``[``/``{`` nest in ``payload`` outside string literals, from the bytes alone: a value above
    :data:`MAX_DEPTH` (the scan stops there) or, at or below it, an upper bound of the real depth.

    NOTE: a cheap bound first (C-speed ``count``: fewer openers than the limit cannot nest deeper), the running
    depth only for the rare payload with many brackets.
    """
    openers = payload.count(b"[") + payload.count(b"{")
    if openers <= MAX_DEPTH:
        return openers  # an upper bound, enough to pass
    depth = deepest = 0
    for m in _TOKEN.finditer(payload):
        byte = payload[m.start()]
        if byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                break
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


__all__ = [
    "FAIL_REASONS",
    "MAX_DEPTH",
    "MAX_PAYLOAD",
    "MESSAGES",
    "PROTOCOL_VERSION",
    "Ack",
    "Hello",
    "MessageError",
    "MsgError",
    "Publish",
    "Status",
    "Task",
    "ack_detail",
    "full_topic",
    "nesting_depth",
    "parse",
    "split_topic",
]
