"""Host-only prototypes from the int8-vs-fp32 diagnosis: half-to-even error-gradient rounding, finer bias buffers."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.engine import Trainer
from device_agent.engine.qmath import dyn_requant, rshift_round, rshift_round_even
from device_agent.engine.recipe import Recipe
from tests.fixtures.tiny import tiny_dataset, tiny_plan


def test_rshift_round_even_by_hand():
    x = np.array([-7, -5, -3, -1, 1, 3, 5, 7, -4, 4, 6])
    # /2: -3.5 -2.5 -1.5 -0.5 0.5 1.5 2.5 3.5 -2 2 3 -> ties to the even neighbour
    assert rshift_round_even(x, 1).tolist() == [-4, -2, -2, 0, 0, 2, 2, 4, -2, 2, 3]
    assert rshift_round(x, 1).tolist() == [-3, -2, -1, 0, 1, 2, 3, 4, -2, 2, 3]  # half up: biased upwards
    assert rshift_round_even(np.array([6, -6]), 2).tolist() == [2, -2]  # 1.5 -> 2, -1.5 -> -2
    assert rshift_round_even(np.array([3, -3]), -2).tolist() == [12, -12]  # shift <= 0 shifts left


def test_rshift_round_even_differs_from_half_up_only_on_ties_and_is_unbiased():
    rng = np.random.default_rng(0)
    x = rng.integers(-2**20, 2**20, 20000)
    for s in (1, 3, 7):
        a, b = rshift_round_even(x, s), rshift_round(x, s)
        ties = (x & ((1 << s) - 1)) == (1 << (s - 1))
        assert np.array_equal(a[~ties], b[~ties])
        assert np.all(np.abs(a[ties] - b[ties]) <= 1)
        v = np.arange(-(1 << 12), 1 << 12)  # every residue equally often: the mean error is 0 only for even
        assert (rshift_round_even(v, s) * (1 << s) - v).mean() == 0
        assert (rshift_round(v, s) * (1 << s) - v).mean() > 0


def test_dyn_requant_even_keeps_the_range_rule():
    acc = np.array([[254, -254, 3, 1]], np.int64)
    g, e = dyn_requant(acc, 0, even=True)
    assert g.tolist() == [[127, -127, 2, 0]] and e.tolist() == [1]  # 1.5 -> 2, 0.5 -> 0
    g, e = dyn_requant(acc, 0)
    assert g.tolist() == [[127, -127, 2, 1]] and e.tolist() == [1]


def _run(**kw) -> str:
    plan = tiny_plan(seed=0)
    x, y = tiny_dataset(24, seed=1)
    tr = Trainer(plan, **kw)
    for i in range(0, 24, 4):
        tr.train_step(x[i:i + 4], y[i:i + 4], 0.05)
    return tr.state_hash()


def test_trainer_defaults_are_the_spec_and_the_options_change_the_run():
    assert _run() == _run(grad_rounding="half_up")
    assert _run(grad_rounding="half_even") != _run()
    rec = Recipe(accum_steps=2, momentum=0.5, frac_bits=8)
    assert _run(recipe=rec) == _run(recipe=rec, bias_acc_bits=4)
    assert _run(recipe=rec, bias_acc_bits=12) != _run(recipe=rec)


@pytest.mark.parametrize("kw", [{"grad_rounding": "even"}, {"bias_acc_bits": 17}, {"bias_acc_bits": 2.0}])
def test_trainer_refuses_bad_options(kw):
    with pytest.raises(ValueError):
        Trainer(tiny_plan(seed=0), **kw)
