"""Each benchmark's ``--quick`` path runs and ends with one JSON object holding its documented keys.

Slow-ish (about a minute in all on one free core): the MbV2 parts are skipped here (``--models imu``, IMU task
only), so only the ImuCNN paths run; the full commands are in the benchmarks' docstrings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("torch")
pytest.importorskip("seglearn")


def _run(script: str, *args: str, timeout: int = 120) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_accuracy_qas_quick_imu():
    r = _run("accuracy_qas.py", "--tasks", "imu", "--no-wide")
    for k in ("fp32_full", "fp32_sparse", "int8_sparse_noqas", "int8_sparse_qas", "int8_last", "int8_bias"):
        assert 0.0 <= r["imu"][k] <= 1.0
    assert r["imu"]["int8_sparse_qas"] > 0.3  # 7 classes: chance is ~0.14


def test_engine_speed_quick_imu():
    r = _run("engine_speed.py", "--models", "imu")
    assert r["steps_per_s_ours"] > 0 and r["steps_per_s_torch"] > 0


def test_memory_vs_pytorch_quick_imu():
    r = _run("memory_vs_pytorch.py", "--models", "imu")
    row = r["imu"]["ImuCNN:tail"]
    assert 0 < row["ours_arena_bytes"] <= row["ours_peak_sram_bytes"] < row["torch_peak_rss_bytes"]
