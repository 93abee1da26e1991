"""Transfer-learning accuracy of the int8 engine against fp32 on one training recipe, >= 3 seeds with intervals.

One command: ``python benchmarks/accuracy_qas.py [--quick] [--tasks imu,fashion] [--seeds 3] [--n-train N]
[--epochs E] [--batch B] [--methods m1,m2]``. Full run (paper scale for Fashion, hours on one core):
``python benchmarks/accuracy_qas.py --tasks fashion,imu --seeds 3 --n-train 10000 --n-val 2000 --n-test 5000
--epochs 10 --batch 16``.

Recipe (the same for every method; docs/engine.md, "Training recipe"): mini-batches of ``B`` samples
(gradient accumulation at batch 1 for the int8 engine: ``Recipe(accum_steps=B)``), SGD with momentum 0.9
(fixed-point int32 buffers for int8), linear warm-up over the first 5% of updates then cosine to 0 (the
engine's integer schedule, its Q15 factor also drives torch's lr), int8 weights with 16-bit residuals, and
plans compiled with ``range_ste`` (no saturation mask on linear int8-range clamps; docs/engine.md, "Diagnosis").
Methods:
- ``fp32_full`` / ``fp32_sparse``: torch float twin of the int8 graph (``ablation.graph_to_torch``), all
  parameters / only the scheme's (weights on the first ``k`` input channels);
- ``int8_sparse_qas``: the engine on the compiled plan with the recipe; ``int8_sparse_noqas``: the same
  without QAS (``ablation.without_qas``), own wider lr grid (no-QAS steps are ``s_w**2`` smaller);
- ``int8_sparse_plain``: the engine's default step and plan (batch 1, stochastic rounding to int8, constant lr,
  no momentum, saturation masks on every clamp) - the regime before this work; its grid is the common one
  scaled by ``1 / ((1 - momentum) B)`` (the same per-sample step);
- ``int8_sparse_lite``: batch 1, no momentum, 8-bit weight residuals (1 byte per trained weight), the same
  schedule, ``range_ste`` plan; grid as ``plain``;
- ``int8_last``: classifier only; ``int8_bias``: the scheme's biases (its last ``n_bias_update`` convs) +
  classifier; ``int8_lastk``: weights and biases of the last ``k`` backbone convs, ``k`` the largest whose
  memory does not exceed the sparse scheme's; ``int8_lastk_budget``: the same with ``k`` the largest whose
  plan fits ``--search-budget`` (comparable memory to ``int8_searched``);
- ``int8_searched``: the scheme ``fleet.compiler.scheme.search_scheme`` picks (contribution analysis + knapsack)
  under ``--search-budget`` bytes of ``peak_sram_bytes`` (default 256000: arena + trainable + *the shared
  recipe's* optimizer state + the runtime allowance), trained with the shared recipe like every other row.
  Its proxy: ``SEARCH_PROXY`` = (1024 train, 512 scoring) samples of the training split (never validation or
  test), each candidate trained one epoch with the recipe at the grid's (lower) middle rate on the engine of the run
  (cached prefix outputs, as the runs); candidates: bias-only last-k for ``k`` in ``SEARCH_BIAS_KS``, and the
  non-depthwise convs among the last ``SEARCH_DEPTH`` at ratios ``SEARCH_RATIOS``. The JSON row carries the
  chosen scheme, its candidates' gains and the search's seconds.
- ``int8_searched_lite``: the same search priced with the ``lite`` recipe's optimizer state (8-bit residuals:
  1 B per trained weight instead of the shared recipe's 6, no bias state) and its proxy trained with ``lite`` at
  the lite grid's (lower) middle rate, so the budget holds ~4x the weights; trained with ``lite`` on its grid.
- ``int8_lastk_lite``: ``int8_lastk_budget`` for ``lite``: the largest last-k whose plan with the lite recipe fits
  ``--search-budget`` (comparable memory to ``int8_searched_lite``), trained with ``lite`` on its grid.
Learning rate: each method sweeps its grid on seed 0 and keeps the best final validation accuracy; seeds
1.. run at that rate. Reported: test accuracy mean, 95% t-interval over seeds, per-seed values, the seed-0
validation curve per epoch (to see it flatten), and memory of the int8 plan (KB = 1000 B: arena + trainable +
optimizer state, from ``fleet.compiler.compile.compile_full``).

Tasks and splits (no test data is used for any choice):
- ``imu``: ImuCNN pretrained fp32 on watch subjects 1-5, PTQ-imported, fresh zero-initialised 7-way head;
  fine-tuned on subjects 6-10's earlier recording per exercise (75% train / rest validate), tested on the later.
- ``fashion``: MIT MbV2-w0.35 int8 ImageNet weights, fresh zero-initialised 10-way head; Fashion-MNIST resized
  to 128x128, grey replicated to RGB, int8 = pixel - 128; train/validation from the train file, test from t10k.
  Sparse scheme: the paper's ``mbv2-w0.35:99kb`` rung. ``fashion_mcunet``: the same with MIT MCUNet-5FPS and its
  ``mcunet-5fps:99kb`` rung.
Runs whose scheme freezes a prefix train on cached prefix outputs (``ablation.split_graph``; for fp32 the float
twin's prefix): the same arithmetic as the full plan (rounding streams are keyed by tensor ids); ``--feature-cache
DIR`` keeps the int8 ones on disk between runs.
Last stdout line: ``{"<task>": {"<method>": {"mean", "ci95", "n", "seeds", "lr", "mem_kb", ...}, "_setup": {...}}}``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # NOTE: one core per run (2 cores shared); before numpy/torch load BLAS

import argparse
import hashlib
import json
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
from benchmarks.common import MODELS, emit, load_fashion_mnist, t_interval
from device_agent.engine import ir
from device_agent.engine.forward import forward_activations
from device_agent.engine.recipe import Recipe, lr_factor_q15
from device_agent.engine.trainer import Trainer
from fleet.compiler.graph_builder import backbone_convs
from fleet.compiler.training import build_training_plan

METHODS = ("fp32_sparse", "int8_sparse_qas", "int8_sparse_lite", "int8_sparse_plain", "int8_sparse_noqas", "int8_last",
           "int8_bias", "int8_lastk", "fp32_full", "int8_searched", "int8_searched_lite", "int8_lastk_budget",
           "int8_lastk_lite")
WIDE = (1.0, 1e2, 1e4)  # multipliers of the grid for the no-QAS sweep
SEARCH_PROXY = (1024, 512)  # searched scheme: proxy samples (train, score) from the training split
SEARCH_BIAS_KS = (0, 4, 8, 12, 16, 24)  # bias-only depths analysed
SEARCH_DEPTH = 12  # weights analysed: the non-depthwise convs among the last SEARCH_DEPTH backbone convs
SEARCH_RATIOS = (0.25, 0.5, 1.0)


@dataclass
class Task:
    """One transfer task: an int8 graph, its schemes and int8 splits (engine inputs, batch first)."""

    name: str
    graph: ir.Graph
    sparse: ir.SparseScheme
    x: dict[str, np.ndarray]  # split -> int8 inputs (N, *input shape) (or a compact form, see ``expand``)
    y: dict[str, np.ndarray]
    grid: tuple[float, ...]
    expand: object = None  # callable: stored inputs -> (N, *input shape) int8
    cache: dict = field(default_factory=dict)
    feature_dir: str | None = None  # keep the int8 prefix outputs on disk here (keyed by the split's input bytes)

    def inputs(self, split: str, idx=None) -> np.ndarray:
        x = self.x[split] if idx is None else self.x[split][idx]
        return self.expand(x) if self.expand else x


@dataclass(frozen=True)
class Setup:
    """The recipe every method shares: batch, epochs, momentum, warm-up + cosine schedule, residual bits."""

    batch: int
    epochs: int
    momentum: float = 0.9
    warmup_frac: float = 0.05
    frac_bits: int = 16
    engine: str = "python"  # int8 runs: "python" (the reference) or "native" (the firmware's C, bit-exact)

    def updates(self, n_train: int) -> int:
        return self.epochs * (n_train // self.batch)

    def recipe(self, n_train: int) -> Recipe:
        total = self.updates(n_train)
        warm = max(1, round(self.warmup_frac * total))
        return Recipe(accum_steps=self.batch, momentum=self.momentum, frac_bits=self.frac_bits, warmup=warm,
                      total=max(total, warm + 1))


def order(n: int, batch: int, epoch: int, seed: int) -> list[np.ndarray]:
    """One epoch's mini-batches: a seeded permutation cut into full ``batch``-sized pieces (the rest dropped)."""
    p = np.random.default_rng(1000 * seed + epoch).permutation(n)
    return [p[i:i + batch] for i in range(0, n - batch + 1, batch)]


