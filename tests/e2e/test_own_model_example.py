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


def test_own_model_example_served_to_device_agents_reports_accuracy(tmp_path):
    # Prepare: two devices; their files move to the devices' side: the coordinator keeps model, proxy, test set
    require_cmd("mosquitto")
    from fleet.sim.broker import EmbeddedBroker
    from tests.fixtures.serve import serve_with_agents

    work = tmp_path / "coordinator"
    work.mkdir()
    for name in ("model.py", "prepare.py", "fleet.yaml"):
        shutil.copy(EXAMPLE / name, work / name)
    prep = subprocess.run([sys.executable, "prepare.py", "--small", "--devices", "2"], cwd=work,
                          capture_output=True, text=True, timeout=300, check=False)
    assert prep.returncode == 0, prep.stderr[-2000:]
    (work / "devices").rename(tmp_path / "on-devices")
    cfg = (work / "fleet.yaml").read_text().replace("devices: 8", "devices: 2").replace("rounds: 8", "rounds: 2")
    (work / "fleet.yaml").write_text(cfg)
    run = tmp_path / "run"
    with EmbeddedBroker() as broker:
        # Execute: serve builds the plan from the config (own model, weights, proxy) and scores test.npz
        rc, err = serve_with_agents(work / "fleet.yaml", run / "store.sqlite",
                                    sorted((tmp_path / "on-devices").glob("*.npz")), "digits", broker.port,
                                    ["--broker", f"mqtt://127.0.0.1:{broker.port}", "--out", run], timeout=300)
    report = subprocess.run([sys.executable, "-m", "fleet.cli", "report", str(run)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    # Assert: both rounds committed, each scored on the coordinator's test set, and a report of the real fleet
    assert rc == 0, err
    m = json.loads((run / "metrics.json").read_text())
    assert m["source"] == "serve" and m["round_status"] == ["committed", "committed"]
    assert m["evaluation_samples"] == 359 and len(m["accuracy_per_round"]) == 2
    assert all(0.0 <= a <= 1.0 for a in [m["accuracy_initial"], *m["accuracy_per_round"]])
    assert report.returncode == 0, report.stderr
    assert (run / "index.html").is_file()
