"""Secure aggregation's crypto in C (firmware/src/crypto/) vs the Python spec: current vectors, host and QEMU boards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_cmd

FIRMWARE = ROOT / "firmware"
VECTORS = FIRMWARE / "tests" / "crypto" / "secagg_vectors.h"
GEN = FIRMWARE / "tests" / "crypto" / "gen_secagg_vectors.py"


def test_vectors_are_current(tmp_path: Path) -> None:
    out = tmp_path / "secagg_vectors.h"
    subprocess.run([sys.executable, str(GEN), "--out", str(out)], check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.read_text() == VECTORS.read_text(), f"{VECTORS} is stale: run `python {GEN.relative_to(ROOT)}`"


def test_host_crypto_bit_exact(tmp_path: Path) -> None:
    require_cmd("gcc", "make")
    r = subprocess.run(["make", "-s", "-C", str(FIRMWARE), "-f", "secagg.mk", f"BUILD={tmp_path}", "host"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "x25519 0 bad of 12, masks 0 bad, masked input ok, shamir 0 bad of 10, aead 0 bad" in r.stdout


@pytest.fixture(scope="module")
def board_build(tmp_path_factory) -> Path:
    require_cmd("arm-none-eabi-gcc", "qemu-system-arm", "make")
    from benchmarks.secagg_cost import build

    out = tmp_path_factory.mktemp("secagg")
    build(out)
    return out


@pytest.mark.parametrize("board", ["an386", "an500"])
def test_qemu_board_crypto_bit_exact(board_build: Path, board: str) -> None:
    from benchmarks.secagg_cost import run_board

    result = run_board(board_build / "secagg" / board / "secagg.elf", f"mps2-{board}")
    assert result["ok"] == 1, result
    assert result["x25519_ticks"] > 0 and result["stack_used"] < 4096
