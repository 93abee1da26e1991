"""`tinyfleet serve` + two `device-agent run` processes through a real Mosquitto: one signed round."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from tests.conftest import ROOT


def test_serve_and_two_device_agents_commit_a_round(serve_tiny, tmp_path):
    rc, err = serve_tiny("clitest", "rounds: 1\nlocal_steps: 5\ndeadline: 30\n")

    assert rc == 0, err
    assert "round 1: committed v2 (2 deltas)" in err
    _eval_scores_every_stored_version(tmp_path, tmp_path / "store.sqlite")


def _eval_scores_every_stored_version(tmp_path, store):
    import json

    from tests.fixtures.tiny import tiny_dataset

    x, y = tiny_dataset(64, seed=9)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    base = [sys.executable, "-m", "fleet.cli", "eval", str(tmp_path / "fleet.yaml"), "--store", str(store),
            "--plan", str(tmp_path / "plan.ttp"), "--data", str(tmp_path / "test.npz")]

    def tinyfleet(argv):
        return subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)

    ok = tinyfleet(base)
    missing = tinyfleet(base + ["--versions", "7"])
    np.savez(tmp_path / "bad.npz", x=x[:, :2], y=y)  # 2 channels where the plan takes 3
    bad = tinyfleet(base[:-1] + [str(tmp_path / "bad.npz")])

    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout.strip().splitlines()[-1])
    assert [r["version"] for r in result["versions"]] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["samples"] == 64 for r in result["versions"])
    assert result["versions"][0]["accuracy"] != result["versions"][1]["accuracy"]  # the round changed the model
    assert missing.returncode == 2 and "no version 7 (latest: 2)" in missing.stderr
    assert bad.returncode == 2 and "bad.npz" in bad.stderr
