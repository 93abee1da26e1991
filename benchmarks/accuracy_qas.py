"""Transfer-learning accuracy: int8 sparse update with and without QAS against fp32 fine-tuning, same run.

One command: ``python benchmarks/accuracy_qas.py [--quick] [--tasks imu,fashion] [--seeds N]``.
Methods (same data order, batch, epochs and seeds for all; plain SGD, no momentum, as the engine does):
- ``fp32_full``: torch, every parameter of the float twin of the int8 graph (``ablation.graph_to_torch``);
- ``fp32_sparse``: torch, only the scheme's parameters (weights on the first ``k`` input channels);
- ``int8_sparse_noqas`` / ``int8_sparse_qas``: the engine's Trainer on the compiled plan, update factors
  without QAS (``ablation.without_qas``) / as compiled;
- ``int8_last``: classifier only; ``int8_bias``: every bias + classifier (the compiler's ``bias`` variant).
Learning rate: for every method the same grid; the rate with the best validation accuracy (mean over seeds) is
chosen and its test accuracy reported. ``int8_sparse_noqas_wide`` also sweeps rates up to 10**4 x larger (no-QAS
steps are ``s_w**2`` smaller), to show that no single rate fixes it.

Tasks and splits (no test data is used for any choice):
- ``imu``: ImuCNN pretrained fp32 on watch subjects 1-5 (all recordings), PTQ-imported with calibration on
  those windows, then a fresh zero-initialised 7-way head. Fine-tuned on subjects 6-10's earlier recording per
  exercise (its first 75% of windows train, the rest validate), tested on their later recording.
- ``fashion``: MIT MbV2-w0.35 int8 ImageNet weights, new zero-initialised 10-way head; Fashion-MNIST resized to
  128x128, grey replicated to RGB, int8 = pixel - 128. Train / validation from the train file, test from t10k.
  Sparse scheme: the paper's ``mbv2-w0.35:99kb`` rung.
The int8 runs of schemes that freeze a prefix train on cached prefix outputs (``ablation.split_graph``): the same
arithmetic as the full plan (stochastic-rounding streams are keyed by tensor ids, so not the same bits).
Last stdout line: ``{"<task>": {"fp32_full": acc, ...}}`` with accuracies in [0, 1].
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # NOTE: one core per run (2 cores shared); before numpy/torch load BLAS

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.ablation import (
    earliest_trained_conv,
    engine_ready,
    graph_to_torch,
    n_convs_before,
    shift_scheme,
    split_graph,
    torch_scheme_params,
    without_qas,
)
from benchmarks.common import MODELS, emit, load_fashion_mnist
from device_agent.engine import ir
from device_agent.engine.forward import forward_activations
from device_agent.engine.trainer import Trainer
from fleet.compiler.graph_builder import backbone_convs
from fleet.compiler.training import build_training_plan

METHODS = ("fp32_full", "fp32_sparse", "int8_sparse_noqas", "int8_sparse_qas", "int8_last", "int8_bias")
WIDE = (1.0, 1e2, 1e4)  # extra multipliers of the grid for the no-QAS sweep


@dataclass
class Task:
    """One transfer task: an int8 graph, its schemes and int8 splits (engine inputs, batch first)."""

    name: str
    graph: ir.Graph
    sparse: ir.SparseScheme
    x: dict[str, np.ndarray]  # split -> int8 inputs (N, *input shape) (or a compact form, see ``expand``)
    y: dict[str, np.ndarray]
    batch: int
    epochs: int
    grid: tuple[float, ...]
    expand: object = None  # callable: stored inputs -> (N, *input shape) int8
    cache: dict = field(default_factory=dict)

    def inputs(self, split: str, idx=None) -> np.ndarray:
        x = self.x[split] if idx is None else self.x[split][idx]
        return self.expand(x) if self.expand else x


def order(n: int, batch: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The mini-batches every method sees: per epoch a seeded permutation cut into ``batch``-sized pieces."""
    out = []
    for e in range(epochs):
        p = np.random.default_rng(1000 * seed + e).permutation(n)
        out += [p[i:i + batch] for i in range(0, n, batch)]
    return out


# ------------------------------------------------------------------------------------------------- fp32


