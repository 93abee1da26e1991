"""Sparse-update schemes: named ones (YAML ladders, 'full' / 'last' / 'bias') and the search under a budget.

The search is the paper's: contribution analysis (accuracy gain of bias-only last-k, then of each layer's
weights at each ratio, by short int8 training on proxy data with the engine's Trainer, or a caller's scorer),
then an exact knapsack over measured memory costs; the winner is compiled and checked, never trusted from the
cost model. Memory is the whole training memory a board holds (``peak_sram_bytes``: arena + trainable +
the optimizer state of the recipe it will train with + runtime allowance). It refuses to invent gains: without
proxy data or a scorer, :func:`search_scheme` cannot run (see ``prior`` for a stated fallback).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from device_agent.engine import ir
from device_agent.engine.recipe import Recipe

from .compile import BudgetError, compile_full
from .graph_builder import backbone_convs
from .training import RATIOS, SchemeError, build_training_plan

ROOT = Path(__file__).resolve().parents[2]
PAPER_SCHEMES = ROOT / "configs" / "schemes" / "mit-paper.yaml"  # the paper's released rungs
OUR_SCHEMES = ROOT / "configs" / "schemes"
VARIANTS = ("full", "last", "bias")


def scheme_from_entry(name: str, entry: dict) -> ir.SparseScheme:
    """One YAML entry ``{n_bias_update, manual_weight_idx, weight_update_ratio}`` -> SparseScheme (ratio 0 dropped).

    >>> scheme_from_entry("x", {"n_bias_update": 2, "manual_weight_idx": [3, 4], "weight_update_ratio": [0, 0.5]})
    SparseScheme(name='x', n_bias_update=2, weight_ratio={4: 0.5}, classifier_weight=True, classifier_bias=True)
    """
    idx = list(entry.get("manual_weight_idx", []))
    ratio = list(entry.get("weight_update_ratio", []))
    if len(idx) != len(ratio):
        raise SchemeError(f"scheme {name!r}: {len(idx)} manual_weight_idx but {len(ratio)} weight_update_ratio")
    unknown = set(entry) - {"n_bias_update", "manual_weight_idx", "weight_update_ratio"}
    if unknown:
        raise SchemeError(f"scheme {name!r}: unknown keys {sorted(unknown)}")
    return ir.SparseScheme(name=name, n_bias_update=int(entry.get("n_bias_update", 0)),
                           weight_ratio={int(i): float(r) for i, r in zip(idx, ratio) if r})


def load_schemes(path: str | Path) -> dict[str, dict[str, ir.SparseScheme]]:
    """A schemes YAML (``model: {rung: entry}``, as ../shared/models/schemes.yaml) -> model -> rung -> scheme."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise SchemeError(f"{path}: expected a mapping model -> rung -> scheme")
    return {str(m): {str(r): scheme_from_entry(f"{m}:{r}", e) for r, e in (rungs or {}).items()}
            for m, rungs in data.items()}


def all_schemes() -> dict[str, dict[str, ir.SparseScheme]]:
    """The paper's ladders plus every ``configs/schemes/*.yaml`` (ours win on a name clash)."""
    out: dict[str, dict[str, ir.SparseScheme]] = {}
    files = ([PAPER_SCHEMES] if PAPER_SCHEMES.exists() else []) + sorted(OUR_SCHEMES.glob("*.yaml"))
    for f in files:
        for m, rungs in load_schemes(f).items():
            out.setdefault(m, {}).update(rungs)
    return out


def variant(graph: ir.Graph, name: str) -> ir.SparseScheme:
    """``full`` (every weight and bias), ``last`` (classifier only) or ``bias`` (every bias + classifier)."""
    n = len(backbone_convs(graph))
    if name == "full":
        return ir.SparseScheme("full", n, {i: 1.0 for i in range(n)})
    if name == "last":
        return ir.SparseScheme("last", 0, {})
    if name == "bias":
        return ir.SparseScheme("bias", n, {})
    raise SchemeError(f"unknown variant {name!r}, expected one of {VARIANTS}")


