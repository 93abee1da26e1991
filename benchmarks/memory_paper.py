"""Training memory of the paper's three models at 128x128 versus its measured peaks (141 / 135 / 173 KB).

One command: ``python benchmarks/memory_paper.py [--classes K] [--no-patch] [--no-fuse]``. Per model and variant
(full / last / sparse = the ~100 KB rung of schemes.yaml, plus every other rung) it compiles the plan, plans the
arena and prints the arena in the paper's accounting (KB = 1000 B), the trainable bytes, the total, what is live
at the peak, and the PATCH ops the compiler chose (segment, tiles, MACs with halos vs without). ``--no-patch``
(and ``--no-fuse``) compile as before those executions existed, so the old numbers stay reproducible. The last
line is one JSON object in bytes. Models absent from ../shared/models are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import MODELS, emit
from device_agent.engine import ir
from device_agent.engine import patch as patch_geom
from fleet.compiler.compile import compile_full
from fleet.compiler.memory import live_at
from fleet.compiler.mit_import import import_mit
from fleet.compiler.quantize import new_classifier
from fleet.compiler.scheme import PAPER_SCHEMES, load_schemes, variant

PAPER = {"mbv2-w0.35": 141000, "proxyless-w0.3": 135000, "mcunet-5fps": 173000}
SPARSE_RUNG = {"mbv2-w0.35": "99kb", "proxyless-w0.3": "98kb", "mcunet-5fps": "99kb"}


def _backward_peak(c) -> tuple[int, str]:
    """Largest live bytes at an op after the loss (what the sparse backward itself needs)."""
    live = c.layout.live_bytes(len(c.plan.ops))
    start = next(i for i, op in enumerate(c.plan.ops) if op.type == ir.OpType.SOFTMAX_CE)
    i = max(range(start, len(live)), key=live.__getitem__)
    return live[i], c.plan.ops[i].name


def _patches(plan: ir.Plan) -> list[dict]:
    """Each PATCH op of ``plan``: its name, tile grid, scratch, and MACs with halos vs the unpatched layers."""
    tensors = {t.id: t for t in plan.tensors}
    out = []
    for op in plan.ops:
        if op.type != ir.OpType.PATCH:
            continue
        layers = patch_geom.layers_of(op, tensors)
        th, tw = int(op.attrs["tiles_h"]), int(op.attrs["tiles_w"])
        out.append({"ops": op.name, "tiles": f"{th}x{tw}", "scratch": patch_geom.scratch_bytes(layers, th, tw),
                    "macs": patch_geom.macs(layers, th, tw), "macs_unpatched": patch_geom.macs(layers, 1, 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classes", type=int, default=10, help="fresh classifier head (the paper fine-tunes one)")
    ap.add_argument("--no-patch", action="store_true", help="no PATCH op: the frozen first stage runs whole")
    ap.add_argument("--no-fuse", action="store_true", help="no PWDW fusion of frozen expansion + depthwise")
    args = ap.parse_args()
    ladders = load_schemes(PAPER_SCHEMES) if PAPER_SCHEMES.exists() else {}
    rows, result = [], {}
    for model, anchor in PAPER.items():
        path = MODELS / f"{model}.pkl"
        if not path.exists():
            print(f"skip {model}: {path} absent", file=sys.stderr)
            continue
        graph = new_classifier(import_mit(path), args.classes)
        rungs = ladders.get(model, {})
        schemes = {"full": variant(graph, "full"), "last": variant(graph, "last")}
        if f"{model}:{SPARSE_RUNG[model]}" in {s.name for s in rungs.values()}:
            schemes["sparse"] = rungs[SPARSE_RUNG[model]]
        schemes.update({f"rung_{r}": s for r, s in rungs.items() if r != SPARSE_RUNG[model]})
        out: dict[str, int | str] = {"paper_arena": anchor}
        for name, s in schemes.items():
            c = compile_full(graph, s, serialize=False, patch=not args.no_patch, fuse=not args.no_fuse)
            r = c.report
            peak_i = [op.name for op in c.plan.ops].index(r.peak_op)
            drivers = ", ".join(f"{n} {b / 1000:.1f}" for n, b in live_at(c.plan, c.layout, peak_i)[:2])
            bwd, bwd_op = _backward_peak(c)
            out[name] = r.arena_bytes
            out[f"{name}_total"] = r.peak_sram_bytes
            out[f"{name}_trainable"] = r.trainable_bytes
            out[f"{name}_backward_peak"] = bwd
            patches = _patches(c.plan)
            if name == "sparse":
                out["sparse_patches"] = patches
            rows.append((model, name, f"{r.arena_bytes / 1000:.1f}", f"{anchor / 1000:.0f}",
                         f"{r.trainable_bytes / 1000:.1f}", f"{r.peak_sram_bytes / 1000:.1f}",
                         f"{bwd / 1000:.1f} @{bwd_op}", f"{r.peak_op}: {drivers}",
                         "; ".join(f"{p['ops']} {p['tiles']} {p['macs'] / 1e6:.2f}/{p['macs_unpatched'] / 1e6:.2f}M"
                                   for p in patches) or "-"))
        result[model] = out
    emit(result, rows, ("model", "variant", "arena KB", "paper KB", "trainable KB", "total KB",
                        "backward peak KB", "peak op: largest live buffers (KB)",
                        "PATCH ops: tiles, MACs with/without halos"))


if __name__ == "__main__":
    main()
