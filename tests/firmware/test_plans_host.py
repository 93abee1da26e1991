"""Host build of the plan reader + runtime: whole plans bit-exact with the Python Trainer (every trainable byte,
the last logits, per-step correctness, the state hash), and the C readers agree with tests/vectors/MANIFEST.txt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import MODELS, ROOT, require, require_cmd
from tests.firmware.conftest import FIRMWARE, PLAN_VECTORS

GEN = ROOT / "tests" / "firmware" / "gen_plan_vectors.py"


def _build(tmp: Path) -> Path:
    require_cmd("gcc", "make")
    r = subprocess.run(["make", "-s", "-C", str(FIRMWARE), f"BUILD={tmp}", "host-build"], check=False,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp / "host" / "test_plans"


def test_plan_vectors_are_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(GEN), "--out", str(tmp_path)], check=True, cwd=ROOT, capture_output=True)
    committed = sorted(PLAN_VECTORS.glob("*.tfv"))
    assert [f.name for f in committed] == sorted(f.name for f in tmp_path.glob("*.tfv")) and len(committed) >= 3
    for f in committed:
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), (
            f"{f} is stale: run `python tests/firmware/gen_plan_vectors.py`")


def test_host_plans_bit_exact_and_manifest(tmp_path: Path) -> None:
    exe = _build(tmp_path)
    r = subprocess.run([str(exe), "--manifest", str(ROOT / "tests" / "vectors"),
                        *map(str, sorted(PLAN_VECTORS.glob("*.tfv")))], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "plan vectors: 9 run, all bit-exact" in r.stdout and "ok manifest" in r.stdout


def test_host_mbv2_bit_exact(tmp_path: Path) -> None:
    """MbV2-w0.35 at 128x128, paper rung 99kb (PWDW, sparse backward): 2 steps byte for byte on the host."""
    require((MODELS / "mbv2-w0.35.pkl").exists(), f"{MODELS}/mbv2-w0.35.pkl absent")
    exe = _build(tmp_path)
    subprocess.run([sys.executable, str(GEN), "--plans", "", "--mbv2", "--out", str(tmp_path)], check=True, cwd=ROOT,
                   capture_output=True)
    r = subprocess.run([str(exe), str(tmp_path / "mbv2.tfv")], check=False, capture_output=True, text=True)
    assert r.returncode == 0 and "all bit-exact" in r.stdout, r.stdout + r.stderr
