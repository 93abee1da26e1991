"""`tinyfleet serve` runs one round for every config in configs/, against a real broker, with host device agents.

Each config is served as shipped except for the fleet size (two devices, goal two), one round and a short
pretraining: the plan is built from the config's own scenario by the compiler pipeline, the devices get their
slice of that scenario as an .npz, and the round must commit both deltas. Where the config compiles a nested
plan family, one agent announces little SRAM: it must pick the plan the coordinator assigns it from plan/index
(a wrong pick fails its task as wrong_plan and the round misses its goal).
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, require_cmd
from tests.fixtures.serve import serve_with_agents

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
SMALL_SRAM = 33_000  # bytes: in a nested plan family (plan_budgets) below the full plan, above the smallest


def _small(name: str, port: int, tmp_path):
    data = yaml.safe_load((ROOT / "configs" / name).read_text())
    data.update(broker=f"mqtt://127.0.0.1:{port}", devices=2, goal=2, rounds=1, local_steps=5, deadline=90,
                over_selection=1.0)
    data["model"]["pretrain_epochs"] = min(1, data["model"].get("pretrain_epochs", 1))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", CONFIGS)
def test_serve_commits_one_round_for_every_shipped_config(name, tmp_path):
    require_cmd("mosquitto")
    from fleet.scenarios import load_scenario
    from fleet.schema import load_fleet_config
    from fleet.sim.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        # Prepare: the config, shrunk to two devices, and each device's own slice of the config's scenario
        path = _small(name, broker.port, tmp_path)
        cfg = load_fleet_config(path)
        for i, dev in enumerate(load_scenario(cfg).devices[:2]):
            np.savez(tmp_path / f"d{i}.npz", x=dev.x_train, y=dev.y_train)
        store = tmp_path / "store.sqlite"
        # Execute: serve compiles the plan, then two agents fetch it and train
        small = {0: ["--sram", str(SMALL_SRAM)]} if cfg.plan_budgets else None
        rc, err = serve_with_agents(path, store, [tmp_path / f"d{i}.npz" for i in range(2)], cfg.name, broker.port,
                                    timeout=240, agent_args=small)
    # Assert
    assert rc == 0, err
    assert "round 1: committed v2 (2 deltas)" in err


def test_serve_marks_the_configs_personal_tensors_in_the_plan(tmp_path):
    # Prepare
    from fleet.schema import load_fleet_config
    from fleet.serve import _plan

    path = tmp_path / "q.yaml"
    data = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    data["model"]["pretrain_epochs"] = 0
    path.write_text(yaml.safe_dump(data))
    cfg = load_fleet_config(path)
    # Execute
    plan = _plan(cfg, None)
    # Assert: the personal bias is trained on the device and never part of the shared update
    personal = [t.name for t in plan.trainable if t.personal]
    assert personal == ["classifier.bias"]
    assert any(not t.personal for t in plan.trainable)
