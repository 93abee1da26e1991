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


def runtime_plans() -> list[bytes]:
    """The plans of the runtime's test vectors (firmware/tests/vectors/plans/*.tfv: "TFTV" header, u32 plan_len at
    byte 28, the plan blob from byte 32): every op type the compiler emits but PWDW (PATCH, EMBEDDING, ADD,
    SAVE_CHANNELS, GRAD_ACCUM, RESHAPE...), so fuzz_plan reaches each op's prepare checks from a seed."""
    out = []
    for p in sorted((ROOT / "firmware" / "tests" / "vectors" / "plans").glob("*.tfv")):
        d = p.read_bytes()
        (n,) = struct.unpack_from("<I", d, 28)
        out.append(d[32:32 + n])
    return out


def hostile_plans() -> list[bytes]:
    """Plans the runtime's prepare step must refuse without arithmetic overflow (regressions of fuzz_plan
    findings, run first by every fuzz_plan campaign): each edits one runtime test plan (unsigned, valid to the
    reader) so that an int32 product or sum of plan-supplied values would pass 2^31 before a check refuses it."""
    import numpy as np

    from device_agent.engine import ir
    from device_agent.wire import Verifier
    from device_agent.wire.plan import plan_from_bytes, plan_to_bytes

    plans = {p.stem: p for p in (ROOT / "firmware" / "tests" / "vectors" / "plans").glob("*.tfv")}

    def load(stem: str) -> ir.Plan:
        d = plans[stem].read_bytes()
        (n,) = struct.unpack_from("<I", d, 28)
        return plan_from_bytes(d[32:32 + n], verify=Verifier.skip())

    def patched(attr: str, layer: int, value: int) -> bytes:
        plan = load("patch")
        op = next(o for o in plan.ops if o.type == ir.OpType.PATCH)
        a = np.array(op.attrs[attr], np.int64)
        a[layer] = value
        op.attrs[attr] = a.astype(np.int32)
        return plan_to_bytes(plan)

    out = [patched("pad_h", 0, 2**30),  # tf_patch_check: src.h + 2 * pad_h
           patched("buf_off", 0, 2**31 - 64)]  # tf_patch_get_buffer_size: buf_off + a tile's bytes
    text = load("text")  # CONV2D_UPDATE fc.w (3, 8, 1, 1): C_in x groups = 8 x 2^30
    next(o for o in text.ops if o.type == ir.OpType.CONV2D_UPDATE).attrs["groups"] = 2**30
    out.append(plan_to_bytes(text))
    # EMBEDDING: table (1, 2^18) x ids (2^14 + 1,) wraps int32 to 2^18 = the numel given to y (all in the arena,
    # overlapping: 256 KiB + 4 B, a pool an MCU has)
    text = load("text")
    ids, tab, y = text.tensors[0], text.tensors[2], text.tensors[3]
    ids.shape, ids.offset = (2**14 + 1,), 0
    tab.kind, tab.shape, tab.data, tab.offset = ir.Kind.ACTIVATION, (1, 2**18), None, 0
    y.shape, y.offset = (2**18, 1, 1), 0
    text.arena_bytes = 2**18 + 4
    out.append(plan_to_bytes(text))
    text = load("text")  # EMBEDDING's ids (int32, arena 48..72) moved inside its output y (arena 0..48)
    text.tensors[0].offset = 16
    out.append(plan_to_bytes(text))
    # training steps (fuzz_plan steps small plans): a recipe bias exponent of 4000 (inside EXP_LIMIT) shifts the
    # recipe's per-sample delta left by ~4000 bits (UB; now TF_ERR_OVERFLOW / ValueError before it)
    rec = load("tiny_recipe8")
    upd = next(o for o in rec.ops if o.type == ir.OpType.CONV2D_UPDATE)
    upd.attrs["qas_b_e"] = np.full_like(np.asarray(upd.attrs["qas_b_e"]), 4000)
    out.append(plan_to_bytes(rec))
    return out


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
    # a whole record stored in slot 0 (tiny.tfv: 192 input bytes), then TRAIN_LIST on it at lr_e = 2^31 - 1 and
    # -2^31 (op bit 64: lr_e from the input; regressions: lr_e + qas_e + 15 wrapped in the update kernels)
    record = bytes([4, 0, 0]) + struct.pack("<H", 4 + 192) + bytes(4 + 192)
    lr_edges = [record + bytes([5 | 16 | 64]) + struct.pack("<i", e) + bytes([1, 0]) for e in (2**31 - 1, -2**31)]
    return [reload, sample, stored, reload + sample + bytes([6, 0, 0, 0, 2, 0, 0])] + lr_edges


def seeds() -> dict[str, list[bytes]]:
    plans = [p.read_bytes() for p in vector_files(".ttp")] + runtime_plans() + hostile_plans()
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
