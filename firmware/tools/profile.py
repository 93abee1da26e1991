"""Where a training step's instructions go on the emulated board: per function and per source line.

``python firmware/tools/profile.py [--model mbv2-w0.35] [--board an500] [--top 40] [--patched]`` builds the firmware and the
QEMU counting plugin (qemu_pcprof.c, host gcc), compiles the model's ~100 KB paper-scheme plan (first stage whole; ``--patched``: tiled), and runs the board
twice under the plugin: load + one TRAIN step, and load + three. The difference over two is one step, exactly (the
emulation is deterministic), so loading and the UART are not in it. Addresses map to functions and lines with
arm-none-eabi-addr2line (inlined code counts where it was inlined to: the line is the innermost one). A developer
tool, not a benchmark: instruction totals for the README come from benchmarks/firmware_paper.py.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import MODELS
from benchmarks.firmware_paper import LR, RUNGS, build_firmware
from device_agent.board import BoardClient, QemuBoard
from device_agent.engine.qmath import mant_exp
from fleet.compiler.compile import compile_full
from fleet.compiler.mit_import import import_mit
from fleet.compiler.quantize import new_classifier
from fleet.compiler.scheme import PAPER_SCHEMES, load_schemes


@dataclasses.dataclass
class ProfiledBoard(QemuBoard):
    plugin: str = ""
    out: str = ""

    def command(self, port: int) -> list[str]:
        return super().command(port) + ["-plugin", f"{self.plugin},out={self.out}"]


def counts(board: str, elf: Path, plugin: Path, blob: bytes, x: np.ndarray, steps: int, out: Path) -> dict[int, int]:
    b = ProfiledBoard(f"mps2-{board}", elf=elf, plugin=str(plugin), out=str(out))
    with b, BoardClient(b.endpoint, timeout=300) as c:
        c.load_plan(blob)
        c.push_sample(x.tobytes(), 3)
        lr_m, lr_e = mant_exp(LR)
        for _ in range(steps):
            c.train(1, lr_m, lr_e)
    # NOTE: QEMU writes the file from its exit handler; stop() has waited for the process
    return {int(a, 16): int(n) for a, n in (line.split() for line in out.read_text().splitlines())}


def symbol_table(elf: Path) -> list[tuple[int, str]]:
    """(start address, name) of every function in the ELF, sorted (Thumb bit cleared)."""
    out = subprocess.run(["arm-none-eabi-nm", "-n", str(elf)], capture_output=True, text=True, check=True).stdout
    return sorted((int(a, 16) & ~1, name) for a, kind, name in (line.split()[:3] for line in out.splitlines()
                                                                   if len(line.split()) == 3) if kind in "tTW")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mbv2-w0.35", choices=sorted(RUNGS))
    ap.add_argument("--board", default="an500", choices=("an500", "an386"))
    ap.add_argument("--top", type=int, default=40, help="lines to list")
    ap.add_argument("--patched", action="store_true",
                    help="profile the plan with a patched first stage (default: whole, the README's MbV2 figure)")
    ap.add_argument("--function", action="append", default=[],
                    help="also list the lines inside this compiled function (repeatable)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp)
        elf, _, _ = build_firmware(build, args.board)
        plugin = build / "qemu_pcprof.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(plugin), str(Path(__file__).parent / "qemu_pcprof.c")],
                       check=True)
        graph = new_classifier(import_mit(MODELS / f"{args.model}.pkl"), 10)
        plan = compile_full(graph, load_schemes(PAPER_SCHEMES)[args.model][RUNGS[args.model][0]], patch=args.patched)
        tin = plan.plan.tensors[plan.plan.input_id]
        x = np.random.default_rng(0).integers(-100, 100, (1, *tin.shape)).astype(np.int8)
        one = counts(args.board, elf, plugin, plan.blob, x, 1, build / "one.txt")
        three = counts(args.board, elf, plugin, plan.blob, x, 3, build / "three.txt")
        step = {a: (three.get(a, 0) - one.get(a, 0)) // 2 for a in set(one) | set(three)}
        step = {a: n for a, n in step.items() if n > 0}
        addrs = sorted(step)
        names = subprocess.run(["arm-none-eabi-addr2line", "-f", "-e", str(elf)] + [hex(a) for a in addrs],
                               capture_output=True, text=True, check=True).stdout.splitlines()
        symbols = symbol_table(elf)
    by_sym, by_fn, by_line = collections.Counter(), collections.Counter(), collections.Counter()
    in_sym: dict[str, collections.Counter] = {f: collections.Counter() for f in args.function}
    for i, a in enumerate(addrs):
        k = bisect.bisect_right(symbols, (a, chr(0x10FFFF))) - 1
        by_sym[symbols[k][1] if k >= 0 else "?"] += step[a]
        by_fn[names[2 * i]] += step[a]
        line = names[2 * i + 1].rsplit("/", 1)[-1].split(" ")[0]
        by_line[line] += step[a]
        sym = symbols[k][1].split(".")[0] if k >= 0 else "?"
        if sym in in_sym:
            in_sym[sym][line] += step[a]
    total = sum(step.values())
    print(f"{args.model} on mps2-{args.board}: {total / 1e6:.2f} M instructions per training step")
    for title, table, n in (("function (compiled)", by_sym, 25), ("function (innermost inlined)", by_fn, 25),
                            ("line (innermost inlined)", by_line, args.top),
                            *((f"line inside {f}", in_sym[f], args.top) for f in args.function)):
        print(f"\n{'M insns':>8}  {'%':>5}  {title}")
        for k, v in table.most_common(n):
            print(f"{v / 1e6:8.2f}  {100 * v / total:5.1f}  {k}")


if __name__ == "__main__":
    main()
