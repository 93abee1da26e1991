"""Control messages under hostile input: nothing but MessageError leaves ``parse``, whatever the bytes (deep
nesting, huge numbers, odd types), and the fields added for failed devices, the Last Will and ack details are
strict both ways.
"""

from __future__ import annotations

import json
import random
import time

import pytest

from device_agent.wire.messages import (
    MAX_DEPTH,
    MAX_DETAIL,
    MAX_PAYLOAD,
    Ack,
    Hello,
    MessageError,
    MsgError,
    Status,
    Task,
    ack_detail,
    nesting_depth,
    parse,
)

GOOD_TASK = Task(3, "ab" * 32, 2, "cd" * 32, 0.05, 10, 8, 123.5).to_json()


@pytest.mark.parametrize("payload", [b"[" * 995, b'{"a":' * 800, b"[" * 4096, b'{"v":1,"x":' + b"[" * 990,
                                     b"[" * 500 + b"]" * 500])
def test_deep_nesting_is_too_deep_before_decoding(payload):
    # Prepare: under the 4096-byte limit, deep enough to exhaust the JSON decoder's recursion
    assert len(payload) <= MAX_PAYLOAD
    # Execute
    with pytest.raises(MessageError) as e:
        parse(payload)
    # Assert
    assert e.value.code == MsgError.TOO_DEEP


def test_brackets_inside_strings_do_not_count():
    # Prepare: a valid hello whose firmware string is all brackets
    hello = Hello("d01", "host", 1, 1, (), "[" * 30 + "{" * 30 + '\\"')
    # Execute
    got = parse(hello.to_json())
    # Assert
    assert got == hello and nesting_depth(hello.to_json()) == 2


def test_odd_types_and_huge_numbers_are_message_errors():
    # Prepare
    huge = b"9" * 3000
    cases = {
        b'{"v":1,"type":[]}': MsgError.UNKNOWN_TYPE,
        b'{"v":1,"type":{"a":1}}': MsgError.UNKNOWN_TYPE,
        b'{"v":[1],"type":"task"}': MsgError.BAD_VERSION,
        GOOD_TASK.replace(b'"lr":0.05', b'"lr":' + huge): MsgError.BAD_VALUE,
        GOOD_TASK.replace(b'"deadline":123.5', b'"deadline":1e999'): MsgError.BAD_VALUE,
        GOOD_TASK.replace(b'"round_id":3', b'"round_id":' + huge): MsgError.BAD_VALUE,
        GOOD_TASK.replace(b'"round_id":3', b'"round_id":null'): MsgError.BAD_FIELD_TYPE,
        b"\xff\xfe": MsgError.NOT_JSON,
        b"": MsgError.NOT_JSON,
    }
    for payload, code in cases.items():
        # Execute
        with pytest.raises(MessageError) as e:
            parse(payload)
        # Assert
        assert e.value.code == code, (payload[:40], e.value)


def test_ids_and_names_refuse_a_trailing_newline():
    # Prepare: re.match's "$" accepts a final "\n"; a device id is a topic level and must not
    payloads = [GOOD_TASK.replace(b'"plan_hash":"ab', b'"plan_hash":"ab\\n'),
                Status("d01", "online", 1, 1).to_json().replace(b'"d01"', b'"d01\\n"')]
    for p in payloads:
        # Execute / Assert
        with pytest.raises(MessageError) as e:
            parse(p)
        assert e.value.code == MsgError.BAD_VALUE


