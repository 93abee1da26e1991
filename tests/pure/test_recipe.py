"""Training recipe (opt-in): schedule integers, residual rounding, momentum, accumulation at batch 1, memory."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from device_agent.engine import Trainer
from device_agent.engine.recipe import (
    ACC_BITS_W,
    COS_Q15,
    Recipe,
    apply_bias,
    apply_weight,
    fixed_delta,
    lr_factor_q15,
    momentum_decay,
    scaled_lr,
)
from tests.fixtures.tiny import tiny_dataset, tiny_plan

QUARTER = 1 << (ACC_BITS_W - 2)  # 0.25 weight LSB in accumulator units


@pytest.fixture(scope="module")
def plan():
    return tiny_plan(seed=0)


def test_schedule_warmup_is_linear_then_cosine_to_floor():
    # Prepare
    r = Recipe(warmup=4, total=12, lr_min_q15=3277)
    # Execute
    f = [lr_factor_q15(u, r) for u in range(14)]
    # Assert: (u+1)/4 during warm-up, 1 at its end, cos midpoint ~ (1 + floor)/2 at u = 8, the floor from u = 12 on
    assert f[:5] == [8192, 16384, 24576, 32768, 32768]
    assert f[8] == 3277 + ((32768 - 3277) * COS_Q15[32] + (1 << 14) >> 15) == 18023
    assert f[12] == f[13] == 3277
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))


def test_constant_schedule_and_zero_factor():
    assert lr_factor_q15(10**6, Recipe()) == 32768
    assert scaled_lr(16384, -14, 0) is None
    assert scaled_lr(20000, -20, 32768) == (20000, -20)  # factor 1 keeps the learning rate exactly
    assert scaled_lr(16384, -14, 16384) == (16384, -15)  # 0.5 x 1.0


def test_residual_keeps_quarter_lsb_updates_that_rounding_loses():
    # Prepare: four updates of 0.25 LSB on w = 3
    w, frac = np.array([3], np.int8), np.array([0], np.int8)
    v = np.array([QUARTER])
    # Execute
    seen = []
    for _ in range(4):
        w, frac = apply_weight(w, frac, v, 8, 0, 1)
        seen.append((int(w[0]), int(frac[0])))
    # Assert: by hand, t = 3 - 0.25 k: w = round half up, frac = the rest in 1/256 LSB
    assert seen == [(3, -64), (3, -128), (2, 64), (2, 0)]
    # and without a residual, deterministic rounding would have kept w = 3 (the update is below half an LSB)
    assert int(np.round(3 - 0.25)) == 3


def test_residual_saturates_with_the_weight():
    w, frac = apply_weight(np.array([127], np.int8), np.array([0], np.int16), np.array([-(5 << ACC_BITS_W)]), 16, 0, 1)
    assert int(w[0]) == 127 and int(frac[0]) == (1 << 15) - 1


def test_momentum_and_bias_fixed_point_by_hand():
    assert momentum_decay(np.array([1000, -3]), 16384).tolist() == [500, -1]  # -1.5 rounds half up
    assert momentum_decay(np.array([7]), 0).tolist() == [0]
    assert apply_bias(np.array([100], np.int32), np.array([6144])).tolist() == [98]  # 6144 / 4096 = 1.5 -> 2
    # fixed_delta: acc 3 * mult 16384 * 2**-14 = 3 LSB -> 3 * 2**16 units
    assert fixed_delta(np.array([3]), np.array([16384]), np.array([-14]), 16).tolist() == [3 << 16]


def test_recipe_rejects_bad_options():
    with pytest.raises(ValueError, match="frac_bits"):
        Recipe(frac_bits=4)
    with pytest.raises(ValueError, match="warmup/total"):
        Recipe(warmup=10, total=5)
    with pytest.raises(ValueError, match="accum_steps"):
        Recipe(accum_steps=0)


def _run(plan, recipe, x, y, chunks):
    tr = Trainer(plan, recipe=recipe)
    i = 0
    for c in chunks:
        tr.train_step(x[i:i + c], y[i:i + c], 0.05)
        i += c
    return tr


@pytest.mark.parametrize("frac_bits,momentum", [(0, 0.0), (8, 0.9), (16, 0.5)])
def test_accumulation_in_one_batch_equals_batch_one_steps(plan, frac_bits, momentum):
    # Prepare
    x, y = tiny_dataset(12, seed=5)
    r = Recipe(accum_steps=4, frac_bits=frac_bits, momentum=momentum, warmup=1, total=5)
    # Execute: 12 device steps at batch 1, the same 12 samples as 4+4+4 and as 3+5+4 (crossing boundaries)
    ones = _run(plan, r, x, y, [1] * 12)
    fours = _run(plan, r, x, y, [4, 4, 4])
    odd = _run(plan, r, x, y, [3, 5, 4])
    # Assert: identical bits, state and update counters; 3 updates were applied
    assert ones.state_hash() == fours.state_hash() == odd.state_hash()
    assert ones.step == fours.step == odd.step == 3
    assert ones.state_hash() != Trainer(plan).state_hash()
    for key, v in ones.opt_state.items():
        np.testing.assert_array_equal(v, odd.opt_state[key])


def test_weights_hold_still_until_the_accumulation_boundary(plan):
    x, y = tiny_dataset(4, seed=6)
    tr = Trainer(plan, recipe=Recipe(accum_steps=4, frac_bits=8))
    h0 = tr.state_hash()
    tr.train_step(x[:3], y[:3], 0.05)
    assert tr.state_hash() == h0 and tr.pending == 3 and tr.step == 0
    tr.train_step(x[3:], y[3:], 0.05)
    assert tr.state_hash() != h0 and tr.pending == 0 and tr.step == 1


def test_recipe_learns_the_tiny_task(plan):
    # Prepare
    x, y = tiny_dataset(512, seed=1)
    xt, yt = tiny_dataset(256, seed=2)
    # Execute: batch-1 device steps, accumulation 8, momentum, residuals, warm-up + cosine
    tr = _run(plan, Recipe(accum_steps=8, momentum=0.9, frac_bits=8, warmup=4, total=64), x, y, [8] * 64)
    # Assert: 4 classes, chance 0.25
    assert tr.evaluate(xt, yt) >= 0.8


def test_state_bytes_count_each_buffer():
    assert Recipe().state_bytes(100, 10) == 0
    assert Recipe(frac_bits=16).state_bytes(100, 10) == 200
    assert Recipe(momentum=0.9).state_bytes(100, 10) == 440  # the momentum buffer
    assert Recipe(accum_steps=2).state_bytes(100, 10) == 440  # the accumulator
    assert Recipe(accum_steps=2, momentum=0.9, frac_bits=8).state_bytes(100, 10) == 540  # one buffer serves both


def test_memory_report_counts_optimizer_state(plan):
    # Prepare: the tiny plan trains conv1 (8,8,3,3) on k=4 inputs, depthwise conv2 (8,1,3,3) on k=4, fc (4,8)
    import copy

    from fleet.compiler.memory import memory_report, optimizer_bytes, trained_elements
    from fleet.compiler.planner import plan_arena

    p = copy.deepcopy(plan)
    nw, nb = 8 * 4 * 9 + 4 * 9 + 4 * 8, 8 + 8 + 4
    layout = plan_arena(p)
    r = Recipe(accum_steps=4, momentum=0.9, frac_bits=16)
    # Execute
    base, rep = memory_report(p, layout), memory_report(p, layout, recipe=r)
    # Assert
    assert trained_elements(p) == (nw, nb)
    assert optimizer_bytes(p, r) == rep.optimizer_bytes == 6 * nw + 4 * nb
    assert rep.peak_sram_bytes - base.peak_sram_bytes == rep.optimizer_bytes and base.optimizer_bytes == 0


def test_plan_carried_recipe_trains_like_the_explicit_one(plan):
    # Prepare
    import copy

    from device_agent.engine.recipe import check_plan_recipe, plan_recipe, with_recipe
    from device_agent.wire.envelope import Verifier
    from device_agent.wire.plan import plan_from_bytes, plan_to_bytes
    from fleet.compiler.planner import plan_arena

    p = copy.deepcopy(plan)
    plan_arena(p)
    r = Recipe(accum_steps=3, momentum=0.9, frac_bits=16, warmup=2, total=6, lr_min_q15=1000)
    carried = plan_from_bytes(plan_to_bytes(with_recipe(p, r)), verify=Verifier.unsigned())
    x, y = tiny_dataset(8, seed=4)
    # Execute: 7 samples at batch 1 (two applied updates, one pending) with either form
    a, b = Trainer(carried), Trainer(p, recipe=r)
    for i in range(7):
        a.train_step(x[i:i + 1], y[i:i + 1], 0.05)
        b.train_step(x[i:i + 1], y[i:i + 1], 0.05)
    # Assert
    assert a.state_hash() == b.state_hash() and a.step == b.step == 2 and a.pending == 1
    assert Trainer(carried, recipe=r.normalized()).recipe == plan_recipe(carried).recipe
    with pytest.raises(ValueError, match="conflicts"):
        Trainer(carried, recipe=Recipe(accum_steps=2))
    assert with_recipe(p, Recipe()) is p  # an inactive recipe is the default step: no section
    bad = copy.deepcopy(carried)
    object.__setattr__(bad.recipe.slots[0], "wbuf_off", 4)
    with pytest.raises(ValueError, match="canonical"):
        check_plan_recipe(bad)


def test_firmware_cos_table_is_the_reference_one():
    # the C table is copied verbatim (docs/engine.md): parse firmware/src/runtime/tf_recipe.c
    import re
    from pathlib import Path

    from device_agent.engine.recipe import COS_Q15

    src = (Path(__file__).resolve().parents[2] / "firmware" / "src" / "runtime" / "tf_recipe.c").read_text()
    body = re.search(r"tf_cos_q15\[65\] = \{([^}]*)\}", src)
    assert body is not None
    assert tuple(int(v) for v in body.group(1).replace("\n", " ").split(",") if v.strip()) == COS_Q15


def test_recipe_refuses_embedding_plans():
    from device_agent.engine.recipe import with_recipe
    from tests.fixtures.tiny import tiny_text_plan

    with pytest.raises(ValueError, match="EMBEDDING_UPDATE"):
        with_recipe(tiny_text_plan(seed=1), Recipe(accum_steps=2))
