"""Device backends of ``tinyfleet simulate``: a mixed fleet (2 QEMU boards running our firmware + 2 host devices)
completes a round through the real broker; renode fails clearly; the lazy board trainer uploads once per round."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest

from fleet.config import ConfigError, from_dict
from fleet.sim.backends import LazyBoardTrainer, build_devices, device_backends
from fleet.sim.config import SimConfig
from fleet.sim.runner import SimulationError, run_simulation
from tests.conftest import require_cmd


def _cfg(**kw) -> SimConfig:
    data = {"name": "mixed", "devices": 4, "rounds": 1, "local_steps": 8, "deadline": 60,
            "model": {"scheme": {"n_bias_update": 1, "weight_ratio": {5: 1.0}}, "pretrain_epochs": 1},
            "dataset": {"max_train_per_device": 64}}
    data.update(kw)
    return from_dict(SimConfig, data, "test")


def test_mixed_fleet_round_through_the_broker(board_elfs) -> None:
    require_cmd("mosquitto")
    # Prepare: the first 2 devices are QEMU an500 boards (the fixture's fresh firmware), the other 2 host engines
    cfg = _cfg(qemu_devices=2, qemu={"machine": "mps2-an500", "elf": str(board_elfs["mps2-an500"])})
    assert device_backends(cfg) == ["qemu", "qemu", "python", "python"]
    # Execute
    res = run_simulation(cfg, progress=False)
    # Assert: every device's delta counted, the model moved on, nothing went wrong on the boards
    assert res.errors == []
    assert res.round_status == ["committed"]
    assert res.devices_per_round == [4] and res.devices_dropped == 0
    assert res.model_version >= 2
    assert 0.0 <= res.accuracy_per_round[0] <= 1.0


def test_renode_backend_says_it_is_not_on_path(monkeypatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with ExitStack() as stack, pytest.raises(SimulationError, match="renode not on PATH"):
        build_devices(_cfg(backend="renode"), plan=None, stack=stack)


def test_backend_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="backend"):
        _cfg(backend="vm")
    with pytest.raises(ConfigError, match="qemu_devices"):
        _cfg(qemu_devices=5)
    with pytest.raises(ConfigError, match="machine"):
        _cfg(qemu={"machine": "stm32f7"})


class _FakeBoard:
    """BoardTrainer's surface as LazyBoardTrainer uses it, counting what would cross the UART."""

    plan = None

    def __init__(self):
        self.input = type("In", (), {"shape": (2,), "dtype": None})()
        self.loads, self.pushed, self.trains = [], 0, []
        self.client = self

    def push_sample(self, data, label):
        self.pushed += 1

    def train(self, steps, lr_m, lr_e):
        self.trains.append(steps)
        return {"steps_done": steps, "samples_used": steps}

    def load_trainable(self, state):
        self.loads.append({k: v.copy() for k, v in state.items()})

    def trainable_state(self):
        return self.loads[-1]


def test_lazy_board_trainer_one_update_and_one_train_per_round() -> None:
    board = _FakeBoard()
    lazy = LazyBoardTrainer(board)
    base = {1: np.arange(4, dtype=np.int8)}
    x, y = np.zeros((1, 2), np.int8), np.zeros(1, np.int32)
    for r in range(3):  # the device protocol's order: model, base before training, steps, delta, base again
        model = {1: base[1] + r}
        lazy.load_trainable(model)
        lazy.load_trainable(model)
        for _ in range(5):
            lazy.train_step(x, y, 0.1)
        lazy.trainable_state()
        lazy.load_trainable(model)
    assert len(board.loads) == 3 and board.pushed == 15 and board.trains == [5, 5, 5]
    assert [int(s[1][0]) for s in board.loads] == [0, 1, 2]
    # the same base after training must be sent again (the board holds trained values now)
    lazy.load_trainable({1: base[1] + 2})
    lazy.train_step(x, y, 0.1)
    lazy.trainable_state()
    assert len(board.loads) == 4 and board.trains[-1] == 1
