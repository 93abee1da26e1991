"""Each benchmark's ``--quick`` path runs and ends with one JSON object holding its documented keys.

Slow-ish (about a minute in all on one free core): the MbV2 parts are skipped here (``--models imu``, IMU task
only), so only the ImuCNN paths run; the full commands are in the benchmarks' docstrings.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("torch")
pytest.importorskip("seglearn")


def _run(script: str, *args: str, timeout: int = 120) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_accuracy_qas_quick_imu():
    r = _run("accuracy_qas.py", "--tasks", "imu", "--no-wide", timeout=300)  # ~30 s of CPU; more when shared
    for k in ("fp32_full", "fp32_sparse", "int8_sparse_noqas", "int8_sparse_qas", "int8_last", "int8_bias"):
        m = r["imu"][k]
        assert 0.0 <= m["ci95"][0] <= m["mean"] <= m["ci95"][1] <= 1.0 and m["n"] >= 1
    assert r["imu"]["int8_sparse_qas"]["mean"] > 0.3  # 7 classes: chance is ~0.14
    assert r["imu"]["int8_sparse_qas"]["mem_kb"] > r["imu"]["int8_last"]["mem_kb"] > 0
    found = r["imu"]["int8_searched"]  # the compiler's search under 256 KB with the recipe's optimizer state
    assert found["peak_sram_kb"] <= 256.0 and found["search"]["evaluations"] > 1 and found["scheme"] == "searched-256kb"
    lite = r["imu"]["int8_searched_lite"]  # the same search priced with the lite recipe (1 B per trained weight)
    assert lite["peak_sram_kb"] <= 256.0 and lite["search"]["recipe"] == "lite" and lite["scheme"] == "searched-lite-256kb"
    assert r["imu"]["int8_lastk_lite"]["peak_sram_kb"] <= 256.0 and r["imu"]["int8_lastk_lite"]["k"] >= 1
    assert r["imu"]["int8_lastk_budget"]["peak_sram_kb"] <= 256.0 < r["imu"]["int8_lastk_budget"]["peak_sram_kb"] * 100


def test_engine_speed_quick_imu():
    r = _run("engine_speed.py", "--models", "imu")
    assert r["steps_per_s_ours"] > 0 and r["steps_per_s_torch"] > 0
    assert r["imu"]["steps_per_s_native"] > 0  # `make setup` builds the native library


def test_memory_vs_pytorch_quick_imu():
    r = _run("memory_vs_pytorch.py", "--models", "imu")
    row = r["imu"]["ImuCNN:tail"]
    assert 0 < row["ours_arena_bytes"] <= row["ours_peak_sram_bytes"] < row["torch_peak_rss_bytes"]


def test_fleet_python_quick():
    """50 host devices, each its own MQTT connection, really train one round through the embedded broker."""
    r = _run("fleet_python.py", timeout=300)["50"]
    assert r["committed"] and r["accepted"] == r["deltas_trained"] == 50 and r["connections"] == 50
    assert 0 < r["coordinator_overhead_s"] < r["round_seconds"] and not r["errors"]


@pytest.mark.parametrize("engine", ["local", "simulation"])
def test_flower_baseline_quick(engine):
    """Flower (fp32 FedAvg) and ours on the same 8-device watch scenario, 2 rounds, 4 clients per round; Flower's
    side in this process or on Flower's own simulation engine (Ray)."""
    if engine == "simulation":
        require(importlib.util.find_spec("ray") is not None,
                "Flower's simulation engine needs Ray: the flower-simulation extra (make setup installs it)")
    r = _run("flower_baseline.py", "--engine", engine, timeout=400)
    ours, flower = r["ours"], r["flower"]
    assert flower["engine"] == engine
    assert flower["clients_per_round"] == ours["clients_per_round"] == 4 and flower["parameters"] > 5000
    # dense fp32 both ways vs sparse int8: the serialized model alone is 4 bytes per parameter
    assert flower["bytes_up_per_device_round"] > flower["fp32_parameter_bytes"] > 10 * ours["bytes_up_per_device_round"]
    assert 0 < ours["client_memory_bytes"] < flower["client_memory_bytes"] < flower["peak_rss_bytes"]
    for s in (ours, flower):
        assert 0.3 < s["accuracy_final"] <= 1.0  # 7 classes: chance is ~0.14


def test_topk_accuracy_quick():
    """4 devices, 2 rounds, one seed: every-coordinate and top-2% under both rules for silent coordinates."""
    r = _run("topk_accuracy.py")
    assert set(r) == {"every", "topk20_keep", "topk20_zero", "best"}
    assert r["topk20_zero"]["bytes"] < r["every"]["bytes"] and 0 < r["topk20_zero"]["ratio"] < 1
    assert all(0.0 <= r[k]["mean"] <= 1.0 for k in ("every", "topk20_keep", "topk20_zero"))
    assert r["best"]["setting"] in r
