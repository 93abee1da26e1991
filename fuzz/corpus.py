"""Seed corpora for the fuzzers, from the golden vectors in tests/vectors (docs/formats.md "Robustness").

``python fuzz/corpus.py OUT_DIR`` writes ``OUT_DIR/<target>/`` for every Python (atheris) and C (libFuzzer)
target; the C frame target gets its two input modes (raw line stream, CRC-fixed raw frames). Test code only.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"

sys.path.insert(0, str(ROOT))
from device_agent.wire import frames as F


def vector_files(*suffixes: str) -> list[Path]:
    """Every golden and bad vector with one of ``suffixes`` (current, v1 and their bad/ folders)."""
    return sorted(p for p in VECTORS.rglob("*") if p.is_file() and p.suffix in suffixes)


def encoded_frames() -> list[bytes]:
    """The frames of uart_frames.bin, COBS-encoded, without their 0x00 delimiters."""
    return [f for f in (VECTORS / "uart_frames.bin").read_bytes().split(b"\0") if f]


def message_seeds() -> list[bytes]:
    """One valid control message of each type, and a few JSON shapes (nesting included) the parser must refuse."""
    from device_agent.wire import messages as M

    h = "ab" * 32
    good = [M.Hello("d01", "stm32f746", 320_000, 1_000_000, (h,), "fw 1.0").to_json(),
            M.Status("d01", "online", 3, 12).to_json(),
            M.Task(7, h, 3, h, 0.01, 20, 1, 1.5e9, 100).to_json(),
            M.Ack(7, h, False, "stale").to_json()]
    odd = [b"{}", b"[]", b'{"v":1,"type":"hello","x":[[[[{"a":[[]]}]]]]}', b'{"v":1,"v":1}', b"NaN", b'"\\ud800"']
    return good + odd


def cmd_seeds() -> list[bytes]:
    """fuzz_cmds.c op lists (op byte + arguments; see that file): the good plan re-sent whole (LOAD_PLAN start +
    continue, op bit 32), a sample pushed then trained on, records stored then TRAIN_LIST, a delta read."""
    reload = bytes([1 | 32, 8, 0]) + struct.pack("<H", 504) + bytes([2 | 32, 8])
    sample = bytes([3, 8, 0, 1]) + struct.pack("<H", 500) + bytes(range(256)) * 2 + bytes([5, 2])
    stored = bytes([4, 1]) + struct.pack("<H", 500) + bytes(500) + bytes([5 | 16, 2, 0, 1, 6, 0, 0, 255, 1, 0, 0])
    return [reload, sample, stored, reload + sample + bytes([6, 0, 0, 0, 2, 0, 0])]


def seeds() -> dict[str, list[bytes]]:
    plans = [p.read_bytes() for p in vector_files(".ttp")]
    updates = [p.read_bytes() for p in vector_files(".tfu")]
    deltas = [p.read_bytes() for p in vector_files(".tfd", ".records")]
    stream = (VECTORS / "uart_frames.bin").read_bytes()
    frames = encoded_frames()
    structured = b"\x01"  # fuzz_frame.c mode 1: len u16 | raw frame without its CRC, repeated
    for enc in frames:
        try:
            raw = F.cobs_decode(enc)[:-2]
        except ValueError:
            continue
        structured += struct.pack("<H", len(raw)) + raw
    return {
        "plan": plans, "update": updates, "delta": deltas, "frames": frames + [stream],
        "envelope": plans[:4] + updates + deltas, "messages": message_seeds(),
        "c_plan": plans, "c_update": updates, "c_frame": [b"\0" + stream, structured], "c_cmds": cmd_seeds(),
    }


def write(out: Path) -> dict[str, Path]:
    """Write every target's seeds under ``out``; returns target -> directory."""
    dirs = {}
    for target, blobs in seeds().items():
        d = out / target
        d.mkdir(parents=True, exist_ok=True)
        for b in blobs:
            (d / hashlib.sha1(b).hexdigest()).write_bytes(b)
        dirs[target] = d
    return dirs


if __name__ == "__main__":
    for name, d in write(Path(sys.argv[1])).items():
        print(f"{name}: {len(list(d.iterdir()))} seeds in {d}")
