"""The keyboard (Shakespeare) and medical (heart) scenarios end to end, small: real configs, few devices/rounds.

Each runs ``tinyfleet simulate`` on its shipped config with only the sizes shrunk (embedded broker, host
devices) and checks that the fleet's model beats a trivial predictor on the devices' held-out slices and that
metrics.json carries every method (global, personalized, local-only, centralized, each personalization method,
new users) and the continual evaluation (prequential curves per buffer policy, the drift case).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import yaml

from tests.conftest import ROOT, require, require_cmd

METHODS = {"global", "personalized", "local", "centralized", "ditto", "finetune", "head", "bias", "select"}
NEW_USERS = {f"new_users_{m}" for m in ("global", "local", "ditto", "finetune", "head", "bias", "select")}


def _simulate(tmp_path, config: str, **changes) -> tuple[dict, dict]:
    require_cmd("mosquitto")
    cfg = yaml.safe_load((ROOT / "configs" / config).read_text())
    for key, value in changes.items():  # "dataset.window" -> cfg["dataset"]["window"]
        *path, last = key.split(".")
        node = cfg
        for p in path:
            node = node[p]
        node[last] = value
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fleet.cli", "simulate", str(tmp_path / "cfg.yaml"), "--json", "--quiet",
           "--out", str(run)]

    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == [] and result["round_status"] == ["committed"] * cfg["rounds"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["accuracy_mean_per_device"]) == METHODS | NEW_USERS
    fleet = cfg["devices"] - cfg["new_users"]
    assert len(metrics["per_device"]) == fleet == result["devices"] and len(result["new_users"]) == cfg["new_users"]
    assert all(r[f"accuracy_{m}"] is not None for r in metrics["per_device"] for m in METHODS)
    assert result["personal_methods"] == {cfg["personalization"]["method"]: fleet}
    # "select" (host-only): each device's pick by its own validation data, reported per device and counted
    picks = [r["select_choice"] for r in metrics["per_device"]]
    assert set(picks) <= {"global", "local", "ditto", "finetune", "head", "bias"}
    assert result["select_choices"] == {c: picks.count(c) for c in set(picks)}
    assert all(r["accuracy_select"] == r[f"accuracy_{r['select_choice']}"] for r in metrics["per_device"])
    # the methods are different models (not one number under four names)
    assert len({metrics["accuracy_mean_per_device"][m] for m in ("ditto", "finetune", "head", "bias")}) > 1
    runs = metrics["continual"]["runs"]
    assert [(r["policy"], "drift_round" in r) for r in runs] == [("fifo", False), ("reservoir", False),
                                                               ("fifo", True)]
    assert all(len(c) == cfg["rounds"] for r in runs for c in r["prequential"].values())
    assert set(runs[2]["forgetting"]) == {"global", "local", cfg["personalization"]["method"]}
    assert "prequential.png" in (run / "index.html").read_text() and (run / "personal.png").is_file()
    return result, metrics


def test_medical_heart_small(tmp_path):
    from fleet.scenarios.heart import load_heart_scenario

    try:
        sc = load_heart_scenario(4)
    except FileNotFoundError as e:
        require(False, str(e))
    y = np.concatenate([d.y_test for d in sc.devices])
    majority = max(y.mean(), 1 - y.mean())

    result, metrics = _simulate(tmp_path, "medical-heart.yaml", devices=5, rounds=2, goal=4, over_selection=1.0,
                                local_steps=10, new_users=1)

    assert [r["subject"] for r in metrics["per_device"]] == [0, 1, 2, 3]  # one device per hospital
    assert result["accuracy_per_round"][-1] > majority + 0.05, (result["accuracy_per_round"], majority)


def test_keyboard_shakespeare_small(tmp_path):
    from fleet.config import from_dict
    from fleet.scenarios import load_scenario
    from fleet.scenarios.text import DATA_DIR, SDIST
    from fleet.sim.config import SimConfig

    require((DATA_DIR / SDIST).is_file(), f"{DATA_DIR / SDIST} missing (run `make setup`)")
    small = {"devices": 4, "new_users": 1, "rounds": 2, "goal": 3, "over_selection": 1.0, "local_steps": 10,
             "personalization.steps": 10, "personalization.new_user_steps": 10, "continual.buffer_capacity": 16,
             "model.pretrain_epochs": 4, "dataset.proxy_users": 12, "dataset.max_proxy": 10000,
             "dataset.max_train_per_device": 100, "dataset.max_test_per_device": 60}

    result, metrics = _simulate(tmp_path, "keyboard-shakespeare.yaml", **small)

    cfg = from_dict(SimConfig, yaml.safe_load((tmp_path / "cfg.yaml").read_text()), "cfg.yaml")
    y = np.concatenate([d.y_test for d in load_scenario(cfg).devices])
    majority = np.bincount(y).max() / len(y)  # always predicting the commonest character (a space): ~0.2
    assert all(r["n_test"] == 60 for r in metrics["per_device"])
    # the int8 fleet model has learnt more than character frequencies (chance is 1/79)
    assert result["accuracy_per_round"][-1] > majority + 0.04, (result["accuracy_per_round"], majority)
