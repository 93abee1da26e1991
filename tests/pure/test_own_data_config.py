"""Own model and own data in the fleet config: every problem one error with its key path, before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleet.config import ConfigError
from fleet.scenarios import load_scenario
from fleet.schema import load_fleet_config
from fleet.sim.config import load_sim_config

MODEL = '''
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).relu().flatten(1))
'''


def _fleet(tmp_path, devices=2, shape=(1, 4, 4), labels=3, extra=""):
    """A config folder: own_net.py, dev/*.npz (float x, int y), proxy.npz, test.npz, weights.pt, fleet.yaml."""
    (tmp_path / "own_net.py").write_text(MODEL)
    (tmp_path / "dev").mkdir()
    rng = np.random.default_rng(0)
    for i in range(devices):
        np.savez(tmp_path / "dev" / f"d{i}.npz", x=rng.random((10, *shape), np.float32), y=np.arange(10) % labels)
    np.savez(tmp_path / "proxy.npz", x=rng.random((6, 1, 4, 4), np.float32), y=np.arange(6) % 3)
    np.savez(tmp_path / "test.npz", x=rng.random((6, 1, 4, 4), np.float32), y=np.arange(6) % 3)
    import importlib.util

    spec = importlib.util.spec_from_file_location("own_net_w", tmp_path / "own_net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.Net().state_dict(), tmp_path / "w.pt")
    (tmp_path / "fleet.yaml").write_text(
        f"devices: {devices}\nmodel: {{torch: 'own_net:Net', weights: w.pt, input_shape: [1, 4, 4]}}\n"
        "dataset: {devices: dev/, proxy: proxy.npz, test_fraction: 0.2}\nevaluation: {data: test.npz}\n" + extra)
    return tmp_path / "fleet.yaml"


def test_own_model_and_data_load_relative_to_the_config_without_pythonpath(tmp_path, monkeypatch):
    # Prepare: run from elsewhere; the model module is only next to the config
    path = _fleet(tmp_path)
    monkeypatch.chdir(tmp_path.parent)
    # Execute
    cfg = load_sim_config(path)
    sc = load_scenario(cfg)
    # Assert: the npz scenario, in the engine's layout, the last 20% of each device held out
    assert cfg.dataset.name == "npz" and cfg.model.root == str(tmp_path)
    assert len(sc.devices) == 2 and sc.input_shape == (1, 4, 4)
    assert [len(d.y_train) for d in sc.devices] == [8, 8] and [len(d.y_test) for d in sc.devices] == [2, 2]
    assert sc.x_proxy.shape == (6, 1, 4, 4) and sc.num_classes == 3


@pytest.mark.parametrize("break_it, message", [
    (lambda p: (p / "w.pt").unlink(), "model.weights: file not found"),
    (lambda p: (p / "proxy.npz").unlink(), "dataset.proxy: file not found"),
    (lambda p: (p / "test.npz").unlink(), "evaluation.data: file not found"),
    (lambda p: np.savez(p / "dev" / "d1.npz", x=np.zeros((4, 1, 5, 4), np.float32), y=np.zeros(4, int)),
     "dataset.devices: d1.npz: x has per-sample shape (1, 5, 4), model.input_shape is [1, 4, 4]"),
    (lambda p: np.savez(p / "dev" / "d0.npz", x=np.zeros((4, 1, 4, 4), np.float32), y=np.array([0, 1, 2, 7])),
     "dataset.devices: d0.npz: labels y in [0, 7] are outside the classifier's range [0, 3)"),
    (lambda p: np.savez(p / "dev" / "d0.npz", x=np.zeros((4, 1, 4, 4), np.int8), y=np.zeros(4, int)),
     "dataset.devices: d0.npz: x must be float samples"),
    (lambda p: np.savez(p / "test.npz", x=np.zeros((4, 1, 4, 4), np.float32)), "evaluation.data: test.npz: expected"),
    (lambda p: (p / "own_net.py").write_text("x = 1\n"), "model.torch: cannot load 'own_net:Net': module 'own_net'"),
    (lambda p: (p / "dev" / "d1.npz").unlink(), "devices: 2 devices, but dataset.devices names 1 .npz files"),
    (lambda p: torch.save({"fc.weight": torch.zeros(3, 64)}, p / "w.pt"), "model.weights: "),
])
def test_every_own_data_problem_is_one_error_with_its_key_path(tmp_path, break_it, message):
    # Prepare
    path = _fleet(tmp_path)
    break_it(tmp_path)
    # NOTE: a coordinator (serve) holds no device's data: device files are the simulator's to check
    device_file = message.startswith(("dataset.devices", "devices:"))
    for load in (load_sim_config,) if device_file else (load_fleet_config, load_sim_config):
        # Execute
        with pytest.raises(ConfigError) as e:
            load(path)
        # Assert: the message, once, with its key path
        assert str(e.value).count(message) == 1, str(e.value)


@pytest.mark.parametrize("text, message", [
    ("model: {weights: w.pt}\n", "model.weights: only with an own model"),
    ("model: {torch: 'nocolon'}\n", "model.torch: expected 'module:Class'"),
    ("dataset: {name: npz}\n", "dataset.name: npz needs `devices: DIR/`"),
    ("dataset: {name: heart, proxy: p.npz}\n", "dataset.proxy: only for own data (name: npz)"),
    ("evaluation: {}\n", "evaluation.data: required"),
])
def test_own_model_keys_are_checked_before_any_file_is_read(tmp_path, text, message):
    # Prepare
    path = tmp_path / "f.yaml"
    path.write_text(text)
    # Execute
    with pytest.raises(ConfigError) as e:
        load_fleet_config(path)
    # Assert
    assert message in str(e.value)


def test_serve_needs_no_device_file_and_builds_the_plan_from_the_proxy(tmp_path):
    # Prepare: the coordinator's folder: model, weights, proxy and evaluation data, no device file
    import shutil

    from fleet.compiler.pipeline import plan_for

    path = _fleet(tmp_path)
    shutil.rmtree(tmp_path / "dev")
    text = path.read_text().replace("{torch: 'own_net:Net'", "{torch: 'own_net:Net', scheme: last")
    path.write_text(text)
    # Execute
    cfg = load_fleet_config(path)
    sc = load_scenario(cfg, devices=False)
    plan = plan_for(cfg, sc)
    # Assert: a plan for the own model's input, from the proxy set alone
    assert sc.devices == [] and sc.x_proxy.shape == (6, 1, 4, 4)
    assert tuple(plan.tensors[plan.input_id].shape) == (1, 4, 4) and plan.tensors[plan.logits_id].shape[0] == 3
    with pytest.raises(ConfigError) as e:
        load_sim_config(path)
    assert "dataset.devices: not a folder" in str(e.value)
