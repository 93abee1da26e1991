"""`tinyfleet serve --out DIR` on a real fleet (Mosquitto + two device agents): metrics.json per round with the
evaluation data's accuracy, the same numbers `tinyfleet eval` finds in the store, and `tinyfleet report DIR`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT


def _tinyfleet(*argv):
    return subprocess.run([sys.executable, "-m", "fleet.cli", *map(str, argv)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def test_serve_out_writes_a_run_directory_that_report_and_eval_agree_with(serve_tiny, tmp_path):
    # Prepare: a two-device fleet with coordinator-side evaluation data (path relative to the config)
    from tests.fixtures.tiny import tiny_dataset

    x, y = tiny_dataset(64, seed=9)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    run = tmp_path / "run"
    # Execute
    rc, err = serve_tiny("outtest", "rounds: 2\nlocal_steps: 8\ndeadline: 30\nevaluation: {data: test.npz}\n",
                         ["--out", run], store=run / "store.sqlite")
    report = _tinyfleet("report", run)
    scored = _tinyfleet("eval", tmp_path / "fleet.yaml", "--store", run / "store.sqlite", "--plan",
                        tmp_path / "plan.ttp", "--data", tmp_path / "test.npz", "--json")
    # Assert: the run directory holds the documented, versioned metrics of both rounds
    assert rc == 0, err
    m = json.loads((run / "metrics.json").read_text())
    assert m["version"] == 1 and m["source"] == "serve" and m["fleet"] == "outtest"
    assert m["rounds"] == 2 and m["round_status"] == ["committed", "committed"] and m["model_version"] == 3
    assert m["devices_per_round"] == [2, 2] and m["selected_per_round"] == [2, 2] and m["devices_dropped"] == 0
    assert m["evaluation_samples"] == 64 and len(m["accuracy_per_round"]) == 2
    assert all(0 < b for b in m["bytes_up_per_device_round"] + m["bytes_down_per_device_round"])
    assert [r["device_id"] for r in m["per_device"]] == ["d0", "d1"]
    assert [r["rounds_participated"] for r in m["per_device"]] == [2, 2]
    assert "round 2: accuracy" in err
    # ... the coordinator's accuracy per round is the store's models scored by `tinyfleet eval`
    assert scored.returncode == 0, scored.stderr
    by_version = {r["version"]: r["accuracy"] for r in json.loads(scored.stdout.strip().splitlines()[-1])["versions"]}
    assert [m["accuracy_initial"], *m["accuracy_per_round"]] == [by_version[1], by_version[2], by_version[3]]
    # ... and the report reads it
    assert report.returncode == 0, report.stderr
    page = (run / "index.html").read_text()
    assert "tinyfleet serve" in page and "64 samples" in page and (run / "accuracy.png").is_file()
