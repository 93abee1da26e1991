"""Named schemes (YAML ladders, variants) and the contribution-analysis + knapsack search on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_agent.engine import ir
from fleet.compiler.compile import BudgetError, compile_full
from fleet.compiler.models import TinyCNN
from fleet.compiler.scheme import PAPER_SCHEMES, _knapsack, load_schemes, named_scheme, search_scheme
from fleet.compiler.torch_import import import_torch
from fleet.compiler.training import SchemeError


@pytest.fixture(scope="module")
def graph() -> ir.Graph:
    torch.manual_seed(0)
    return import_torch(TinyCNN().eval(), torch.randn(64, 1, 28, 28))


def test_paper_ladder_loads():
    if not PAPER_SCHEMES.exists():
        pytest.skip(f"{PAPER_SCHEMES} absent")
    s = load_schemes(PAPER_SCHEMES)["mbv2-w0.35"]["99kb"]
    assert s.n_bias_update == 25 and s.weight_ratio[27] == 1.0 and s.weight_ratio[42] == 0.125
    zero = load_schemes(PAPER_SCHEMES)["mbv2-w0.35"]["49kb"]
    assert 40 not in zero.weight_ratio  # ratio 0 means no weight update


def test_variants_and_our_yaml(graph):
    assert named_scheme(graph, "full").weight_ratio == {i: 1.0 for i in range(6)}
    assert named_scheme(graph, "bias").n_bias_update == 6 and not named_scheme(graph, "bias").weight_ratio
    assert named_scheme(graph, "last").n_bias_update == 0
    q = named_scheme(graph, "quarter")  # configs/schemes/torch-models.yaml, model = graph name
    assert q.weight_ratio == {4: 1.0, 5: 0.25}
    with pytest.raises(SchemeError, match="TinyCNN:tail"):
        named_scheme(graph, "nope")


def test_knapsack_is_exact():
    # two layers; capacity 5: (gain 3, cost 4) alone loses to (2, 2) + (2, 3)
    gain, picks = _knapsack([[(3.0, 4, 1.0), (2.0, 2, 0.5)], [(2.0, 3, 0.25)]], 5)
    assert gain == 4.0 and picks == [0.5, 0.25]
    assert _knapsack([[(1.0, 9, 1.0)]], 5) == (0.0, [0.0])


def test_search_fits_the_budget_and_refuses_the_impossible(graph):
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(32, 1, 28, 28)).astype(np.int8)
    y = (x[:, 0, :14].astype(np.int64).sum(axis=(1, 2)) > 0).astype(np.int64)
    base = compile_full(graph, ir.SparseScheme("last"), serialize=False).report.peak_sram_bytes
    budget = base + 4000
    res = search_scheme(graph, budget, x, y, layers=[4, 5], bias_ks=[0, 2], ratios=(0.5, 1.0), steps=2, batch=8,
                        unit=100)
    assert res.peak_sram_bytes <= budget
    assert compile_full(graph, res.scheme, serialize=False).report.peak_sram_bytes == res.peak_sram_bytes
    assert set(res.weight_cost) == {(4, 0.5), (4, 1.0), (5, 0.5), (5, 1.0)}
    with pytest.raises(BudgetError) as e:
        search_scheme(graph, base - 1, x, y, layers=[5], bias_ks=[0], steps=1)
    assert e.value.required == base


def test_search_prices_the_recipes_optimizer_state(graph):
    # Prepare: a scorer that values weights by their count (so the knapsack wants as many as fit), a stateful
    # recipe (int32 momentum buffer + int16 residual per trained weight) and a budget the default step could fill
    from device_agent.engine.recipe import Recipe

    rec = Recipe(accum_steps=4, momentum=0.9, frac_bits=16)
    seen: list[str] = []

    def score(s: ir.SparseScheme) -> float:
        seen.append(s.name)
        return s.n_bias_update + sum(10 * r * (i + 1) for i, r in s.weight_ratio.items())

    base = compile_full(graph, ir.SparseScheme("last"), serialize=False, recipe=rec).report.peak_sram_bytes
    budget = base + 6000
    kw = {"layers": [4, 5], "bias_ks": [0, 2], "ratios": (0.5, 1.0), "unit": 100, "score": score}
    # Execute
    plain = search_scheme(graph, budget, None, None, **kw)
    stateful = search_scheme(graph, budget, None, None, recipe=rec, **kw)
    # Assert: the recipe's plan fits the budget with its optimizer state, and buys less than the default step
    rep = compile_full(graph, stateful.scheme, serialize=False, recipe=rec).report
    assert rep.peak_sram_bytes == stateful.peak_sram_bytes <= budget and rep.optimizer_bytes > 0
    no_state = compile_full(graph, plain.scheme, serialize=False, recipe=rec).report.peak_sram_bytes
    assert no_state > budget, "the default step's choice would not fit with the recipe's state"
    assert stateful.evaluations == plain.evaluations == 1 + 1 + 4 and seen.count("last") == 2
    with pytest.raises(ValueError, match="proxy data"):
        search_scheme(graph, budget, None, None, layers=[5], bias_ks=[0])