def run_fp32(task: Task, scheme: ir.SparseScheme | None, lr: float, seed: int) -> tuple[float, float]:
    """Fine-tune the float twin (all parameters if ``scheme`` is None); returns (val acc, test acc)."""
    torch.manual_seed(seed)
    model = graph_to_torch(task.graph)
    if scheme is None:
        params, masks = list(model.parameters()), {}
    else:
        params, masks = torch_scheme_params(model, task.graph, scheme)
    for p, m in masks.items():
        p.register_hook(lambda g, m=m: g * m)
    opt = torch.optim.SGD(params, lr=lr)
    t_in = task.graph.tensors[task.graph.input_id]
    s, z = float(t_in.scale[0]), t_in.zero_point

    def real(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(s * (x.astype(np.float32) - z))

    ytr = torch.from_numpy(task.y["train"].astype(np.int64))
    model.train()
    for idx in order(len(ytr), task.batch, task.epochs, seed):
        loss = torch.nn.functional.cross_entropy(model(real(task.inputs("train", idx))), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    accs = []
    with torch.no_grad():
        for split in ("val", "test"):
            n, hits = len(task.y[split]), 0
            for i in range(0, n, 256):
                sl = slice(i, min(n, i + 256))
                pred = model(real(task.inputs(split, sl))).argmax(1).numpy()
                hits += int((pred == task.y[split][sl]).sum())
            accs.append(hits / n)
    return accs[0], accs[1]


# ------------------------------------------------------------------------------------------------- int8


def _cut_for(graph: ir.Graph, scheme: ir.SparseScheme) -> int | None:
    """The latest activation before the first trained conv at which the graph splits cleanly (None: no prefix)."""
    convs = backbone_convs(graph)
    first = earliest_trained_conv(graph, scheme)
    op_i = convs[first] if first < len(convs) else next(i for i, op in enumerate(graph.ops)
                                                        if graph.output_id in op.outputs)
    for j in range(op_i - 1, -1, -1):
        try:
            split_graph(graph, graph.ops[j].outputs[0])
            return graph.ops[j].outputs[0]
        except ValueError:
            continue
    return None


def int8_plan(task: Task, scheme: ir.SparseScheme) -> tuple[ir.Plan, int | None]:
    """The training plan of ``scheme`` on the graph's trainable tail, and the cut tensor (None: whole graph)."""
    key = ("plan", scheme.name)
    if key not in task.cache:
        cut = _cut_for(task.graph, scheme)
        if cut is None:
            plan = build_training_plan(task.graph, scheme)
        else:
            _, tail = split_graph(task.graph, cut)
            sch = shift_scheme(scheme, n_convs_before(task.graph, cut), len(backbone_convs(tail)))
            plan = build_training_plan(tail, sch)
        task.cache[key] = (engine_ready(plan), cut)
    return task.cache[key]


def features(task: Task, cut: int | None, split: str) -> np.ndarray:
    """Engine inputs of the tail: the frozen prefix's output at ``cut`` (computed once per split)."""
    if cut is None:
        return task.x[split] if task.expand is None else None
    key = ("feat", cut, split)
    if key not in task.cache:
        prefix, _ = split_graph(task.graph, cut)
        n = len(task.y[split])
        task.cache[key] = np.concatenate([forward_activations(prefix, task.inputs(split, slice(i, i + 64)))[cut]
                                          for i in range(0, n, 64)])
    return task.cache[key]


def run_int8(task: Task, scheme: ir.SparseScheme, lr: float, seed: int, qas: bool = True) -> tuple[float, float]:
    """Train with the engine (mini-batches of ``task.batch``); returns (val acc, test acc)."""
    plan, cut = int8_plan(task, scheme)
    trainer = Trainer(plan if qas else without_qas(plan))
    feats = {s: features(task, cut, s) for s in ("train", "val", "test")}

    def get(split, idx):
        return feats[split][idx] if feats[split] is not None else task.inputs(split, idx)

    ytr = task.y["train"]
    for idx in order(len(ytr), task.batch, task.epochs, seed):
        trainer.train_step(get("train", idx), ytr[idx], lr)
    accs = []
    for split in ("val", "test"):
        n = len(task.y[split])
        hits = sum(int((trainer.predict(get(split, slice(i, i + 64))) == task.y[split][i:i + 64]).sum())
                   for i in range(0, n, 64))
        accs.append(hits / n)
    return accs[0], accs[1]


# ------------------------------------------------------------------------------------------------- tasks


def imu_task(quick: bool) -> tuple[Task, dict]:
    """ImuCNN pretrained on subjects 1-5, fine-tuned on 6-10 (earlier recordings), tested on later ones."""
    from seglearn.datasets import load_watch

    from fleet.compiler.models import ImuCNN
    from fleet.compiler.quantize import new_classifier
    from fleet.compiler.scheme import named_scheme
    from fleet.compiler.torch_import import import_torch
    from fleet.scenarios.base import quantize, windows

    data = load_watch()
    subj, lab = np.asarray(data["subject"]), np.asarray(data["y"])
    parts: dict[str, list] = {k: [] for k in ("pre", "train", "val", "test")}
    for i in range(len(lab)):
        recs = np.flatnonzero((subj == subj[i]) & (lab == lab[i]))
        w = windows(np.asarray(data["X"][i], np.float32), 128, 64)
        if subj[i] <= 5:
            parts["pre"].append((w, lab[i]))
        elif i == recs[-1]:
            parts["test"].append((w, lab[i]))  # the later recording
        else:  # earlier recording: first 75% of its windows train, the rest validate (one window gap)
            cut = int(0.75 * len(w))
            parts["train"].append((w[:cut], lab[i]))
            parts["val"].append((w[cut + 1:], lab[i]))
    cat = {k: (np.concatenate([w for w, _ in v]), np.concatenate([np.full(len(w), c) for w, c in v]))
           for k, v in parts.items()}
    xp_raw, yp = cat["pre"]
    mean = xp_raw.mean(axis=(0, 2, 3), keepdims=True)
    std = xp_raw.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    norm = lambda a: ((a - mean) / std).astype(np.float32)
    xp = norm(xp_raw)[:, :, 0, :]
    torch.manual_seed(0)
    model = ImuCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for e in range(8 if quick else 30):
        model.train()
        for idx in order(len(yp), 32, 1, e):
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(xp[idx])), torch.from_numpy(yp[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    graph = import_torch(model, xp[np.random.default_rng(0).permutation(len(xp))[:512]], name="ImuCNN")
    graph = new_classifier(graph, 7)  # NOTE: a fresh head, so every method must learn the new subjects' task
    t_in = graph.tensors[graph.input_id]
    x = {k: quantize(norm(cat[k][0]), float(t_in.scale[0]), t_in.zero_point) for k in ("train", "val", "test")}
    y = {k: cat[k][1].astype(np.int32) for k in ("train", "val", "test")}
    x_test, y_test = cat["test"]
    with torch.no_grad():
        fp32_zero = float((model(torch.from_numpy(norm(x_test)[:, :, 0, :])).argmax(1).numpy() == y_test).mean())
    task = Task("imu", graph, named_scheme(graph, "ImuCNN:tail"), x, y, batch=8, epochs=3 if quick else 10,
                grid=(0.01, 0.05) if quick else (0.003, 0.01, 0.03, 0.1))
    return task, {"fp32_pretrained_head_on_test": fp32_zero}


def fashion_task(quick: bool) -> tuple[Task, dict]:
    """MbV2-w0.35 (MIT int8 weights, fresh 10-way head) on Fashion-MNIST at 128x128."""
    from fleet.compiler.mit_import import import_mit
    from fleet.compiler.quantize import new_classifier
    from fleet.compiler.scheme import named_scheme

    path = MODELS / "mbv2-w0.35.pkl"
    if not path.exists():
        raise FileNotFoundError(f"{path} absent: the fashion task needs the MIT MbV2-w0.35 int8 model")
    graph = new_classifier(import_mit(path, name="mbv2-w0.35"), 10)
    n_tr, n_va, n_te = (200, 100, 200) if quick else (600, 200, 400)
    xa, ya = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    perm = np.random.default_rng(0).permutation(len(ya))[:n_tr + n_va]
    te = np.random.default_rng(1).permutation(len(yt))[:n_te]

    def resize(img: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(img.astype(np.float32))[:, None]
        r = torch.nn.functional.interpolate(t, size=(128, 128), mode="bilinear", align_corners=False)
        return (np.clip(np.round(r[:, 0].numpy()), 0, 255) - 128).astype(np.int8)

    x = {"train": resize(xa[perm[:n_tr]]), "val": resize(xa[perm[n_tr:]]), "test": resize(xt[te])}
    y = {"train": ya[perm[:n_tr]].astype(np.int32), "val": ya[perm[n_tr:]].astype(np.int32),
         "test": yt[te].astype(np.int32)}
    expand = lambda a: np.repeat(a[:, None], 3, axis=1)
    task = Task("fashion", graph, named_scheme(graph, "mbv2-w0.35:99kb"), x, y, batch=16,
                epochs=2, grid=(0.01, 0.05) if quick else (0.003, 0.01, 0.03, 0.1), expand=expand)
    return task, {}


# ------------------------------------------------------------------------------------------------- driver


def sweep(fn, grid, seeds: int) -> tuple[float, float, float]:
    """Best learning rate by mean validation accuracy over seeds -> (lr, val, test)."""
    best = None
    for lr in grid:
        vt = np.array([fn(lr, s) for s in range(seeds)])
        val, test = float(vt[:, 0].mean()), float(vt[:, 1].mean())
        if best is None or val > best[1]:
            best = (lr, val, test)
    return best


def method_runs(task: Task, schemes: dict[str, ir.SparseScheme]) -> dict:
    """Method name -> ``f(lr, seed) -> (val acc, test acc)``."""
    return {
        "fp32_full": lambda lr, s: run_fp32(task, None, lr, s),
        "fp32_sparse": lambda lr, s: run_fp32(task, task.sparse, lr, s),
        "int8_sparse_noqas": lambda lr, s: run_int8(task, task.sparse, lr, s, qas=False),
        "int8_sparse_qas": lambda lr, s: run_int8(task, task.sparse, lr, s),
        "int8_last": lambda lr, s: run_int8(task, schemes["last"], lr, s),
        "int8_bias": lambda lr, s: run_int8(task, schemes["bias"], lr, s),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: fewer samples, epochs and rates")
    ap.add_argument("--tasks", default="imu,fashion")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--no-wide", action="store_true", help="skip the wide no-QAS learning-rate sweep")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result, rows = {}, []
    for name in args.tasks.split(","):
        t0 = time.time()
        task, extra = {"imu": imu_task, "fashion": fashion_task}[name](args.quick)
        g = task.graph
        from fleet.compiler.scheme import variant
        schemes = {"last": variant(g, "last"), "bias": variant(g, "bias")}
        runs = method_runs(task, schemes)
        out: dict[str, float | str | dict] = {}
        lrs = {}
        for m in METHODS:
            tm = time.time()
            lr, val, test = sweep(runs[m], task.grid, args.seeds)
            out[m], lrs[m] = round(test, 4), lr
            rows.append((name, m, f"{test:.4f}", f"{val:.4f}", lr, f"{time.time() - tm:.0f}s"))
            print(f"  {name} {m}: test {test:.4f} val {val:.4f} lr {lr} ({time.time() - tm:.0f}s)",
                  file=sys.stderr, flush=True)
        if not args.no_wide:
            grid = sorted({round(lr * k, 10) for lr in task.grid for k in WIDE})
            lr, val, test = sweep(runs["int8_sparse_noqas"], grid, args.seeds)
            out["int8_sparse_noqas_wide"], lrs["int8_sparse_noqas_wide"] = round(test, 4), lr
            rows.append((name, "int8_sparse_noqas_wide", f"{test:.4f}", f"{val:.4f}", lr, ""))
        out["gap_qas_vs_fp32_full"] = round(out["int8_sparse_qas"] - out["fp32_full"], 4)
        out["gap_noqas_vs_qas"] = round(out["int8_sparse_noqas"] - out["int8_sparse_qas"], 4)
        out["lr"] = lrs
        out["scheme"] = task.sparse.name
        out["n"] = {k: len(v) for k, v in task.y.items()}
        out["epochs"], out["batch"], out["seeds"] = task.epochs, task.batch, args.seeds
        out["seconds"] = round(time.time() - t0, 1)
        out.update(extra)
        result[name] = out
    emit(result, rows, ("task", "method", "test acc", "val acc", "lr", "time"))


if __name__ == "__main__":
    main()
