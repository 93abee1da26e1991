"""Device backends of ``tinyfleet simulate``: a mixed fleet (2 QEMU boards running our firmware + 2 host devices)
completes a round through the real broker; renode fails clearly; the lazy board trainer uploads once per round."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest

from fleet.config import ConfigError, from_dict
from fleet.sim.backends import LazyBoardTrainer, build_devices, device_backends
from fleet.sim.config import SimConfig
from fleet.sim.errors import SimulationError
from fleet.sim.runner import run_simulation
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
    # the boards report what they measured of themselves (statics + plan pool + stack high-water, within the
    # 320 KB budget; flash = firmware + plan), host devices what the compiler planned
    boards, hosts = res.per_device[:2], res.per_device[2:]
    assert [r["memory_source"] for r in res.per_device] == ["measured", "measured", "planned", "planned"]
    for r in boards:
        assert res.plan_sram_bytes < r["sram_bytes"] <= 320 * 1024 and 0 < r["stack_high_water"] < 64 * 1024
        assert r["flash_bytes"] > res.plan_bytes + 10_000
    assert all(r["sram_bytes"] == res.plan_sram_bytes for r in hosts)


def test_boards_mask_and_personalize_in_a_simulated_fleet(board_elfs) -> None:
    """Boards run secure aggregation's device side themselves (their delta never crosses the UART in clear) and
    personalize on the board, in the same rounds over the real broker as two host devices."""
    require_cmd("mosquitto")
    elf = {"machine": "mps2-an500", "elf": str(board_elfs["mps2-an500"])}
    plain = run_simulation(_cfg(qemu_devices=2, qemu=elf, baselines=[]), progress=False)
    secure = run_simulation(_cfg(qemu_devices=2, qemu=elf, rounds=2, baselines=[],
                                 secure_aggregation={"threshold": 0.6, "bits": 32, "stage_timeout": 60},
                                 personalization={"method": "ditto", "steps": 4}), progress=False)
    assert secure.errors == [] and secure.round_status == ["committed", "committed"]
    assert secure.devices_per_round == [4, 4] and secure.model_version >= 3
    # masked rounds carry keys, shares and the masked input: more bytes up than the plain round's sparse delta
    assert secure.payload_up_per_device_round[0] > 2 * plain.payload_up_per_device_round[0]
    assert secure.personal_methods == {"ditto": 4}  # the boards too: their personal copy stays on the board
    assert [r["accuracy_personalized"] is None for r in secure.per_device] == [True, True, False, False]


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

    plan = type("Plan", (), {"trainable": []})()  # the board's plan: no trainable values held before the first load

    def __init__(self):
        self.input = type("In", (), {"shape": (2,), "dtype": None})()
        self.loads, self.stored, self.trains = [], 0, []

    def sample_key(self, x, y):
        return int(y).to_bytes(4, "little", signed=True) + np.asarray(x, np.int8).tobytes()

    def store_samples(self, x, y):
        self.stored += len(x)

    def train_steps(self, keys, lr):
        self.trains.append(list(keys))
        return {"steps_done": len(keys), "samples_used": len(keys), "correct": 0}

    def load_trainable(self, state):
        self.loads.append({k: v.copy() for k, v in state.items()})

    def trainable_state(self):
        return self.loads[-1]


def test_lazy_board_trainer_one_update_and_one_train_per_round() -> None:
    from concurrent.futures import ThreadPoolExecutor

    board = _FakeBoard()
    with ThreadPoolExecutor(1) as pool:
        lazy = LazyBoardTrainer(board, executor=pool)
        xs, ys = np.arange(10, dtype=np.int8).reshape(5, 2), np.arange(5, dtype=np.int32)
        lazy.stream_samples(xs, ys)  # the sensor stream: stored once, in the background
        base = {1: np.arange(4, dtype=np.int8)}
        for r in range(3):  # the device protocol's order: model, base before training, steps, delta, base again
            model = {1: base[1] + r}
            lazy.load_trainable(model)
            lazy.load_trainable(model)
            for s in range(5):
                lazy.train_step(xs[(s + r) % 5][None], ys[(s + r) % 5][None], 0.1)
            lazy.trainable_state()
            lazy.load_trainable(model)
        assert len(board.loads) == 3 and board.stored == 5 and [len(t) for t in board.trains] == [5, 5, 5]
        assert [int(s[1][0]) for s in board.loads] == [0, 1, 2]
        assert board.trains[1] == [board.sample_key(xs[(s + 1) % 5], ys[(s + 1) % 5]) for s in range(5)]
        # the same base after training must be sent again (the board holds trained values now)
        lazy.load_trainable({1: base[1] + 2})
        lazy.train_step(xs[:1], ys[:1], 0.1)
        lazy.trainable_state()
        assert len(board.loads) == 4 and len(board.trains[-1]) == 1


def test_sample_slots_reuse_fifo_and_keep() -> None:
    from device_agent.bridge import SampleSlots

    s = SampleSlots(3)
    assert [s.place(k) for k in (b"a", b"b", b"a", b"c")] == [(0, True), (1, True), (0, False), (2, True)]
    assert s.place(b"d") == (0, True) and b"a" not in s.slot_of  # full: the slot stored longest ago
    assert s.place(b"e", keep={1}) == (2, True)  # slot 1 is listed for training: skipped
    with pytest.raises(ValueError, match="slots"):
        s.place(b"f", keep={0, 1, 2})