def named_scheme(graph: ir.Graph, name: str, model: str | None = None) -> ir.SparseScheme:
    """Resolve ``full`` / ``last`` / ``bias`` / ``<model>:<rung>`` / ``<rung>`` (model = ``model`` or graph name).

    Raises
    ------
    SchemeError
        Naming the schemes that exist for the model.
    """
    if name in VARIANTS:
        return variant(graph, name)
    table = all_schemes()
    m, _, rung = name.rpartition(":")
    m = m or model or graph.name
    if m not in table or rung not in table[m]:
        have = ", ".join(f"{m}:{r}" for r in table.get(m, {})) or f"none for model {m!r}"
        raise SchemeError(f"unknown scheme {name!r}; expected one of {', '.join(VARIANTS)}, auto, or {have}")
    return copy.deepcopy(table[m][rung])


# --------------------------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    """The chosen scheme, its measured peak and the analysis behind it."""

    scheme: ir.SparseScheme
    peak_sram_bytes: int
    base_peak: int
    bias_gain: dict[int, float] = field(default_factory=dict)  # k -> accuracy gain of bias-only last-k
    bias_cost: dict[int, int] = field(default_factory=dict)
    weight_gain: dict[tuple[int, float], float] = field(default_factory=dict)  # (conv, ratio) -> gain
    weight_cost: dict[tuple[int, float], int] = field(default_factory=dict)
    evaluations: int = 0  # proxy trainings run (the search's cost; each also compiles the candidate)


