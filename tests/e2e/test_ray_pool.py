"""Host devices in Ray actors (fleet/sim/ray_pool.py) train bit-identically to in-process devices, on a local Ray
instance started for the test."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from device_agent import protocol as dp
from device_agent.buffer import SampleBuffer
from device_agent.engine.trainer import Trainer
from fleet.compiler.pipeline import mark_personal
from fleet.sim.workers import WorkerError
from tests.conftest import require
from tests.fixtures.tiny import tiny_plan
from tests.pure.test_workers import N, run_fleet, samples


@pytest.fixture(scope="module")
def plan():
    p = tiny_plan()
    return mark_personal(p, [p.trainable[-1].name])  # one personal tensor: it must stay in the actor, trained


@pytest.fixture(scope="module")
def pool(plan):
    require(importlib.util.find_spec("ray") is not None, "Ray not installed (make setup installs the "
                                                         "flower-simulation extra)")
    from fleet.sim.ray_pool import RayPool

    pool = RayPool(2, plan)
    yield pool
    pool.close()


def test_ray_devices_are_bit_identical_to_in_process(plan, pool):
    def local(i, did, verifier):
        x, y = samples(i)
        buf = SampleBuffer(len(y), x.shape[1:], np.int8, seed=100 + i)
        buf.add(x, y)
        return dp.DeviceProtocol(dp.Identity(did, "stm32f746", 320_000, 1_000_000), plan, Trainer(plan),
                                 dp.WireDeviceCodec(plan, verifier), buf, seed=i)

    def remote(i, did, verifier):
        x, y = samples(i)
        return pool.device(i, dp.Identity(did, "stm32f746", 320_000, 1_000_000), verifier, x, y,
                           (len(y), x.shape[1:], np.int8, 100 + i), seed=i)

    state_a, deltas_a, devs_a = run_fleet(plan, local)
    state_b, deltas_b, devs_b = run_fleet(plan, remote)
    assert len(deltas_a) == 2 * N and deltas_a == deltas_b  # every delta byte for byte, in the same order
    assert all(np.array_equal(state_a[k], state_b[k]) for k in state_a)
    assert state_a[plan.trainable[0].id].any()  # it trained
    for a, b in zip(devs_a, devs_b):  # personal tensors: trained in the actor, readable by the harness
        assert a.trainer.state_hash() == b.trainer.state_hash() and b.version == a.version >= 2
    assert sorted({b.worker for b in devs_b}) == [0, 1]


def test_ray_errors_name_the_cause(plan, pool):
    from fleet.sim.ray_pool import RayPool

    with pytest.raises(ValueError, match="at least 1 Ray actor"):
        RayPool(0, plan)
    with pytest.raises(WorkerError, match="not one of"):
        pool.request(0, "call", 0, "trainer.load_trainable", ({},))
    with pytest.raises(WorkerError, match="KeyError"):
        pool.request(1, "call", 12345, "status", ())
