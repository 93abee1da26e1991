"""`backend: python` devices in worker processes, `backend: ray` devices in Ray actors, and deltas summed by
aggregation workers give the same run as devices on the runner's threads and one coordinator process."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import ROOT, require, require_cmd


def _run(workers: int, backend: str = "python", aggregation_workers: int = 0):
    from fleet.sim.config import load_sim_config
    from fleet.sim.runner import run_simulation

    cfg = load_sim_config(ROOT / "configs" / "quickstart.yaml", devices=4, rounds=2, local_steps=15, workers=workers,
                          deadline=900, backend=backend,  # NOTE: deadline: rounds close on every delta
                          aggregation_workers=aggregation_workers)
    cfg.model.pretrain_epochs = 1
    return run_simulation(cfg, progress=False)


@pytest.mark.parametrize("backend", ["python", "ray"])
def test_worker_processes_match_threads_bit_for_bit(backend):
    require_cmd("mosquitto")
    if backend == "ray":
        require(importlib.util.find_spec("ray") is not None, "Ray not installed (make setup installs it)")
    threads, procs = _run(0), _run(2, backend)

    assert procs.round_status == threads.round_status == ["committed", "committed"]
    assert not procs.errors and not threads.errors
    # same deltas (sizes), same aggregated models (accuracies), same personal tensors on every device
    assert procs.payload_up_per_device_round == threads.payload_up_per_device_round
    assert procs.accuracy_per_round == threads.accuracy_per_round
    assert procs.accuracy_personalized_per_round == threads.accuracy_personalized_per_round
    assert [d["accuracy_personalized"] for d in procs.per_device] == \
        [d["accuracy_personalized"] for d in threads.per_device]


def test_aggregation_workers_commit_the_models_one_coordinator_commits():
    require_cmd("mosquitto")
    alone, pooled = _run(0), _run(0, aggregation_workers=2)

    assert pooled.round_status == alone.round_status == ["committed", "committed"]
    assert not pooled.errors
    assert pooled.accuracy_per_round == alone.accuracy_per_round
    assert pooled.payload_up_per_device_round == alone.payload_up_per_device_round
    # the run says who summed: two live workers, every accepted delta summed by one of them
    assert alone.aggregation == {} and pooled.aggregation["workers"] == 2 and pooled.aggregation["restarts"] == 0
    assert sum(pooled.aggregation["summed"]) == sum(pooled.devices_per_round)
