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


@pytest.mark.parametrize("data, message", [
    ({"personalization": {"method": "fedavg"}}, "personalization.method: expected one of"),
    ({"personalization": {"ditto_lambda": 2}}, "personalization.ditto_lambda: must be in [0, 1]"),
    ({"personalization": {"device_sram": [0]}}, "personalization.device_sram"),
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
