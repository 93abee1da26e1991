"""Training speed of the Python reference engine against a PyTorch fp32 step of the same model and scheme.

One command: ``python benchmarks/engine_speed.py [--quick] [--models imu,mbv2]``. For each model the int8
plan of the scheme runs ``Trainer.train_step`` at batch 1 (a device's step) and at a mini-batch, and the
native engine (``device_agent.native.NativeTrainer``: the firmware's C runtime built for the host by
``make native``, bit-exact with the reference) at batch 1 (``native_*``; skipped with a note if not built); PyTorch runs
the float twin of the same graph (``ablation.graph_to_torch``) with only the scheme's parameters trainable,
SGD, same batch sizes. Both single-threaded (BLAS and torch threads = 1) so the ratio compares code, not
cores. Models: ImuCNN (scheme ``ImuCNN:tail``), MbV2-w0.35 128x128 (scheme ``mbv2-w0.35:99kb``, whole plan,
no cached prefix). Last stdout line: one JSON object; top-level ``steps_per_s_ours`` / ``steps_per_s_torch``
are ImuCNN at batch 1.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # NOTE: before numpy/torch load their BLAS

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.ablation import engine_ready, graph_to_torch, torch_scheme_params
from benchmarks.common import MODELS, emit
from device_agent.engine import ir
from device_agent.engine.trainer import Trainer
from device_agent.native import NativeError, NativeTrainer
from fleet.compiler.compile import compile_plan


def rate(fn, min_steps: int, min_seconds: float) -> float:
    """Calls per second of ``fn`` after one warm-up call, over at least ``min_steps`` calls and ``min_seconds``."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def imu_graph() -> tuple[ir.Graph, ir.SparseScheme]:
    from fleet.compiler.models import ImuCNN
    from fleet.compiler.scheme import named_scheme
    from fleet.compiler.torch_import import import_torch

    torch.manual_seed(0)
    g = import_torch(ImuCNN().eval(), torch.randn(256, 6, 128), name="ImuCNN")
    return g, named_scheme(g, "ImuCNN:tail")


def mbv2_graph() -> tuple[ir.Graph, ir.SparseScheme]:
    from fleet.compiler.mit_import import import_mit
    from fleet.compiler.quantize import new_classifier
    from fleet.compiler.scheme import named_scheme

    g = new_classifier(import_mit(MODELS / "mbv2-w0.35.pkl", name="mbv2-w0.35"), 10, init="small")
    return g, named_scheme(g, "mbv2-w0.35:99kb")


def measure(graph: ir.Graph, scheme: ir.SparseScheme, batches: tuple[int, ...], min_steps: int,
            min_seconds: float) -> dict:
    plan, _ = compile_plan(graph, scheme, serialize=False)
    trainer = Trainer(engine_ready(plan))
    try:
        native = NativeTrainer(plan)
    except NativeError as e:
        print(f"skip native: {e}", file=sys.stderr)
        native = None
    model = graph_to_torch(graph)
    params, masks = torch_scheme_params(model, graph, scheme)
    for p, m in masks.items():
        p.register_hook(lambda g, m=m: g * m)
    opt = torch.optim.SGD(params, lr=1e-3)
    t_in = graph.tensors[graph.input_id]
    k = graph.tensors[graph.output_id].shape[0]
    rng = np.random.default_rng(0)
    out: dict[str, float | str] = {"scheme": scheme.name}
    for n in batches:
        x = rng.integers(-128, 128, (n, *t_in.shape)).astype(np.int8)
        y = (np.arange(n) % k).astype(np.int32)
        xf = torch.from_numpy(float(t_in.scale[0]) * (x.astype(np.float32) - t_in.zero_point))
        yt = torch.from_numpy(y.astype(np.int64))

        def torch_step(xf=xf, yt=yt) -> None:
            loss = torch.nn.functional.cross_entropy(model(xf), yt)
            opt.zero_grad()
            loss.backward()
            opt.step()

        ours = rate(lambda x=x, y=y: trainer.train_step(x, y, 1e-3), min_steps, min_seconds)
        theirs = rate(torch_step, min_steps, min_seconds)
        sfx = "" if n == 1 else f"_b{n}"
        if native is not None and n == 1:
            nat = rate(lambda x=x, y=y: native.train_step(x, y, 1e-3), min_steps, min_seconds)
            out["steps_per_s_native"] = round(nat, 2)
            out["native_over_torch"] = round(nat / theirs, 4)
            out["native_over_ours"] = round(nat / ours, 2)
        out[f"steps_per_s_ours{sfx}"] = round(ours, 2)
        out[f"steps_per_s_torch{sfx}"] = round(theirs, 2)
        out[f"ours_over_torch{sfx}"] = round(ours / theirs, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--models", default="imu,mbv2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    min_steps, min_s = (3, 0.3) if args.quick else (20, 3.0)
    result: dict = {"threads": 1}
    rows = []
    for name in args.models.split(","):
        if name == "mbv2" and not (MODELS / "mbv2-w0.35.pkl").exists():
            print(f"skip mbv2: {MODELS / 'mbv2-w0.35.pkl'} absent", file=sys.stderr)
            continue
        graph, scheme = {"imu": imu_graph, "mbv2": mbv2_graph}[name]()
        batches = (1, 16) if name == "imu" else (1, 8)
        r = measure(graph, scheme, batches, min_steps if name == "imu" else max(2, min_steps // 4), min_s)
        result[name] = r
        for n in batches:
            sfx = "" if n == 1 else f"_b{n}"
            rows.append((name, scheme.name, n, r[f"steps_per_s_ours{sfx}"], r[f"steps_per_s_torch{sfx}"],
                         r[f"ours_over_torch{sfx}"], r.get("steps_per_s_native", "-") if n == 1 else "-",
                         r.get("native_over_torch", "-") if n == 1 else "-"))
    if "imu" in result:
        result["steps_per_s_ours"] = result["imu"]["steps_per_s_ours"]
        result["steps_per_s_torch"] = result["imu"]["steps_per_s_torch"]
    emit(result, rows, ("model", "scheme", "batch", "ours steps/s", "torch steps/s", "ours/torch", "native steps/s",
                        "native/torch"))


if __name__ == "__main__":
    main()
