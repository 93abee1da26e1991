"""Trainer on the hand-built tiny plan: learning, mini-batch rules, determinism, state I/O and switches."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.engine import StepStats, Trainer, ir, run_forward
from tests.fixtures.tiny import tiny_dataset, tiny_plan, tiny_text_dataset, tiny_text_plan


@pytest.fixture(scope="module")
def plan() -> ir.Plan:
    return tiny_plan(seed=0)


def test_training_improves_accuracy_well_above_chance(plan):
    # Prepare
    x, y = tiny_dataset(512, seed=1)
    xt, yt = tiny_dataset(256, seed=2)
    tr = Trainer(plan)
    before = tr.evaluate(xt, yt)
    # Execute
    stats = [tr.train_step(x[i:i + 8], y[i:i + 8], 0.05) for i in range(0, 512, 8)]
    after = tr.evaluate(xt, yt, batch=100)
    # Assert: 4 classes, chance 0.25
    assert after >= 0.8 and after > before + 0.2
    assert np.mean([s.loss for s in stats[-8:]]) < np.mean([s.loss for s in stats[:8]])
    assert tr.step == 64


def test_batch_values_equal_per_sample_values(plan):
    # Prepare
    x, y = tiny_dataset(3, seed=4)
    batch = Trainer(plan).trace_step(x, y, 0.05)
    # Execute
    singles = [Trainer(plan).trace_step(x[i:i + 1], y[i:i + 1], 0.05) for i in range(3)]
    # Assert: forward values and gradients (values and exponents) are per-sample computations
    for tid, v in batch.values.items():
        if plan.tensors[tid].kind in (ir.Kind.TRAINABLE, ir.Kind.CONST):
            continue
        assert (v == np.concatenate([s.values[tid] for s in singles])).all(), plan.tensors[tid].name
    for tid, e in batch.exps.items():
        assert e.tolist() == [int(s.exps[tid][0]) for s in singles]
    assert batch.stats.correct == sum(s.stats.correct for s in singles)


def test_batch_of_one_sample_twice_equals_single_device_step(plan):
    # Prepare: lr / 2 keeps the mantissa, so two identical samples must give the device's N = 1 step bit-exactly
    x, y = tiny_dataset(1, seed=5)
    single, double = Trainer(plan), Trainer(plan)
    # Execute
    for _ in range(3):
        single.train_step(x, y, 0.05)
        double.train_step(np.repeat(x, 2, 0), np.repeat(y, 2), 0.05)
    # Assert
    assert single.state_hash() == double.state_hash()
    assert single.state_hash() != Trainer(plan).state_hash()


def test_state_hash_deterministic_and_state_roundtrip(plan):
    # Prepare
    x, y = tiny_dataset(16, seed=6)
    a, b = Trainer(plan), Trainer(plan)
    fresh = a.state_hash()
    # Execute
    for tr in (a, b):
        for i in range(0, 16, 4):
            tr.train_step(x[i:i + 4], y[i:i + 4], 0.05)
    saved = a.trainable_state()
    saved_hash = a.state_hash()
    a.train_step(x[:4], y[:4], 0.05)
    moved = a.state_hash()
    a.load_trainable(saved)
    # Assert
    assert a.state_hash() == saved_hash == b.state_hash() != fresh
    assert moved != saved_hash
    assert len(fresh) == 64 and set(saved) == {t.id for t in plan.trainable}
    next(iter(saved.values()))[...] = 0  # a copy: editing it changes nothing
    assert a.state_hash() == saved_hash


def test_plan_is_untouched_and_predict_agrees_with_run_forward(plan):
    # Prepare
    before = {t.id: t.data.copy() for t in plan.trainable}
    x, y = tiny_dataset(32, seed=7)
    tr = Trainer(plan)
    # Execute
    tr.train_step(x, y, 0.1)
    logits = run_forward(plan, x, params=tr.trainable_state())
    # Assert
    assert all((t.data == before[t.id]).all() for t in plan.trainable)
    assert (tr.predict(x) == logits.reshape(32, -1).argmax(1)).all()
    assert (tr.logits(x) == logits).all()


def test_global_switches_skip_weight_or_bias_updates(plan):
    # Prepare
    x, y = tiny_dataset(8, seed=8)
    weights = [t.id for t in plan.trainable if t.dtype == ir.DType.INT8]
    biases = [t.id for t in plan.trainable if t.dtype == ir.DType.INT32]
    bias_only = Trainer(plan, update_weight=False)
    weight_only = Trainer(plan, update_bias=False)
    # Execute
    bias_only.train_step(x, y, 0.1)
    weight_only.train_step(x, y, 0.1)
    # Assert
    bo, wo = bias_only.trainable_state(), weight_only.trainable_state()
    assert all((bo[i] == plan.tensors[i].data).all() for i in weights)
    assert any((bo[i] != plan.tensors[i].data).any() for i in biases)
    assert all((wo[i] == plan.tensors[i].data).all() for i in biases)
    assert any((wo[i] != plan.tensors[i].data).any() for i in weights)


def test_step_counter_wraps_as_uint32(plan):
    # Prepare
    x, y = tiny_dataset(1, seed=9)
    tr = Trainer(plan)
    tr.step = 0xFFFFFFFF
    # Execute
    stats = tr.train_step(x, y, 0.05)
    # Assert
    assert tr.step == 0
    assert isinstance(stats, StepStats) and stats.n == 1 and stats.loss > 0


def test_user_errors_are_specific(plan):
    # Prepare
    x, y = tiny_dataset(4, seed=10)
    tr = Trainer(plan)
    # Execute / Assert
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        tr.train_step(x, y + 4, 0.05)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        tr.train_step(x, y[:3], 0.05)
    with pytest.raises(ValueError, match="learning rate"):
        tr.train_step(x, y, -1.0)
    with pytest.raises(KeyError, match="not trainable"):
        tr.load_trainable({plan.input_id: x})
    wid = plan.trainable[0].id
    with pytest.raises(ValueError, match="expects int8"):
        tr.load_trainable({wid: np.zeros(3, np.int8)})


def test_embedding_plan_trains_table_and_classifier():
    # Prepare
    plan = tiny_text_plan()
    x, y = tiny_text_dataset(400, seed=1)
    xt, yt = tiny_text_dataset(300, seed=2)
    tr = Trainer(plan)
    table = next(t for t in plan.trainable if t.name == "emb.table")
    before = tr.evaluate(xt, yt)
    # Execute
    for i in range(0, 400, 4):
        tr.train_step(x[i:i + 4], y[i:i + 4], 0.1)
    # Assert: 3 classes, chance 1/3; the keyword rows of the table moved
    assert tr.evaluate(xt, yt) >= 0.85 > before + 0.3
    moved = (tr.trainable_state()[table.id] != table.data).any(axis=1)
    assert moved[:3].all()
