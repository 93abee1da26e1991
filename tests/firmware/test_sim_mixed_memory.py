"""A mixed-memory fleet end to end (the small form of configs/fleet-mixed.yaml): QEMU mps2-an500 / mps2-an386 /
netduinoplus2 boards and host devices with small budgets train nested plans through the embedded broker."""

from __future__ import annotations

from fleet.config import from_dict
from fleet.sim.config import SimConfig
from fleet.sim.runner import run_simulation
from tests.conftest import require_cmd


def test_mixed_memory_fleet_round(board_elfs, tmp_path) -> None:
    require_cmd("mosquitto")
    # Prepare: 3 boards (their board YAML's budget: all take the largest plan), hosts at 37 / 29 kB (smaller plans)
    # and one at 20 kB, below the smallest plan
    cfg = from_dict(SimConfig, {
        "name": "mixedmem", "devices": 7, "rounds": 1, "local_steps": 4, "deadline": 90, "baselines": [],
        "model": {"scheme": "full", "pretrain_epochs": 1}, "dataset": {"max_train_per_device": 32},
        "personalization": {"compare": []}, "continual": {"prequential": False},
        "plan_budgets": ["28KB", "36KB", "256KB"],
        "device_groups": [
            {"backend": "qemu", "machine": "mps2-an500", "elf": str(board_elfs["mps2-an500"])},
            {"backend": "qemu", "machine": "mps2-an386", "elf": str(board_elfs["mps2-an386"])},
            {"backend": "qemu", "machine": "netduinoplus2"},
            {"backend": "python", "sram": "37KB"}, {"backend": "python", "sram": "29KB", "count": 2},
            {"backend": "python", "sram": "20KB"}]}, "test")
    # Execute
    res = run_simulation(cfg, out_dir=tmp_path, progress=False)
    # Assert: every device with a plan counted; three different plans trained; the 20 kB device never did
    assert res.errors == [] and res.round_status == ["committed"]
    assert res.devices_per_round == [6] and res.selected_per_round == [6]
    rows = {r["device_id"]: r for r in res.per_device}
    plans = [r["plan"] for r in res.per_device]
    assert len(set(plans[:6])) == 3 and plans[6].startswith("none: 20000 B <")
    assert [r["board"] for r in res.per_device[:3]] == ["mps2-an500", "mps2-an386", "netduinoplus2"]
    assert rows["dev0006"]["rounds_participated"] == 0
    for r in res.per_device[:6]:
        assert r["plan_need_bytes"] <= r["plan_budget"] and r["rounds_participated"] == 1
    for r in res.per_device[:3]:  # boards measure themselves
        assert r["memory_source"] == "measured" and 0 < r["sram_bytes"] <= 320 * 1024
    assert res.per_device[4]["plan_budget"] == res.per_device[5]["plan_budget"] == 28_000
    html = (tmp_path / "index.html").read_text()
    assert "plan_need_bytes" in html and "netduinoplus2" in html
