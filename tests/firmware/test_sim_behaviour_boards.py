"""The behaviour model on QEMU boards and host devices alike, in an async fleet through the real broker."""

from __future__ import annotations

from fleet.config import from_dict
from fleet.sim.config import SimConfig
from fleet.sim.report import awake_spans
from fleet.sim.runner import run_simulation
from tests.conftest import require_cmd


def test_boards_and_hosts_live_by_the_measured_board_speed_and_sleep(board_elfs) -> None:
    require_cmd("mosquitto")
    # Prepare: 2 an500 boards + 2 host devices, async; speed = instructions per step measured on an emulated an500
    # (-icount) over the STM32F746's 216 MHz; 2 of 4 devices sleep half of every 4 simulated seconds
    cfg = from_dict(SimConfig, {
        "name": "paced", "devices": 4, "rounds": 3, "local_steps": 8, "deadline": 60, "mode": "async",
        "async_rounds": {"buffer_size": 2, "max_staleness": 8, "task_timeout_s": 60},
        "model": {"scheme": {"n_bias_update": 1, "weight_ratio": {5: 1.0}}, "pretrain_epochs": 1},
        "dataset": {"max_train_per_device": 64}, "qemu_devices": 2, "baselines": [],
        "qemu": {"machine": "mps2-an500", "elf": str(board_elfs["mps2-an500"])},
        "behaviour": {"enabled": True, "period_s": 4, "sleepers": 0.5, "dropout": 0, "delay_s": [0.01, 0.02]}},
        "test")

    # Execute
    res = run_simulation(cfg, progress=False)

    # Assert: versions published; one measured figure for every device (all emulate the same core), a step of a
    # few million instructions; deltas only leave awake devices, boards included
    assert res.errors == [] and res.round_status == ["committed"] * 3
    b = res.behaviour
    insns = {d["instructions_per_step"] for d in b["devices"]}
    assert len(insns) == 1 and 100_000 < insns.pop() < 50_000_000 and set(b["instructions_per_step"]) == {"mps2-an500"}
    assert [r["backend"] for r in res.per_device] == ["qemu", "qemu", "python", "python"]
    assert all(r["step_s"] > 0 for r in res.per_device)
    deltas = [e for e in b["events"] if e[2] == "delta"]
    assert {e[1] for e in deltas} & {r["device_id"] for r in res.per_device[:2]}, "no board trained"
    for t, dev, _ in deltas:
        assert any(a - 1e-6 <= t <= e + 1e-6 for a, e in awake_spans(b["events"], dev, b["sim_seconds"])), (t, dev)
