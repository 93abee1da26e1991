"""JSON control messages of the fleet protocol (hello, status, task, ack): one schema each, strict both ways.

Binary payloads (plan, model update, delta) are not here: they live in ``device_agent.wire``. This module
refuses anything it was not told about: unknown or missing fields, wrong types (``true`` is not an integer),
out-of-range values, a protocol version other than :data:`PROTOCOL_VERSION`, payloads over
:data:`MAX_PAYLOAD` bytes. A refusal is a :class:`MessageError` carrying a :class:`MsgError` code.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar

PROTOCOL_VERSION = 1
MAX_PAYLOAD = 4096  # bytes; control messages are small, a bigger one is a bug or an attack
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
        v = float(v)
        if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
            raise MessageError(MsgError.BAD_VALUE, f"{name}: expected {'(' if lo_open else '['}{lo}, {hi}], got {v}")
        return v
    return check


def _str(pattern: re.Pattern | None = None, choices: tuple[str, ...] = (), max_len: int = 64):
    def check(name: str, v: Any) -> str:
        if not isinstance(v, str):
            raise MessageError(MsgError.BAD_FIELD_TYPE, f"{name}: expected a string, got {v!r}")
        if len(v) > max_len or (pattern is not None and not pattern.match(v)) or (choices and v not in choices):
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


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


class _Message:
    """Base: ``to_json()`` writes ``{"v": 1, "type": TYPE, ...fields}``; ``parse`` checks against ``SCHEMA``."""

    TYPE: ClassVar[str]
    SCHEMA: ClassVar[dict[str, Any]]  # field name -> check; every field is required

    def to_json(self) -> bytes:
        body = {"v": PROTOCOL_VERSION, "type": self.TYPE}
        for k in _field_names(type(self)):  # NOTE: not asdict, which deep-copies every field (flat scalars here)
            v = getattr(self, k)
            body[k] = list(v) if isinstance(v, tuple) else v
        for k, check in self.SCHEMA.items():  # a writer never emits what a reader would refuse
            check(k, body[k])
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_obj(cls, obj: dict) -> _Message:
        missing = [k for k in cls.SCHEMA if k not in obj]
        if missing:
            raise MessageError(MsgError.MISSING_FIELD, f"{cls.TYPE}: missing {', '.join(missing)}")
        extra = sorted(set(obj) - set(cls.SCHEMA) - {"v", "type"})
        if extra:
            raise MessageError(MsgError.UNKNOWN_FIELD, f"{cls.TYPE}: unknown field(s) {', '.join(extra)}")
        return cls(**{k: check(k, obj[k]) for k, check in cls.SCHEMA.items()})


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
    SCHEMA: ClassVar[dict[str, Any]] = {
        "device_id": _DEVICE_ID, "board": _str(_ID), "sram": _int(0, _U32), "flash": _int(0, _U32),
        "plan_hashes": _list(_HASH, 16), "firmware": _str(re.compile(r"^[ -~]{0,64}$")),
    }


@dataclass(frozen=True)
class Status(_Message):
    """Device -> coordinator, ``dev/<id>/status`` (retained; the Last Will is ``state = "offline"``)."""

    TYPE: ClassVar[str] = "status"
    STATES: ClassVar[tuple[str, ...]] = ("online", "busy", "offline")
    device_id: str
    state: str
    model_version: int = 0
    samples: int = 0  # private samples currently buffered
    SCHEMA: ClassVar[dict[str, Any]] = {
        "device_id": _DEVICE_ID, "state": _str(choices=STATES), "model_version": _U32_CHECK,
        "samples": _U32_CHECK,
    }


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
    reason: str = "ok"  # a round.Reject name when not accepted, "duplicate" for a redelivery
    SCHEMA: ClassVar[dict[str, Any]] = {
        "round_id": _U32_CHECK, "content_hash": _HASH, "accepted": _bool,
        "reason": _str(re.compile(r"^[a-z_]{1,32}$")),
    }


MESSAGES: dict[str, type[_Message]] = {m.TYPE: m for m in (Hello, Status, Task, Ack)}

# --- topics: everything lives under tinyfleet/<fleet>/ (docs/protocol.md) -------------------------------------

TOPIC_ROOT = "tinyfleet"
DEVICE_UP = ("hello", "status", "delta")  # device -> coordinator, on dev/<id>/<kind>
DEVICE_DOWN = ("task", "ack", "model")  # coordinator -> one device, on dev/<id>/<kind>; model: a FULL update


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
    if len(rest) == 3 and rest[0] == "dev" and _ID.match(rest[1]) and rest[2] in DEVICE_UP + DEVICE_DOWN:
        return rest[1], rest[2]
    if rest == ["model", "current"]:
        return "", "model"
    if len(rest) == 2 and rest[0] == "plan" and _HEX.match(rest[1]):
        return rest[1], "plan"
    return None


def parse(payload: bytes, expect: type[_Message] | None = None) -> _Message:
    """Parse one control message; ``expect`` restricts the type (e.g. only ``Task`` on a task topic)."""
    if not isinstance(payload, (bytes, bytearray)):
        raise MessageError(MsgError.NOT_JSON, f"expected bytes, got {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD:
        raise MessageError(MsgError.TOO_LARGE, f"{len(payload)} bytes > {MAX_PAYLOAD}")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"), parse_constant=_no_constant,
                         object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise MessageError(MsgError.NOT_JSON, str(e)) from None
    if not isinstance(obj, dict):
        raise MessageError(MsgError.NOT_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    v = obj.get("v")
    if isinstance(v, bool) or v != PROTOCOL_VERSION:
        raise MessageError(MsgError.BAD_VERSION, f"protocol v{PROTOCOL_VERSION} expected, got v={v!r}: "
                           "update the device agent or the coordinator so both speak the same version")
    cls = MESSAGES.get(obj.get("type"))  # type: ignore[arg-type]
    if cls is None or (expect is not None and cls is not expect):
        want = expect.TYPE if expect is not None else "|".join(MESSAGES)
        raise MessageError(MsgError.UNKNOWN_TYPE, f"type {want} expected, got {obj.get('type')!r}")
    return cls.from_obj(obj)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


__all__ = [
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
    "full_topic",
    "parse",
    "split_topic",
]