def _random_json(rng: random.Random, depth: int):
    kind = rng.randrange(9 if depth < 12 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 2**32, 2**64, 10**300, 1.5, -0.0, 1e308])
    if kind == 2:
        return "".join(rng.choice("ab[]{}\"\\\n\u00e9\U0001f600") for _ in range(rng.randrange(6)))
    if kind in (3, 4, 5):
        return rng.choice(["hello", "status", "task", "ack", "online", "failed", "ab" * 32, 1, 3])
    if kind in (6, 7):
        keys = ["v", "type", "device_id", "state", "round_id", "reason", "detail", "lr", "plan_hash", "x"]
        return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def _near_valid(rng: random.Random, payload: bytes) -> dict:
    """A valid message with one or two fields replaced by random JSON (or dropped, or one added)."""
    obj = json.loads(payload)
    for _ in range(rng.randrange(1, 3)):
        key = rng.choice([*obj, "round_id", "reason", "detail", "x"])
        if rng.random() < 0.2:
            obj.pop(key, None)
        else:
            obj[key] = _random_json(rng, 0)
    return obj


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(4)
        at = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(at, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[at:at] = rng.choice([b"[" * rng.randrange(1, 2000), b"{\"a\":" * rng.randrange(1, 500), b'"', b"\\",
                                   b"9" * rng.randrange(1, 400), b"NaN", b"\x00", b"}", b"]"])
        elif op == 2:
            del b[at:at + rng.randrange(1, 8)]
        else:
            del b[at:]
    return bytes(b)


def test_fuzz_parse_only_message_errors_escape():
    # Prepare: random JSON documents (some nested, some near-valid messages) and byte mutations of valid ones
    rng = random.Random(20261207)
    valid = [GOOD_TASK, Hello("d01", "host", 1, 2, ("ab" * 32,), "fw").to_json(),
             Status("d01", "failed", 1, 2, 3, "no_samples").to_json(), Status("d01", "offline", None, None).to_json(),
             Ack(3, "ab" * 32, False, "malformed", "size_overflow: x").to_json()]
    inputs = [json.dumps(_near_valid(rng, rng.choice(valid)) if rng.random() < 0.6 else _random_json(rng, 0)).encode()
              for _ in range(1500)]
    inputs += [_mutate(rng, rng.choice(valid)) for _ in range(1500)]
    parsed = refused = 0
    start = time.monotonic()
    for data in inputs:
        # Execute
        try:
            msg = parse(data)
        except MessageError as e:
            refused += 1
            assert isinstance(e.code, MsgError)
            continue
        # Assert: what is accepted writes back to something that parses to the same message
        parsed += 1
        assert parse(msg.to_json()) == msg
    assert refused > 2000 and time.monotonic() - start < 20


def test_failed_status_round_trip_and_rules():
    # Prepare
    failed = Status("d01", "failed", 2, 0, round_id=7, reason="no_samples")
    # Execute
    back = parse(failed.to_json(), Status)
    # Assert
    assert back == failed
    rules = {  # (fields) -> code
        b'"state":"failed","model_version":1,"samples":0': MsgError.MISSING_FIELD,  # no round / reason
        b'"state":"failed","model_version":1,"samples":0,"round_id":7': MsgError.MISSING_FIELD,
        b'"state":"online","model_version":1,"samples":0,"round_id":7,"reason":"x"': MsgError.UNKNOWN_FIELD,
        b'"state":"failed","model_version":1,"samples":0,"round_id":0,"reason":"x"': MsgError.BAD_VALUE,
        b'"state":"failed","model_version":1,"samples":0,"round_id":7,"reason":"No Samples"': MsgError.BAD_VALUE,
        b'"state":"failed","model_version":1,"samples":0,"round_id":7,"reason":"' + b"x" * 33 + b'"':
            MsgError.BAD_VALUE,
        b'"state":"online"': MsgError.MISSING_FIELD,  # only an offline status may leave the version out
    }
    for body, code in rules.items():
        with pytest.raises(MessageError) as e:
            parse(b'{"v":1,"type":"status","device_id":"d01",' + body + b"}")
        assert e.value.code == code, body


def test_offline_status_may_leave_out_version_and_samples():
    # Prepare: the Last Will as the agent registers it
    will = Status("d01", "offline", None, None)
    # Execute
    payload = will.to_json()
    # Assert
    assert json.loads(payload) == {"v": 1, "type": "status", "device_id": "d01", "state": "offline"}
    assert parse(payload) == will


def test_ack_detail_is_optional_bounded_and_printable():
    # Prepare
    plain = Ack(3, "ab" * 32, True)
    told = Ack(3, "ab" * 32, False, "malformed", ack_detail("size_overflow: delta: record 0 … numel 2**31\n"))
    # Execute
    plain_json, told_json = plain.to_json(), told.to_json()
    # Assert
    assert b"detail" not in plain_json and parse(plain_json) == plain
    assert parse(told_json).detail == "size_overflow: delta: record 0 ? numel 2**31?"
    assert len(ack_detail("x" * 1000)) == MAX_DETAIL and ack_detail("x" * 1000).endswith("...")
    for bad in ("x" * (MAX_DETAIL + 1), "line\nbreak", "caf\u00e9"):
        with pytest.raises(MessageError) as e:
            parse(json.dumps({**json.loads(told_json), "detail": bad}).encode())
        assert e.value.code == MsgError.BAD_VALUE


def test_depth_limit_leaves_room_for_every_message():
    # Prepare / Execute / Assert: the deepest legal message (hello with its list) is well inside the limit
    assert nesting_depth(Hello("d", "b", 1, 1, ("ab",) * 16, "").to_json()) <= 2 < MAX_DEPTH


def test_depth_scan_is_linear_on_unterminated_escapes():
    # Prepare: 4 KB of quote/backslash pairs, then brackets to force the scan (a backtracking string pattern
    # would rescan to the end from every quote: ~80 ms per payload instead of well under 1 ms)
    payloads = [b'"\\' * 2040 + b"[" * 6, b'"' + b'\\"' * 1360 + b"[" * 6]
    # Execute
    start = time.monotonic()
    for _ in range(100):
        for p in payloads:
            with pytest.raises(MessageError):
                parse(p)
    elapsed = time.monotonic() - start
    # Assert: a bound ten times above what a linear scan needs even on a busy machine
    assert elapsed < 4.0, elapsed
