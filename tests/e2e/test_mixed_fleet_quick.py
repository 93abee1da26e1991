"""benchmarks/mixed_fleet.py --quick runs the three arms and ends with one JSON object holding its documented keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("torch")
pytest.importorskip("seglearn")


def test_mixed_fleet_quick():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mixed_fleet.py"), "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["budgets"] == [28_000, 32_000, 36_000, 256_000] and r["needs"] == sorted(r["needs"])
    for arm in ("mixed", "drop_small", "smallest"):
        lo, hi = r[f"{arm}_final_ci95"]
        assert 0.0 <= lo <= r[f"{arm}_final_mean"] <= hi <= 1.0
        assert len(r["per_seed_accuracy"][arm][0]) == r["rounds"]
