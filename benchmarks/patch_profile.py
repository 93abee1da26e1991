"""Where a training step's instructions go, per op type, for a paper model's plan with the frozen first stage run
whole and tile by tile (PATCH): the diagnosis behind PATCH's instruction price.

One command: ``python benchmarks/patch_profile.py [--model mbv2-w0.35] [--rung 99kb] [--slack BYTES]``.

It builds a profiling firmware for QEMU mps2-an500 (``ARM_EXTRA=-DTF_BENCH -DTF_PROFILE``: the runtime records
each op's SysTick ticks of the last TRAIN step, read back 8 ops per test command 0x7E), loads each plan, trains 2
steps on one random sample (-icount shift=0: 40 instructions per tick) and sums the last step's instructions per
op type. The profiling build is the production code plus one tick read per op. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import MODELS, ROOT, emit
from device_agent.board import BoardClient, QemuBoard
from device_agent.engine import ir
from device_agent.engine.qmath import mant_exp
from fleet.compiler.compile import compile_full
from fleet.compiler.mit_import import import_mit
from fleet.compiler.quantize import new_classifier
from fleet.compiler.scheme import PAPER_SCHEMES, load_schemes

INSNS_PER_TICK = 40  # 25 MHz SysTick under -icount shift=0 (1 instruction = 1 ns)
MAX_OPS = 1024  # TF_MAX_OPS upper bound read back (the reply wraps; only the plan's ops are used)


def build(tmp: Path) -> Path:
    r = subprocess.run(["make", "-s", "-j2", "-C", str(ROOT / "firmware"), f"BUILD={tmp}", "qemu-an500", "SELFTEST=0",
                        "ARM_EXTRA=-DTF_BENCH -DTF_PROFILE"], check=False, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stdout + r.stderr)
    return tmp / "an500" / "tinyfleet.elf"


def profile(elf: Path, plan: ir.Plan, blob: bytes) -> dict[str, int]:
    """Instructions of the last of 2 training steps, summed per op type."""
    from device_agent.wire.frames import Status

    tin = plan.tensors[plan.input_id]
    x = np.random.default_rng(0).integers(-100, 100, (1, *tin.shape)).astype(np.int8)
    lr_m, lr_e = mant_exp(0.02)
    ticks: list[int] = []
    with QemuBoard("mps2-an500", elf=elf, icount=True) as board, BoardClient(board.endpoint, timeout=1800) as c:
        c.load_plan(blob)
        c.push_sample(x.tobytes(), 3)
        for _ in range(2):
            c.train(1, lr_m, lr_e)
        while len(ticks) < len(plan.ops):
            f = c.request(0x7E)
            if f.code != Status.OK:
                raise RuntimeError(f"profiling command refused ({f.code}): is the firmware a TF_PROFILE build?")
            ticks += list(struct.unpack(f"<{len(f.payload) // 8}Q", f.payload))
    out: dict[str, int] = {}
    for op, t in zip(plan.ops, ticks):
        out[op.type.name] = out.get(op.type.name, 0) + t * INSNS_PER_TICK
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mbv2-w0.35")
    ap.add_argument("--rung", default="99kb")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--slack", type=int, default=0,
                    help="an experiment: bytes added at the top of the patched plan's arena (free at every op), so "
                         "the kernels that look for a free arena gap (CONV2D_BWD_INPUT one pass, PWDW 4 channels) "
                         "find one; the numbers do not change, only the memory")
    args = ap.parse_args()
    graph = new_classifier(import_mit(MODELS / f"{args.model}.pkl"), args.classes)
    scheme = load_schemes(PAPER_SCHEMES)[args.model][args.rung]
    result: dict = {"model": args.model, "rung": args.rung}
    with tempfile.TemporaryDirectory() as tmp:
        elf = build(Path(tmp))
        for name, patch in (("whole", False), ("patched", True)):
            comp = compile_full(graph, scheme, patch=patch)
            blob = comp.blob
            if patch and args.slack:
                from device_agent.wire.plan import plan_to_bytes

                comp.plan.arena_bytes += args.slack - args.slack % 16
                blob = plan_to_bytes(comp.plan)
                result["patched_arena_bytes"] = comp.plan.arena_bytes
            result[name] = profile(elf, comp.plan, blob)
    kinds = sorted(set(result["whole"]) | set(result["patched"]),
                   key=lambda k: -max(result["whole"].get(k, 0), result["patched"].get(k, 0)))
    rows = [(k, f"{result['whole'].get(k, 0) / 1e6:.2f}", f"{result['patched'].get(k, 0) / 1e6:.2f}",
             f"{(result['patched'].get(k, 0) - result['whole'].get(k, 0)) / 1e6:+.2f}") for k in kinds]
    for name in ("whole", "patched"):
        result[f"{name}_total"] = sum(result[name].values())
    rows.append(("total", f"{result['whole_total'] / 1e6:.2f}", f"{result['patched_total'] / 1e6:.2f}",
                 f"{(result['patched_total'] - result['whole_total']) / 1e6:+.2f}"))
    emit(result, rows, ("op type", "whole M insns", "patched M insns", "difference"))


if __name__ == "__main__":
    main()