# ------------------------------------------------------------------------------------------------- splits


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


def _tail(task: Task, scheme: ir.SparseScheme) -> tuple[ir.Graph, ir.SparseScheme, int | None]:
    """(graph the run trains, scheme in its coordinates, cut tensor or None)."""
    cut = _cut_for(task.graph, scheme)
    if cut is None:
        return task.graph, scheme, None
    _, tail = split_graph(task.graph, cut)
    return tail, shift_scheme(scheme, n_convs_before(task.graph, cut), len(backbone_convs(tail))), cut


def int8_plan(task: Task, scheme: ir.SparseScheme, range_ste: bool = True) -> tuple[ir.Plan, int | None]:
    """The training plan of ``scheme`` on the graph's trainable tail, and the cut tensor (None: whole graph)."""
    key = ("plan", scheme.name, range_ste)
    if key not in task.cache:
        g, sch, cut = _tail(task, scheme)
        task.cache[key] = (engine_ready(build_training_plan(g, sch, range_ste=range_ste)), cut)
    return task.cache[key]


def features(task: Task, cut: int | None, split: str) -> np.ndarray | None:
    """Engine inputs of the tail: the frozen int8 prefix's output at ``cut`` (computed once per split)."""
    if cut is None:
        return task.x[split] if task.expand is None else None
    key = ("feat", cut, split)
    if key not in task.cache:
        path = None
        if task.feature_dir is not None:
            digest = hashlib.sha256(np.ascontiguousarray(task.x[split]).tobytes()).hexdigest()[:16]
            path = Path(task.feature_dir) / f"{task.name}_cut{cut}_{split}_{digest}.npy"
        if path is not None and path.exists():
            task.cache[key] = np.load(path)
        else:
            prefix, _ = split_graph(task.graph, cut)
            n = len(task.y[split])
            task.cache[key] = np.concatenate([forward_activations(prefix, task.inputs(split, slice(i, i + 64)))[cut]
                                              for i in range(0, n, 64)])
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, task.cache[key])
    return task.cache[key]


