"""The run report as a user sees it: written by `tinyfleet simulate --out`, rendered by headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import ROOT, require_cmd
from tests.pure.test_report import _metrics


def _chromium() -> str:
    require_cmd("chromium")
    return shutil.which("chromium") or "chromium"


def _screenshot(page: Path, out: Path, tmp: Path) -> np.ndarray:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / 'profile'}",
           "--hide-scrollbars", "--window-size=1000,2000", f"--screenshot={out}", page.resolve().as_uri()]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=tmp)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]
    import matplotlib.image

    return matplotlib.image.imread(out)  # (H, W, 3|4) floats in [0, 1]


def _assert_not_blank(img: np.ndarray) -> None:
    rgb = img[..., :3]
    ink = (rgb.min(axis=2) < 0.9).mean()  # fraction of pixels that are not (near) white
    colours = len(np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0))
    assert 0.01 < ink < 0.9, f"screenshot looks blank or solid: {ink:.3%} non-white pixels"
    assert colours > 50, f"screenshot has only {colours} colours (text and plots give hundreds)"


def test_report_from_fixture_renders_in_headless_chromium(tmp_path):
    from fleet.sim.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(_metrics()))
    page = write_report(run)

    img = _screenshot(page, tmp_path / "shot.png", tmp_path)

    _assert_not_blank(img)


def test_simulate_writes_report_with_personal_tensors_and_baselines(tmp_path):
    require_cmd("mosquitto")
    cfg = (ROOT / "configs" / "quickstart.yaml").read_text()
    cfg = "\n".join(ln for ln in cfg.splitlines() if not ln.startswith(("personal:", "baselines:")))
    cfg += "\npersonal: [classifier.bias]\nbaselines: [local, centralized]\n"
    (tmp_path / "cfg.yaml").write_text(cfg)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fleet.cli", "simulate", str(tmp_path / "cfg.yaml"), "--devices", "3",
           "--rounds", "2", "--json", "--quiet", "--out", str(run)]

    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    for key in ("accuracy_personalized_per_round", "accuracy_local_per_round", "accuracy_centralized_per_round"):
        assert len(result[key]) == 2 and all(0.0 <= a <= 1.0 for a in result[key]), key
    keys = set(result["accuracy_mean_per_device"])
    assert {"global", "personalized", "local", "centralized"} <= keys
    assert keys - {"global", "personalized", "local", "centralized"} <= {"bias", "head", "finetune", "ditto", "select"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["device_id"] for r in metrics["per_device"]] == ["dev0000", "dev0001", "dev0002"]
    assert all(r["rounds_participated"] == 2 and r["sram_bytes"] > 0 for r in metrics["per_device"])
    text = (run / "index.html").read_text()
    for png in ("accuracy.png", "device_accuracy.png", "bytes.png", "participation.png", "memory.png"):
        assert f'src="{png}"' in text and (run / png).exists()