def _accuracy(graph: ir.Graph, scheme: ir.SparseScheme, x: np.ndarray, y: np.ndarray, steps: int, lr: float,
              batch: int, seed: int) -> float:
    from device_agent.engine.trainer import Trainer

    plan = build_training_plan(graph, scheme)
    for op in plan.ops:  # NOTE: the engine's Trainer wants both tensors of an update op trainable
        if op.type == ir.OpType.CONV2D_UPDATE:
            for t in op.inputs[2:]:
                plan.tensors[t].kind = ir.Kind.TRAINABLE
    n_train = max(1, len(x) // 2)
    trainer = Trainer(plan)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        i = rng.integers(0, n_train, size=min(batch, n_train))
        trainer.train_step(x[i], y[i], lr)
    return trainer.evaluate(x[n_train:], y[n_train:]) if len(x) > n_train else trainer.evaluate(x, y)


def _peak(graph: ir.Graph, scheme: ir.SparseScheme, recipe: Recipe | None = None, range_ste: bool = False) -> int:
    """The compiled plan's ``peak_sram_bytes``, with the optimizer state of ``recipe`` (None: the default step)."""
    return compile_full(graph, scheme, serialize=False, recipe=recipe, range_ste=range_ste).report.peak_sram_bytes


def _knapsack(items: list[list[tuple[float, int, float]]], capacity: int) -> tuple[float, list[float]]:
    """Exact multiple-choice knapsack: per group pick one (gain, cost units, ratio) or nothing (ratio 0)."""
    best = [0.0] * (capacity + 1)
    choice: list[list[float]] = [[] for _ in range(capacity + 1)]
    for group in items:
        nb, nc = best[:], [c + [0.0] for c in choice]
        for gain, cost, r in group:
            for cap in range(cost, capacity + 1):
                v = best[cap - cost] + gain
                if v > nb[cap] + 1e-12:
                    nb[cap], nc[cap] = v, choice[cap - cost] + [r]
        best, choice = nb, nc
    return best[capacity], choice[capacity]


def search_scheme(graph: ir.Graph, budget: int, proxy_x: np.ndarray | None, proxy_y: np.ndarray | None,
                  layers: list[int] | None = None, bias_ks: list[int] | None = None,
                  ratios: tuple[float, ...] = RATIOS, steps: int = 20, lr: float = 0.05, batch: int = 16,
                  unit: int = 1000, seed: int = 0, recipe: Recipe | None = None, range_ste: bool = False,
                  score: Callable[[ir.SparseScheme], float] | None = None) -> SearchResult:
    """Best sparse scheme under ``budget`` bytes of SRAM by contribution analysis + exact knapsack.

    Parameters
    ----------
    graph : ir.Graph
        Forward graph (its classifier always trains).
    budget : int
        Bytes; the result's compiled ``peak_sram_bytes`` (with ``recipe``'s optimizer state) is checked against it.
    proxy_x, proxy_y : np.ndarray or None
        Proxy samples (int8, batch first) and labels; the first half trains, the second half scores. None only
        with ``score``.
    layers : list of int, optional
        Backbone conv indices whose weights are analysed; default the last 4.
    bias_ks : list of int, optional
        Bias depths analysed; default 0, 1, 2, 4, ... up to the number of convs.
    ratios : tuple of float
        Weight ratios analysed.
    steps, lr, batch, seed : training of each candidate (``steps`` Trainer steps of ``batch`` samples).
    unit : int
        Knapsack cost unit in bytes (costs round up).
    recipe : Recipe, optional
        The training recipe the plan will run with: every cost includes its optimizer state (per trained weight
        and bias, ``recipe.layout_optimizer``), so a stateful recipe buys fewer weights under the same budget.
    range_ste : bool
        Compile candidates as the runs will (``build_training_plan(..., range_ste=...)``).
    score : callable, optional
        ``score(scheme) -> accuracy`` of a short training on proxy data, in place of the built-in Trainer run
        (e.g. the native engine on cached prefix outputs); gains are differences of its values.

    Returns
    -------
    SearchResult

    Raises
    ------
    BudgetError
        Even the classifier alone does not fit; ``.required`` is its peak.
    """
    if score is None and (proxy_x is None or proxy_y is None):
        raise ValueError("search_scheme needs proxy data (proxy_x, proxy_y) or a score(scheme) function")
    n = len(backbone_convs(graph))
    layers = sorted(layers if layers is not None else range(max(0, n - 4), n))
    ks = sorted(set(bias_ks if bias_ks is not None else [0] + [2 ** i for i in range(int(math.log2(n)) + 1)] + [n]))
    peak = lambda s: _peak(graph, s, recipe, range_ste)
    base = ir.SparseScheme("last")
    base_peak = peak(base)
    if base_peak > budget:
        raise BudgetError(f"even the classifier-only scheme needs {base_peak} bytes > budget {budget}; the smallest "
                          f"feasible budget is {base_peak} bytes ({base_peak / 1000:.1f} KB)", base_peak)
    res = SearchResult(base, base_peak, base_peak)

    def acc(s: ir.SparseScheme) -> float:
        res.evaluations += 1
        if score is not None:
            return float(score(s))
        assert proxy_x is not None and proxy_y is not None
        return _accuracy(graph, s, proxy_x, proxy_y, steps, lr, batch, seed)

    acc0 = acc(base)
    for k in ks:
        s = ir.SparseScheme(f"bias{k}", k)
        res.bias_cost[k] = max(0, peak(s) - base_peak)
        res.bias_gain[k] = 0.0 if k == 0 else acc(s) - acc0
    for i in layers:
        depth_peak = peak(ir.SparseScheme("depth", n - i))
        for r in ratios:
            res.weight_cost[(i, r)] = max(0, peak(ir.SparseScheme(f"w{i}@{r}", n - i, {i: r})) - depth_peak)
            res.weight_gain[(i, r)] = acc(ir.SparseScheme(f"w{i}@{r}", 0, {i: r})) - acc0
    slack = 0
    for _ in range(6):  # NOTE: costs are not exactly additive; shrink the capacity until the compiled plan fits
        best: tuple[float, ir.SparseScheme] | None = None
        for k in ks:
            cap = (budget - base_peak - res.bias_cost[k] - slack) // unit
            if cap < 0:
                continue
            allowed = [i for i in layers if i >= n - k]
            groups = [[(res.weight_gain[(i, r)], math.ceil(res.weight_cost[(i, r)] / unit), r) for r in ratios
                       if res.weight_gain[(i, r)] > 0] for i in allowed]
            gain, picks = _knapsack(groups, int(cap))
            gain += res.bias_gain[k]
            if best is None or gain > best[0] + 1e-12:
                wr = {i: r for i, r in zip(allowed, picks) if r}
                best = (gain, ir.SparseScheme(f"auto-{budget}", k, wr))
        if best is None:
            break
        got = peak(best[1])
        if got <= budget:
            res.scheme, res.peak_sram_bytes = best[1], got
            return res
        slack += got - budget
    return res  # the classifier-only scheme fits (checked above)
