"""examples/own-model as a user runs it, small: write the data, then `tinyfleet simulate` its config from elsewhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.conftest import ROOT, require_cmd

EXAMPLE = ROOT / "examples" / "own-model"


def test_own_model_example_simulates_from_its_config_alone(tmp_path):
    # Prepare: the example folder as a user has it, data written by its own script (40 samples per device)
    require_cmd("mosquitto")
    work = tmp_path / "own-model"
    work.mkdir()
    for name in ("model.py", "prepare.py", "fleet.yaml"):
        shutil.copy(EXAMPLE / name, work / name)
    prep = subprocess.run([sys.executable, "prepare.py", "--small"], cwd=work, capture_output=True, text=True,
                          timeout=300, check=False)
    assert prep.returncode == 0, prep.stderr[-2000:]
    # Execute: from another folder, with no PYTHONPATH to the model (the repository only, for `fleet`)
    cmd = [sys.executable, "-m", "fleet.cli", "simulate", str(work / "fleet.yaml"), "--rounds", "2", "--json",
           "--quiet", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
                          env={"PATH": "/usr/bin:/bin:/usr/sbin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})
    # Assert: 8 devices, both rounds committed, the own model's plan, and a report of the run
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["round_status"] == ["committed", "committed"]
    assert result["devices_per_round"] == [8, 8] and result["errors"] == []
    assert 0.0 <= result["accuracy_initial"] <= 1.0 and len(result["accuracy_per_round"]) == 2
    assert result["scheme"].startswith("auto") and result["plan_sram_bytes"] > 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["n_train"] for r in metrics["per_device"]] == [28] * 8
    assert (tmp_path / "run" / "index.html").is_file()
