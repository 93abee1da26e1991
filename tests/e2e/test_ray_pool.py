"""Host devices in Ray actors (fleet/sim/ray_pool.py) train bit-identically to in-process devices, on a local Ray
instance started for the test."""

from __future__ import annotations

import importlib.util

import pytest

from fleet.compiler.pipeline import mark_personal
from fleet.sim.workers import WorkerError
from tests.conftest import require
from tests.fixtures.tiny import tiny_plan
from tests.pure.test_workers import assert_bit_identical


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
    assert_bit_identical(plan, pool)


def test_ray_errors_name_the_cause(plan, pool):
    from fleet.sim.ray_pool import RayPool

    with pytest.raises(ValueError, match="at least 1 Ray actor"):
        RayPool(0, plan)
    with pytest.raises(WorkerError, match="not one of"):
        pool.request(0, "call", 0, "trainer.load_trainable", ({},))
    with pytest.raises(WorkerError, match="KeyError"):
        pool.request(1, "call", 12345, "status", ())
