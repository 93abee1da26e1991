"""What the training recipe costs on the emulated board: instructions per sample with and without it.

``python firmware/tools/recipe_cost.py [--model mbv2-w0.35] [--rung 49kb] [--board an500]`` builds the firmware
(as benchmarks/firmware_paper.py does), compiles the model with the rung's scheme and with the classifier-only
scheme ``last``, each without and with a recipe, loads each plan on a QEMU board with ``-icount shift=0`` and times
one TRAIN of one sample at a time (SysTick ticks x 40 = instructions, exact): two samples for the default step,
B + 1 for a recipe (B - 1 accumulating samples, the applying one, one more). Prints one line per case and the
JSON last; every case is checked bit-exact against the Python Trainer. The rung gets 8-bit residuals only (B = 1,
no momentum: the full recipe's 4 B per trained weight does not fit a 320 KB board there); ``last`` gets B = 4,
momentum 0.9, 16-bit residuals and warm-up 2 + cosine to 50. A developer tool; docs/engine.md quotes its numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import MODELS
from benchmarks.firmware_paper import INSNS_PER_TICK, LR, build_firmware
from device_agent.board import BoardClient, QemuBoard
from device_agent.engine.recipe import Recipe
from device_agent.engine.trainer import Trainer
from device_agent.engine.update import lr_mant_exp
from fleet.compiler.compile import compile_full
from fleet.compiler.mit_import import import_mit
from fleet.compiler.quantize import new_classifier
from fleet.compiler.scheme import PAPER_SCHEMES, load_schemes, named_scheme


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mbv2-w0.35")
    ap.add_argument("--rung", default="49kb")
    ap.add_argument("--board", choices=("an500", "an386"), default="an500")
    args = ap.parse_args()
    graph = new_classifier(import_mit(MODELS / f"{args.model}.pkl"), 10)
    rung, last = load_schemes(PAPER_SCHEMES)[args.model][args.rung], named_scheme(graph, "last")
    full = Recipe(accum_steps=4, momentum=0.9, frac_bits=16, warmup=2, total=50)
    cases = {f"{args.rung}/default": (rung, None), f"{args.rung}/F8_only": (rung, Recipe(frac_bits=8)),
             "last/default": (last, None), "last/B4_mom0.9_F16_cos": (last, full)}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        elf, _, _ = build_firmware(Path(tmp), args.board)
        for name, (scheme, recipe) in cases.items():
            comp = compile_full(graph, scheme, recipe=recipe)
            tin = comp.plan.tensors[comp.plan.input_id]
            x = np.random.default_rng(0).integers(-100, 100, (1, *tin.shape)).astype(np.int8)
            lr_m, lr_e = lr_mant_exp(LR)
            n = recipe.accum_steps + 1 if recipe else 2
            insns = []
            with QemuBoard(f"mps2-{args.board}", elf=elf, icount=True) as board, \
                    BoardClient(board.endpoint, timeout=900) as c:
                c.load_plan(comp.blob)
                c.push_sample(x.tobytes(), 3)
                for _ in range(n):
                    c.train(1, lr_m, lr_e)
                    insns.append(c.state()["train_ticks"] * INSNS_PER_TICK)
                state = c.state()
            ref = Trainer(comp.plan)
            for _ in range(n):
                ref.train_step(x, np.array([3], np.int32), LR)
            out[name] = {"instructions_per_sample": insns, "optimizer_bytes": comp.report.optimizer_bytes,
                         "trainable_bytes": comp.report.trainable_bytes, "arena_bytes": comp.report.arena_bytes,
                         "bit_exact": bytes(state["state_hash"]).hex() == ref.state_hash()}
            print(name, out[name], flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
