"""The simulator's replay of personalization methods, new users and prequential evaluation (fleet/sim/
personalize.py) on the tiny plan, and the config fields that drive it."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.engine.trainer import Trainer
from fleet.config import ConfigError, from_dict
from fleet.sim import personalize as ps
from fleet.sim.baselines import DeviceSlice
from fleet.sim.config import SimConfig
from tests.fixtures.tiny import tiny_dataset, tiny_plan

METHODS = ["ditto", "finetune", "head", "bias"]


@pytest.fixture(scope="module")
def setup():
    plan = tiny_plan()
    slices = []
    for i in range(4):
        x, y = tiny_dataset(48, seed=10 + i)
        y = y.astype(np.int32)
        slices.append(DeviceSlice(f"d{i}", x[:32], y[:32], x[32:], y[32:]))
    initial = Trainer(plan).trainable_state()
    # three "global models": the initial one trained a little further each round on device 0's data
    t, globals_ = Trainer(plan), []
    for r in range(3):
        for k in range(8):
            t.train_step(slices[0].x_train[k * 4:(k + 1) * 4], slices[0].y_train[k * 4:(k + 1) * 4], 0.1)
        globals_.append(t.trainable_state())
    p = ps.Plain(local_steps=6, lr=0.1, steps=6, personal_lr=0.1, lam_q15=3277, seed=0)
    return plan, slices, initial, globals_, p


def test_compare_methods_measures_every_model_per_device(setup):
    plan, slices, initial, globals_, p = setup
    got = ps.compare_methods(plan, initial, globals_, slices, METHODS, p)
    assert set(got) == {"global", "local", *METHODS}
    assert all(len(v) == 4 and all(0 <= a <= 1 for a in v) for v in got.values())
    # global: the last global model, evaluated as is
    t = Trainer(plan)
    t.load_trainable(globals_[-1])
    assert got["global"] == [t.evaluate(d.x_test, d.y_test) for d in slices]
    assert len({tuple(v) for v in got.values()}) > 2  # the models differ
    assert ps.compare_methods(plan, initial, globals_, slices, METHODS, p) == got  # deterministic


def test_new_users_start_from_the_global_model(setup):
    plan, slices, initial, globals_, p = setup
    got = ps.new_users(plan, initial, globals_[-1], slices[:2], ["finetune", "ditto"], steps=0, p=p)
    assert got["finetune"] == got["ditto"] == got["global"]  # zero steps: the global model itself
    got = ps.new_users(plan, initial, globals_[-1], slices[:2], ["finetune"], steps=10, p=p)
    assert got["finetune"] != got["global"] and len(got["local"]) == 2


def test_prequential_policies_and_drift(setup):
    plan, slices, initial, globals_, p = setup
    fifo = ps.prequential(plan, initial, globals_, slices, [0, 1, 0, 1], ["finetune"], p, "fifo", capacity=4)
    res = ps.prequential(plan, initial, globals_, slices, [0, 1, 0, 1], ["finetune"], p, "reservoir", capacity=4)
    assert set(fifo["prequential"]) == {"global", "local", "finetune"}
    assert all(len(c) == 3 for c in fifo["prequential"].values())
    # round 1: every model is still the initial one, so they predict the first chunk alike
    assert len({c[0] for c in fifo["prequential"].values()}) == 1
    assert fifo["prequential"]["global"] == res["prequential"]["global"]  # the buffer does not touch it
    assert fifo["prequential"]["local"] != res["prequential"]["local"]  # it does touch the local model
    drift = ps.prequential(plan, initial, globals_, slices, [0, 1, 0, 1], ["finetune"], p, "fifo", drift=True)
    assert drift["drift_round"] == 2 and set(drift["forgetting"]) == {"global", "local", "finetune"}
    assert all(-1 <= v <= 1 for v in drift["forgetting"].values())
    assert ps._recovery([0.8, 0.5, 0.7, 0.76], 1) == 2 and ps._recovery([0.8, 0.1], 1) is None


def test_prequential_streams_in_time_order_whatever_the_storage_order(setup):
    plan, slices, initial, globals_, p = setup
    base = ps.prequential(plan, initial, globals_, slices, [0, 1, 0, 1], ["finetune"], p, "fifo", capacity=4)
    rng = np.random.default_rng(7)
    perms = [rng.permutation(len(d.y_train)) for d in slices]
    shuffled = [DeviceSlice(d.device_id, d.x_train[q], d.y_train[q], d.x_test, d.y_test) for d, q in zip(slices, perms)]
    # stored shuffled, with each sample's place in time recorded: the same stream, the same curves
    got = ps.prequential(plan, initial, globals_, shuffled, [0, 1, 0, 1], ["finetune"], p, "fifo", capacity=4,
                         times=perms)
    assert got == base
    # ... and without the times it is another stream (so the times are what restored it)
    assert ps.prequential(plan, initial, globals_, shuffled, [0, 1, 0, 1], ["finetune"], p, "fifo",
                          capacity=4) != base


@pytest.mark.parametrize("data, message", [
    ({"personalization": {"method": "fedavg"}}, "personalization.method: expected one of"),
    ({"personalization": {"ditto_lambda": 2}}, "personalization.ditto_lambda: must be in [0, 1]"),
    ({"personalization": {"device_sram": [0]}}, "personalization.device_sram"),
    ({"personalization": {"lr_grid": [0]}}, "personalization.lr_grid: expected a list of lr multipliers > 0"),
    ({"personalization": {"validation": "random"}},
     "personalization.validation: expected one of last, per_label, stored"),
    ({"personalization": {"validation_gap": -1}}, "personalization.validation_gap: must be a number of samples"),
    ({"devices": 4, "new_users": 4}, "new_users: must leave at least one fleet device"),
    ({"devices": 4, "new_users": [1, 1]}, "new_users: expected distinct device indices"),
    ({"continual": {"policies": ["lifo"]}}, "continual.policies"),
])
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(SimConfig, data, "cfg.yaml")


def test_new_user_indices():
    assert from_dict(SimConfig, {"devices": 6, "new_users": 2}, "c").new_user_indices() == [4, 5]
    assert from_dict(SimConfig, {"devices": 6, "new_users": [3, 0]}, "c").new_user_indices() == [0, 3]


def test_validation_split_is_the_tail_of_the_training_slice(setup):
    _, slices, *_ = setup
    val = ps.validation_split(slices, 0.25)
    for d, v in zip(slices, val):
        assert len(v.y_test) == 8 and len(v.y_train) == 24
        assert np.array_equal(v.x_test, d.x_train[24:]) and np.array_equal(v.x_train, d.x_train[:24])
    tiny = ps.validation_split([DeviceSlice("s", slices[0].x_train[:3], slices[0].y_train[:3],
                                            slices[0].x_test, slices[0].y_test)], 0.25)[0]
    assert len(tiny.y_train) == 3 and len(tiny.y_test) == 0  # too few samples to hold any back


def test_tune_lr_picks_from_the_grid_without_reading_test_data(setup):
    plan, slices, initial, globals_, p = setup
    chosen, scores, val = ps.tune_lr(plan, initial, globals_[:2], slices, ["head", "ditto"], p, grid=(0.5, 2.0))
    assert set(val) == {"global", "local", "head", "ditto"} and all(len(v) == 4 for v in val.values())
    assert set(chosen) == {"local", "head", "ditto"} and all(len(s) == 2 for s in scores.values())
    assert chosen["local"] in (0.05, 0.2) and chosen["head"] in (0.05, 0.2)
    for k, s in scores.items():  # the chosen lr has the best validation accuracy (ties: the smaller one)
        base = p.lr if k == "local" else p.personal_lr
        best = 0 if s[0] >= s[1] else 1
        assert chosen[k] == pytest.approx(base * (0.5, 2.0)[best])
    # the test slices are never read: garbage there changes nothing
    junk = [DeviceSlice(d.device_id, d.x_train, d.y_train, d.x_test[::-1] * 0, (d.y_test + 1) % 4) for d in slices]
    assert ps.tune_lr(plan, initial, globals_[:2], junk, ["head", "ditto"], p, grid=(0.5, 2.0)) == (
        chosen, scores, val)
    with pytest.raises(ValueError, match="lr grid"):
        ps.tune_lr(plan, initial, globals_, slices, ["head"], p, grid=(0.0,))
    # the choice is used: lr_of reads it, and compare_methods trains with it
    q = ps.Plain(**{**p.__dict__, "lr_by": chosen})
    assert q.lr_of("head") == chosen["head"] and q.lr_of("bias") == p.personal_lr


def test_with_tuned_lr_applies_the_rule_only_with_a_grid(setup):
    from dataclasses import replace

    plan, slices, initial, globals_, p = setup
    q, scores, val = ps.with_tuned_lr(plan, initial, globals_[:2], slices, ["head"], p)
    assert (q, scores) == (p, {})  # no grid: unchanged, and the validation replay at the configured lrs
    assert val == ps.compare_methods(plan, initial, globals_[:2], ps.validation_split(slices, 0.25), ["head"], p)
    q, scores, val = ps.with_tuned_lr(plan, initial, globals_[:2], slices, ["head"], replace(p, lr_grid=(0.5, 2.0)))
    chosen, expected, expected_val = ps.tune_lr(plan, initial, globals_[:2], slices, ["head"], p, grid=(0.5, 2.0))
    assert q.lr_by == chosen and scores == expected and val == expected_val and q.lr_grid == (0.5, 2.0)
    # the replays then train with the chosen lrs: the same numbers as a Plain carrying them by hand
    assert ps.compare_methods(plan, initial, globals_[:2], slices, ["head"], q) == ps.compare_methods(
        plan, initial, globals_[:2], slices, ["head"], replace(p, lr_by=chosen))


def test_select_per_device_picks_by_validation_and_prefers_the_cheap_end_on_ties():
    val = {"local": [0.5, 0.9, 0.7, None], "global": [0.5, 0.2, 0.7, None], "ditto": [0.6, 0.9, 0.1, None],
           "bias": [0.1, 0.2, 0.7, None]}
    choice = ps.select_per_device(val)
    # device 1: ditto and local tie -> ditto (personal model before training alone); device 2: global first
    assert choice == ["ditto", "ditto", "global", None]
    test = {"local": [1.0, 0.0, 0.0, 0.3], "global": [0.0, 0.1, 0.2, 0.4], "ditto": [0.5, 0.6, 0.7, 0.8],
            "bias": [0.0] * 4}
    assert ps.selected_accuracy(choice, test) == [0.5, 0.6, 0.2, 0.4]  # no validation data: the global model


def test_select_never_reads_test_data(setup):
    """The selection's only input is tune_lr's per-device validation numbers: garbage in the test slices leaves
    every device's choice unchanged; only the reported accuracy of the chosen model reads test data."""
    plan, slices, initial, globals_, p = setup
    junk = [DeviceSlice(d.device_id, d.x_train, d.y_train, d.x_test[::-1] * 0, (d.y_test + 1) % 4) for d in slices]
    picks = []
    for sl in (slices, junk):
        _, _, val = ps.tune_lr(plan, initial, globals_[:2], sl, METHODS, p, grid=(1.0, 3.0))
        picks.append(ps.select_per_device(val))
    assert picks[0] == picks[1] and all(c in {"global", "local", *METHODS} for c in picks[0])
    got = ps.compare_methods(plan, initial, globals_[:2], slices, METHODS, p)
    assert ps.selected_accuracy(picks[0], got) == [got[c][i] for i, c in enumerate(picks[0])]
