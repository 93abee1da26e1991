"""Whole-plan golden vectors for the firmware: plan blob + samples + labels -> the reference Trainer's result.

One ``.tfv`` file per plan (a test-only container, read by firmware/tests/test_plans_host.c and by
tests/firmware/test_plan_boards.py)::

    "TFTV" u32 version=2 | u32 steps | i32 lr_m | i32 lr_e | u32 n_samples | u32 sample_bytes
    u32 plan_len | plan blob, pad4 | samples (n_samples x sample_bytes), pad4 | i32 labels[n_samples]
    u8[32] state sha256 (Trainer.state_hash) | u32 state_len | trainable tensors in id order (LE), pad4
    u32 n_classes | i8 logits of the last step's forward pass, pad4 | u8 correct per step, pad4
    u32 opt_len | the recipe's optimizer region (recipe.optimizer_region), pad4 | u32 samples pending

Step ``s`` trains on sample ``s % n_samples`` (N = 1, the device's step). Plans: ``tiny`` (examples.tiny_plan),
``text`` (examples.tiny_text_plan: EMBEDDING), ``imu`` (fleet.compiler.models.ImuCNN compiled with a sparse
scheme), ``mbv2`` (MbV2-w0.35 at 128x128, paper rung 99kb; skipped when ../shared/models is absent), and plans
carrying a training recipe (plan v2 RECIPE section; ``lr_m, lr_e`` stay ``mant_exp(lr)``: the device divides by
``accum_steps`` itself, ``recipe.per_sample_lr``): ``tiny_recipe8`` (B = 3, momentum 0.9, 8-bit residuals, warm-up 1 + cosine to 4 updates with a
floor), ``imu_recipe16`` (B = 2, momentum 0.5, 16-bit residuals, warm-up 2 + cosine to 5), ``tiny_recipe_sr``
(B = 2, no momentum, stochastic rounding at the boundary, cosine to 0 at 3 updates: the last samples add nothing),
``imu_recipe_b1`` (B = 1, no momentum: transient v, 8-bit residuals, warm-up 3 + cosine to 12 over 12 updates),
``tiny_recipe_mom_sr`` (B = 1, momentum 0.8, stochastic rounding, no schedule); ``patch`` (plan v3 PATCH ops:
fleet.compiler.models.TinyCNN on odd 3x29x27 inputs, its frozen stem + inverted-residual block (fused expansion,
a residual add inside the stage) as one PATCH op of 3x2 uneven tiles and the strided depthwise-separable pair as a
second one of 2x3 tiles, the classifier training).

    python tests/firmware/gen_plan_vectors.py [--out DIR] [--plans tiny,text,imu] [--mbv2]
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from device_agent.engine import ir
from device_agent.engine.recipe import Recipe, optimizer_region, with_recipe
from device_agent.engine.trainer import Trainer
from device_agent.engine.update import lr_mant_exp
from device_agent.wire.plan import plan_to_bytes
from fleet.compiler.mit_import import default_models_dir

OUT = ROOT / "firmware" / "tests" / "vectors" / "plans"
MODELS = default_models_dir()
SMALL = ("tiny", "text", "imu", "tiny_recipe8", "imu_recipe16", "tiny_recipe_sr", "imu_recipe_b1", "tiny_recipe_mom_sr",
         "patch")


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def state_bytes(tr: Trainer) -> bytes:
    """The trainable tensors in id order as little-endian bytes (what Trainer.state_hash hashes)."""
    return b"".join(np.ascontiguousarray(v, v.dtype.newbyteorder("<")).tobytes()
                    for _, v in sorted(tr.params.items()))


def run_reference(plan: ir.Plan, x: np.ndarray, y: np.ndarray, steps: int, lr: float):
    """Train ``steps`` N=1 steps (sample s % n); returns (trainer, last logits int8 (K,), correct per step)."""
    tr = Trainer(plan)
    correct, logits = [], None
    for s in range(steps):
        i = s % len(x)
        tr_ = tr.trace_step(x[i:i + 1], y[i:i + 1], lr)
        correct.append(tr_.stats.correct)
        logits = tr_.values[plan.logits_id].reshape(-1).astype(np.int8)
    return tr, logits, correct


def write_vector(path: Path, plan: ir.Plan, x: np.ndarray, y: np.ndarray, steps: int, lr: float) -> dict:
    blob = plan_to_bytes(plan)
    tr, logits, correct = run_reference(plan, x, y, steps, lr)
    lr_m, lr_e = lr_mant_exp(lr)  # NOTE: with a recipe too: the device divides by accum_steps itself
    tin = plan.tensors[plan.input_id]
    dt = "<i4" if tin.dtype == ir.DType.INT32 else "<i1"
    samples = np.ascontiguousarray(x.astype(dt)).tobytes()
    sb = len(samples) // len(x)
    st = state_bytes(tr)
    out = struct.pack("<4sIIiiII", b"TFTV", 2, steps, lr_m, lr_e, len(x), sb) + struct.pack("<I", len(blob))
    out += _pad4(blob) + _pad4(samples) + np.asarray(y, "<i4").tobytes()
    out += bytes.fromhex(tr.state_hash()) + struct.pack("<I", len(st)) + _pad4(st)
    out += struct.pack("<I", logits.size) + _pad4(logits.tobytes()) + _pad4(bytes(correct))
    region = optimizer_region(plan, tr.opt_state)
    out += struct.pack("<I", len(region)) + _pad4(region) + struct.pack("<I", tr.pending)
    path.write_bytes(out)
    return {"file": path.name, "plan_bytes": len(blob), "arena": plan.arena_bytes, "state_hash": tr.state_hash()}


def _planned(plan: ir.Plan) -> ir.Plan:
    from fleet.compiler.planner import plan_arena
    plan_arena(plan)
    return plan


def build(name: str):
    """(plan, x, y, steps, lr) of one named vector."""
    from tests.fixtures import tiny as ex
    if name == "tiny":
        x, y = ex.tiny_dataset(6, seed=3)
        return _planned(ex.tiny_plan(seed=1)), x, y, 9, 0.1
    if name == "text":
        x, y = ex.tiny_text_dataset(5, seed=2)
        return _planned(ex.tiny_text_plan(seed=1)), x, y, 7, 0.2
    if name == "imu":
        import torch

        from fleet.compiler.compile import compile_plan
        from fleet.compiler.models import ImuCNN
        from fleet.compiler.torch_import import import_torch
        torch.manual_seed(0)
        model = ImuCNN(in_channels=6, num_classes=7, width=16).eval()
        rng = np.random.default_rng(0)
        calib = rng.standard_normal((64, 6, 64)).astype(np.float32)
        graph = import_torch(model, calib, name="ImuCNN")
        scheme = ir.SparseScheme("imu-sparse", n_bias_update=2, weight_ratio={1: 0.5, 2: 0.25})
        plan, _ = compile_plan(graph, scheme)
        tin = plan.tensors[plan.input_id]
        x = rng.integers(-60, 60, (5, *tin.shape)).astype(np.int8)
        y = rng.integers(0, 7, 5).astype(np.int32)
        return plan, x, y, 6, 0.05
    if name == "tiny_recipe8":
        plan, x, y, _, _ = build("tiny")
        r = Recipe(accum_steps=3, momentum=0.9, frac_bits=8, warmup=1, total=4, lr_min_q15=2000)
        return with_recipe(plan, r), x, y, 11, 0.3
    if name == "imu_recipe16":
        plan, x, y, _, _ = build("imu")
        return with_recipe(plan, Recipe(accum_steps=2, momentum=0.5, frac_bits=16, warmup=2, total=5)), x, y, 9, 0.1
    if name == "tiny_recipe_sr":
        plan, x, y, _, _ = build("tiny")
        return with_recipe(plan, Recipe(accum_steps=2, frac_bits=0, total=3)), x, y, 9, 0.3
    if name == "imu_recipe_b1":
        plan, x, y, _, _ = build("imu")
        return with_recipe(plan, Recipe(frac_bits=8, warmup=3, total=12, lr_min_q15=500)), x, y, 12, 0.1
    if name == "tiny_recipe_mom_sr":
        plan, x, y, _, _ = build("tiny")
        return with_recipe(plan, Recipe(momentum=0.8)), x, y, 8, 0.1
    if name == "patch":
        return build_patch()
    if name == "mbv2":
        return build_mit("mbv2-w0.35", "99kb", steps=2)
    raise ValueError(f"unknown vector {name!r}, expected one of {SMALL + ('mbv2',)}")


def build_patch():
    """TinyCNN (3x29x27) with two PATCH ops forced at chosen tile grids (see the module docstring)."""
    import torch

    from fleet.compiler.models import TinyCNN
    from fleet.compiler.patching import Choice, apply
    from fleet.compiler.torch_import import import_torch
    from fleet.compiler.training import build_training_plan, compact
    torch.manual_seed(3)
    model = TinyCNN(in_channels=3, num_classes=5, width=8).eval()
    rng = np.random.default_rng(4)
    graph = import_torch(model, rng.standard_normal((32, 3, 29, 27)).astype(np.float32), name="TinyCNN")
    plan = build_training_plan(graph, ir.SparseScheme("head"))
    add = next(i for i, op in enumerate(plan.ops) if op.type == ir.OpType.ADD)
    apply(plan, [Choice(0, add, 3, 2, 0, 0, 0), Choice(add + 1, add + 2, 2, 3, 0, 0, 0)])
    plan = _planned(compact(plan))
    x = rng.integers(-128, 128, (3, *plan.tensors[plan.input_id].shape)).astype(np.int8)
    y = rng.integers(0, 5, 3).astype(np.int32)
    return plan, x, y, 5, 0.1


def build_mit(model: str, rung: str, steps: int = 2, classes: int = 10, n: int = 2):
    """A paper model at 128x128 with its schemes.yaml rung, random int8 samples (the numbers, not accuracy)."""
    from fleet.compiler.compile import compile_full
    from fleet.compiler.mit_import import import_mit
    from fleet.compiler.quantize import new_classifier
    from fleet.compiler.scheme import PAPER_SCHEMES, load_schemes
    path = MODELS / f"{model}.pkl"
    if not path.exists():
        raise FileNotFoundError(f"{path} absent")
    graph = new_classifier(import_mit(path), classes)
    plan = compile_full(graph, load_schemes(PAPER_SCHEMES)[model][rung], serialize=False).plan
    rng = np.random.default_rng(1)
    tin = plan.tensors[plan.input_id]
    x = rng.integers(-100, 100, (n, *tin.shape)).astype(np.int8)
    y = rng.integers(0, classes, n).astype(np.int32)
    return plan, x, y, steps, 0.02


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--plans", default=",".join(SMALL))
    ap.add_argument("--mbv2", action="store_true", help="also write mbv2.tfv (skipped if the model is absent)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.plans.split(",") if n] + (["mbv2"] if args.mbv2 else [])
    for name in names:
        try:
            plan, x, y, steps, lr = build(name)
        except FileNotFoundError as e:
            print(f"skip {name}: {e}")
            continue
        info = write_vector(args.out / f"{name}.tfv", plan, x, y, steps, lr)
        print(name, info)


if __name__ == "__main__":
    main()