def _real_input(task: Task, split: str, idx) -> torch.Tensor:
    t_in = task.graph.tensors[task.graph.input_id]
    x = task.inputs(split, idx)
    return torch.from_numpy(float(t_in.scale[0]) * (x.astype(np.float32) - t_in.zero_point))


def float_features(task: Task, cut: int | None, split: str) -> torch.Tensor:
    """fp32 twin inputs of the tail: the float prefix's output at ``cut`` (or the real input), once per split."""
    key = ("ffeat", cut, split)
    if key not in task.cache:
        n = len(task.y[split])
        if cut is None:
            task.cache[key] = torch.cat([_real_input(task, split, slice(i, i + 64)) for i in range(0, n, 64)])
        else:
            prefix, _ = split_graph(task.graph, cut)
            model = graph_to_torch(prefix).eval()
            shape = task.graph.tensors[cut].shape
            with torch.no_grad():
                task.cache[key] = torch.cat([model(_real_input(task, split, slice(i, i + 64))).reshape(-1, *shape)
                                             for i in range(0, n, 64)])
    return task.cache[key]


# ------------------------------------------------------------------------------------------------- runs


def run_fp32(task: Task, setup: Setup, scheme: ir.SparseScheme | None, lr: float, seed: int) -> dict:
    """Fine-tune the float twin with the recipe (all parameters if ``scheme`` is None) -> val curve, test acc."""
    torch.manual_seed(seed)
    if scheme is None:
        g, cut = task.graph, None
        model = graph_to_torch(g)
        params, masks = list(model.parameters()), {}
    else:
        g, sch, cut = _tail(task, scheme)
        model = graph_to_torch(g)
        params, masks = torch_scheme_params(model, g, sch)
    for p, m in masks.items():
        p.register_hook(lambda gr, m=m: gr * m)
    ytr = torch.from_numpy(task.y["train"].astype(np.int64))
    rec = setup.recipe(len(ytr))
    opt = torch.optim.SGD(params, lr=lr, momentum=setup.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: lr_factor_q15(u, rec) / 32768)
    feats = {s: float_features(task, cut, s) if (cut is not None or task.expand is None) else None
             for s in ("train", "val", "test")}

    def inp(split, idx):
        return feats[split][idx] if feats[split] is not None else _real_input(task, split, idx)

    def acc(split):
        model.eval()
        n, hits = len(task.y[split]), 0
        with torch.no_grad():
            for i in range(0, n, 256):
                sl = slice(i, min(n, i + 256))
                hits += int((model(inp(split, sl)).argmax(1).numpy() == task.y[split][sl]).sum())
        model.train()
        return hits / n

    curve = []
    model.train()
    for ep in range(setup.epochs):
        for idx in order(len(ytr), setup.batch, ep, seed):
            loss = torch.nn.functional.cross_entropy(model(inp("train", idx)), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        curve.append(round(acc("val"), 4))
    return {"val_curve": curve, "val": curve[-1], "test": acc("test")}


def lite_grid(task: Task, setup: Setup) -> tuple[float, ...]:
    """The common grid scaled by ``1 / ((1 - momentum) B)``: the same per-sample step at batch 1 without momentum."""
    return tuple(round(lr / ((1 - setup.momentum) * setup.batch), 10) for lr in task.grid)


def lite_recipe(setup: Setup, n_train: int) -> Recipe:
    """The cheap variant: batch 1 (no buffer), no momentum, 8-bit weight residuals, the same schedule."""
    r = setup.recipe(n_train)
    b = setup.batch
    return Recipe(accum_steps=1, frac_bits=8, warmup=r.warmup * b, total=r.total * b)


def run_int8(task: Task, setup: Setup, scheme: ir.SparseScheme, lr: float, seed: int, qas: bool = True,
             plain: bool = False, lite: bool = False) -> dict:
    """Train with the engine and the recipe (``plain``: the default step at batch 1; ``lite``: see
    :func:`lite_recipe`) -> val curve, test acc."""
    plan, cut = int8_plan(task, scheme, range_ste=not plain)
    ytr = task.y["train"]
    rec = None if plain else (lite_recipe(setup, len(ytr)) if lite else setup.recipe(len(ytr)))
    base = plan if qas else without_qas(plan)
    trainer = native_trainer(base, rec) if setup.engine == "native" else Trainer(base, recipe=rec)
    feats = {s: features(task, cut, s) for s in ("train", "val", "test")}

    def get(split, idx):
        return feats[split][idx] if feats[split] is not None else task.inputs(split, idx)

    def acc(split):
        n = len(task.y[split])
        return sum(int((trainer.predict(get(split, slice(i, i + 64))) == task.y[split][i:i + 64]).sum())
                   for i in range(0, n, 64)) / n

    curve = []
    for ep in range(setup.epochs):
        for idx in order(len(ytr), setup.batch, ep, seed):
            if setup.engine == "native":  # N device steps in one call: the same bits as both branches below
                trainer.steps(get("train", idx), ytr[idx], lr)
            elif plain or lite:
                for j in range(len(idx)):  # NOTE: the device's step: one sample, one rounded update
                    trainer.train_step(get("train", idx[j:j + 1]), ytr[idx[j:j + 1]], lr)
            else:
                trainer.train_step(get("train", idx), ytr[idx], lr)
        curve.append(round(acc("val"), 4))
    return {"val_curve": curve, "val": curve[-1], "test": acc("test")}


def native_trainer(plan: ir.Plan, recipe: Recipe | None):
    """The firmware's C runtime on ``plan`` carrying ``recipe`` (arena planned on a copy, as the compiler does)."""
    import copy

    from device_agent.engine.recipe import with_recipe
    from device_agent.native import NativeTrainer
    from fleet.compiler.planner import plan_arena

    p = copy.deepcopy(plan)
    plan_arena(p)
    return NativeTrainer(with_recipe(p, recipe))


def plan_memory(task: Task, scheme: ir.SparseScheme, recipe: Recipe | None) -> dict:
    """The compiler's memory report of ``scheme`` on the whole graph (KB = 1000 B), cached per scheme.

    With a recipe the plan is compiled with ``range_ste`` (as the runs train it); without, as the default plan.
    """
    from fleet.compiler.compile import compile_full

    key = ("mem", scheme.name, recipe)
    if key not in task.cache:
        r = compile_full(task.graph, scheme, serialize=False, recipe=recipe, range_ste=recipe is not None).report
        task.cache[key] = {"arena_kb": round(r.arena_bytes / 1000, 1), "trainable_kb": round(r.trainable_bytes / 1000, 1),
                           "optimizer_kb": round(r.optimizer_bytes / 1000, 1),
                           "mem_kb": round((r.arena_bytes + r.trainable_bytes + r.optimizer_bytes) / 1000, 1),
                           "peak_sram_kb": round(r.peak_sram_bytes / 1000, 1)}
    return task.cache[key]


def last_k(task: Task, budget_kb: float, recipe: Recipe) -> ir.SparseScheme:
    """Weights + biases of the last ``k`` backbone convs, ``k`` the largest with memory <= ``budget_kb``."""
    n = len(backbone_convs(task.graph))
    best = ir.SparseScheme("last1", 1, {n - 1: 1.0})
    for k in range(1, n + 1):
        s = ir.SparseScheme(f"last{k}", k, {i: 1.0 for i in range(n - k, n)})
        if plan_memory(task, s, recipe)["mem_kb"] > budget_kb:
            break
        best = s
    return best


def searched_scheme(task: Task, setup: Setup, budget: int, quick: bool = False,
                    lite: bool = False) -> tuple[ir.SparseScheme, dict]:
    """``search_scheme`` under ``budget`` bytes with the shared recipe's optimizer state priced in (``lite``: the
    lite recipe's, proxy trained with it at the lite grid's rate); proxy training on a slice of the training split
    (cached per task). Returns the scheme and what the search saw."""
    from fleet.compiler.scheme import search_scheme

    key = ("searched", budget, lite)
    if key in task.cache:
        return task.cache[key]
    t0 = time.time()
    n = len(backbone_convs(task.graph))
    n_tr, n_sc = (64, 32) if quick else SEARCH_PROXY
    idx = np.random.default_rng(12345).permutation(len(task.y["train"]))[:n_tr + n_sc]
    x_px, y_px = task.inputs("train", idx), task.y["train"][idx]
    convs = backbone_convs(task.graph)
    layers = [i for i in range(max(0, n - SEARCH_DEPTH), n) if int(task.graph.ops[convs[i]].attrs["groups"]) == 1]
    ks = [k for k in SEARCH_BIAS_KS if k <= n]
    cands = [ir.SparseScheme("b", k) for k in ks] + [ir.SparseScheme("w", 0, {i: 1.0}) for i in layers]
    cuts = {c for c in (_cut_for(task.graph, s) for s in cands) if c is not None}
    feats: dict[int, list] = {c: [] for c in cuts}
    for i in range(0, len(y_px), 64):  # NOTE: one forward pass gives every candidate's cached prefix output
        acts = forward_activations(task.graph, x_px[i:i + 64])
        for c in cuts:
            feats[c].append(acts[c])
    px = {c: np.concatenate(v) for c, v in feats.items()}
    one = Setup(setup.batch, 1, setup.momentum, setup.warmup_frac, setup.frac_bits, setup.engine)
    rec = lite_recipe(one, n_tr) if lite else one.recipe(n_tr)
    grid = lite_grid(task, setup) if lite else task.grid
    lr = grid[(len(grid) - 1) // 2]  # the grid's (lower) middle rate

    def score(s: ir.SparseScheme) -> float:
        g, sch, cut = _tail(task, s)
        plan = engine_ready(build_training_plan(g, sch, range_ste=True))
        trainer = native_trainer(plan, rec) if setup.engine == "native" else Trainer(plan, recipe=rec)
        x = px[cut] if cut is not None else x_px
        for b in order(n_tr, setup.batch, 0, 0):
            if setup.engine == "native":
                trainer.steps(x[b], y_px[b], lr)
            elif lite:
                for j in range(len(b)):  # NOTE: lite is batch 1: one sample, one update (as run_int8)
                    trainer.train_step(x[b[j:j + 1]], y_px[b[j:j + 1]], lr)
            else:
                trainer.train_step(x[b], y_px[b], lr)
        return float((trainer.predict(x[n_tr:]) == y_px[n_tr:]).mean())

    full_rec = lite_recipe(setup, len(task.y["train"])) if lite else setup.recipe(len(task.y["train"]))
    res = search_scheme(task.graph, budget, None, None, layers=layers, bias_ks=ks, ratios=SEARCH_RATIOS,
                        recipe=full_rec, range_ste=True, score=score)
    res.scheme.name = f"searched-{'lite-' if lite else ''}{budget // 1000}kb"
    info = {"budget": budget, "recipe": "lite" if lite else "shared", "peak_sram_bytes": res.peak_sram_bytes, "n_bias_update": res.scheme.n_bias_update,
            "weight_ratio": {str(i): r for i, r in res.scheme.weight_ratio.items()},
            "bias_gain": {str(k): round(v, 4) for k, v in res.bias_gain.items()},
            "weight_gain": {f"{i}@{r}": round(v, 4) for (i, r), v in res.weight_gain.items()},
            "evaluations": res.evaluations, "proxy": [n_tr, n_sc], "proxy_lr": lr,
            "search_seconds": round(time.time() - t0)}
    print(f"  {task.name} search: {info}", file=sys.stderr, flush=True)
    task.cache[key] = (res.scheme, info)
    return task.cache[key]


def last_k_fitting(task: Task, budget: int, recipe: Recipe) -> ir.SparseScheme | None:
    """Weights + biases of the last ``k`` backbone convs, ``k`` the largest whose ``peak_sram_bytes`` <= ``budget``
    (None when not even the last conv fits: MbV2 and MCUNet at 256 KB with the shared recipe)."""
    from fleet.compiler.compile import compile_full

    n = len(backbone_convs(task.graph))
    best = None
    for k in range(1, n + 1):
        s = ir.SparseScheme(f"last{k}", k, {i: 1.0 for i in range(n - k, n)})
        if compile_full(task.graph, s, serialize=False, recipe=recipe, range_ste=True).report.peak_sram_bytes > budget:
            break
        best = s
    return best


# ------------------------------------------------------------------------------------------------- tasks


def pretrain_fp32(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, lr: float, epochs: int) -> torch.nn.Module:
    """The source model of a transfer task: Adam, batches of 32 in ``order``'s seeded permutations; eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for e in range(epochs):
        model.train()
        for idx in order(len(y), 32, e, 0):
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def imu_task(quick: bool, **_) -> tuple[Task, dict]:
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
    model = pretrain_fp32(ImuCNN(), xp, yp, 3e-3, 8 if quick else 30)
    graph = import_torch(model, xp[np.random.default_rng(0).permutation(len(xp))[:512]], name="ImuCNN")
    graph = new_classifier(graph, 7)  # NOTE: a fresh head, so every method must learn the new subjects' task
    t_in = graph.tensors[graph.input_id]
    x = {k: quantize(norm(cat[k][0]), float(t_in.scale[0]), t_in.zero_point) for k in ("train", "val", "test")}
    y = {k: cat[k][1].astype(np.int32) for k in ("train", "val", "test")}
    task = Task("imu", graph, named_scheme(graph, "ImuCNN:tail"), x, y,
                grid=(0.003, 0.01) if quick else (0.001, 0.003, 0.01, 0.03))
    return task, {}


def heart_task(quick: bool, **_) -> tuple[Task, dict]:
    """TabularNet pretrained on Cleveland, fine-tuned with a fresh head on the other three hospitals' patients."""
    from fleet.compiler.models import TabularNet
    from fleet.compiler.quantize import new_classifier
    from fleet.compiler.torch_import import import_torch
    from fleet.scenarios.base import quantize
    from fleet.scenarios.heart import HeartFeatures, labels, load_table

    df = load_table()
    home = (df["dataset"] == "Cleveland").to_numpy()
    feats = HeartFeatures(df[home])  # NOTE: every statistic from the pretraining hospital, none from the targets
    xp, yp = feats(df[home])[:, :, 0, :], labels(df[home])
    rest = np.flatnonzero(~home)[np.random.default_rng(0).permutation(int((~home).sum()))]
    cut = {"train": rest[:int(0.6 * len(rest))], "val": rest[int(0.6 * len(rest)):int(0.75 * len(rest))],
           "test": rest[int(0.75 * len(rest)):]}
    torch.manual_seed(0)
    model = pretrain_fp32(TabularNet(xp.shape[1], 2), xp, yp, 1e-2, 10 if quick else 40)
    graph = new_classifier(import_torch(model, torch.from_numpy(xp), name="TabularNet"), 2)
    t_in = graph.tensors[graph.input_id]
    x = {k: quantize(feats(df.iloc[r]), float(t_in.scale[0]), t_in.zero_point) for k, r in cut.items()}
    y = {k: labels(df.iloc[r]).astype(np.int32) for k, r in cut.items()}
    sparse = ir.SparseScheme("TabularNet:half", 2, {1: 0.5})  # fc2 on its first 16 inputs, both biases, head
    task = Task("heart", graph, sparse, x, y, grid=(0.003, 0.01) if quick else (0.003, 0.01, 0.03, 0.1))
    return task, {"pretrain": "Cleveland (304)", "target": "Hungary + VA Long Beach + Switzerland"}


def fashion_task(quick: bool, n_train: int = 2000, n_val: int = 500, n_test: int = 1000,
                 model: str = "mbv2-w0.35") -> tuple[Task, dict]:
    """``model`` (MIT int8 weights: mbv2-w0.35 or mcunet-5fps, fresh 10-way head) on Fashion-MNIST at 128x128."""
    from fleet.compiler.mit_import import import_mit
    from fleet.compiler.quantize import new_classifier
    from fleet.compiler.scheme import named_scheme

    path = MODELS / f"{model}.pkl"
    if not path.exists():
        raise FileNotFoundError(f"{path} absent: the fashion task needs the MIT {model} int8 model")
    graph = new_classifier(import_mit(path, name=model), 10)
    n_tr, n_va, n_te = (200, 100, 200) if quick else (n_train, n_val, n_test)
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
    task = Task("fashion" if model == "mbv2-w0.35" else f"fashion_{model}", graph, named_scheme(graph, f"{model}:99kb"),
                x, y,
                grid=(0.003, 0.01) if quick else (0.001, 0.003, 0.01), expand=expand)
    return task, {}


TASKS = {"imu": imu_task, "fashion": fashion_task, "heart": heart_task,
         "fashion_mcunet": lambda *a, **k: fashion_task(*a, model="mcunet-5fps", **k)}

# ------------------------------------------------------------------------------------------------- driver


def method_plan(task: Task, setup: Setup, methods: tuple[str, ...] = METHODS, search_budget: int = 256_000,
                quick: bool = False) -> dict[str, tuple]:
    """Method -> (run(lr, seed) -> dict, lr grid, int8 scheme for memory or None, recipe for memory); the searched
    scheme is only searched when ``methods`` asks for it."""
    rec = setup.recipe(len(task.y["train"]))
    n = len(backbone_convs(task.graph))
    sp = task.sparse
    bias = ir.SparseScheme(f"bias{sp.n_bias_update}", sp.n_bias_update, {})
    last = ir.SparseScheme("last", 0, {})
    mid = task.grid[len(task.grid) // 2]
    wide = tuple(round(mid * k, 10) for k in WIDE)  # NOTE: no-QAS steps are ~s_w**2 smaller than QAS steps
    plain = lite_grid(task, setup)  # same per-sample step
    lrec = lite_recipe(setup, len(task.y["train"]))
    out = {
        "fp32_full": (lambda lr, s: run_fp32(task, setup, None, lr, s), task.grid, None, None),
        "fp32_sparse": (lambda lr, s: run_fp32(task, setup, sp, lr, s), task.grid, None, None),
        "int8_sparse_qas": (lambda lr, s: run_int8(task, setup, sp, lr, s), task.grid, sp, rec),
        "int8_sparse_noqas": (lambda lr, s: run_int8(task, setup, sp, lr, s, qas=False), wide, sp, rec),
        "int8_sparse_plain": (lambda lr, s: run_int8(task, setup, sp, lr, s, plain=True), plain, sp, None),
        "int8_sparse_lite": (lambda lr, s: run_int8(task, setup, sp, lr, s, lite=True), plain, sp, lrec),
        "int8_last": (lambda lr, s: run_int8(task, setup, last, lr, s), task.grid, last, rec),
        "int8_bias": (lambda lr, s: run_int8(task, setup, bias, lr, s), task.grid, bias, rec),
    }
    if n and "int8_lastk" in methods:
        lk = last_k(task, plan_memory(task, sp, rec)["mem_kb"], rec)
        out["int8_lastk"] = (lambda lr, s: run_int8(task, setup, lk, lr, s), task.grid, lk, rec)
    # last-k at the search's budget, priced with the shared recipe's optimizer state or with lite's
    for name, r, grid, lite, priced in (("int8_lastk_budget", rec, task.grid, False, "the recipe's optimizer state"),
                                        ("int8_lastk_lite", lrec, plain, True, "the lite recipe")):
        if not (n and name in methods):
            continue
        lb = last_k_fitting(task, search_budget, r)
        if lb is None:
            print(f"  {task.name} {name}: skipped, not even the last conv fits {search_budget} B with {priced}",
                  file=sys.stderr, flush=True)
        else:
            out[name] = (lambda lr, s, lb=lb, lite=lite: run_int8(task, setup, lb, lr, s, lite=lite), grid, lb, r)
    if n and "int8_searched" in methods:
        ss, _ = searched_scheme(task, setup, search_budget, quick)
        out["int8_searched"] = (lambda lr, s: run_int8(task, setup, ss, lr, s), task.grid, ss, rec)
    if n and "int8_searched_lite" in methods:
        sl, _ = searched_scheme(task, setup, search_budget, quick, lite=True)
        out["int8_searched_lite"] = (lambda lr, s: run_int8(task, setup, sl, lr, s, lite=True), plain, sl, lrec)
    return out


def study(fn, grid, seeds: int, log) -> dict:
    """Seed 0 over the grid (best final validation accuracy), then seeds 1.. at that rate."""
    tried = {}
    for lr in grid:
        tried[lr] = fn(lr, 0)
        log(f"lr {lr}: val {tried[lr]['val_curve']} test {tried[lr]['test']:.4f}")
    lr = max(grid, key=lambda v: tried[v]["val"])
    runs = [tried[lr]] + [fn(lr, s) for s in range(1, seeds)]
    tests = [r["test"] for r in runs]
    return {"mean": round(float(np.mean(tests)), 4), "ci95": t_interval(tests), "n": len(tests),
            "seeds": [round(t, 4) for t in tests], "lr": lr, "val": round(float(np.mean([r["val"] for r in runs])), 4),
            "val_curve": tried[lr]["val_curve"], "grid_val": {str(k): v["val"] for k, v in tried.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: fewer samples, epochs, rates and seeds")
    ap.add_argument("--tasks", default="imu,fashion")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=None, help="default: 6 (fashion), 10 (imu); quick 2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-wide", action="store_true", help="no-QAS uses the common grid (quick CI)")
    ap.add_argument("--grid", default=None, help="comma-separated learning rates (default per task)")
    ap.add_argument("--engine", default="python", choices=("python", "native"),
                    help="int8 runs on the reference engine or the native one (`make native`; bit-exact, faster)")
    ap.add_argument("--feature-cache", default=None, help="directory to keep the frozen prefix's int8 outputs in "
                    "(one .npy per task, cut and split, named by a hash of the split's inputs)")
    ap.add_argument("--partial", default=None, help="write the results so far to this JSON file after each method")
    ap.add_argument("--search-budget", type=int, default=256_000, help="bytes of peak SRAM (with the recipe's "
                    "optimizer state) for int8_searched and int8_lastk_budget")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = 1 if args.quick else args.seeds
    result, rows = {}, []
    for name in args.tasks.split(","):
        t0 = time.time()
        task, extra = TASKS[name](args.quick, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
        task.feature_dir = args.feature_cache
        epochs = 2 if args.quick else (args.epochs or {"imu": 10, "heart": 20}.get(name, 6))
        if args.grid and not args.quick:
            task.grid = tuple(float(v) for v in args.grid.split(","))
        setup = Setup(batch=args.batch if not args.quick else 8, epochs=epochs, engine=args.engine)
        wanted = tuple(args.methods.split(","))
        plans = method_plan(task, setup, wanted, args.search_budget, args.quick)
        out: dict[str, dict] = {}
        for m in [m for m in args.methods.split(",") if m in plans]:
            fn, grid, scheme, rec = plans[m]
            grid = task.grid if (args.no_wide or args.quick) else grid
            tm = time.time()
            log = lambda msg, m=m, name=name: print(f"  {name} {m}: {msg}", file=sys.stderr, flush=True)
            r = study(fn, grid, seeds, log)
            r.update(plan_memory(task, scheme, rec) if scheme is not None else {"mem_kb": None})
            r["scheme"] = scheme.name if scheme is not None else ("full" if m == "fp32_full" else task.sparse.name)
            if m in ("int8_searched", "int8_searched_lite"):
                r["search"] = searched_scheme(task, setup, args.search_budget, args.quick, lite=m.endswith("lite"))[1]
            elif scheme is not None and m.startswith("int8_lastk"):
                r["k"] = scheme.n_bias_update
            r["seconds"] = round(time.time() - tm)
            out[m] = r
            rows.append((name, m, f"{r['mean']:.4f}", f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]", r["n"], r["lr"],
                         r["mem_kb"], r["val_curve"], f"{r['seconds']}s"))
            log(f"test {r['mean']:.4f} ci95 {r['ci95']} seeds {r['seeds']} lr {r['lr']} mem {r['mem_kb']} KB")
            if args.partial:
                Path(args.partial).write_text(json.dumps({**result, name: out}, sort_keys=True))
        out["_setup"] = {"scheme": task.sparse.name, "n": {k: len(v) for k, v in task.y.items()}, "epochs": epochs,
                         "batch": setup.batch, "momentum": setup.momentum, "warmup_frac": setup.warmup_frac,
                         "frac_bits": setup.frac_bits, "seeds": seeds, "seconds": round(time.time() - t0, 1), **extra}
        result[name] = out
    emit(result, rows, ("task", "method", "test", "ci95", "n", "lr", "mem_kb", "val curve (seed 0)", "time"))


if __name__ == "__main__":
    main()
