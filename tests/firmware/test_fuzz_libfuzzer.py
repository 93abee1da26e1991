"""Short libFuzzer runs of the C readers (firmware/fuzz/, clang, ASan/UBSan): plan, model update, UART frames.

Each target starts from the golden vectors (fuzz/corpus.py) and runs ~10 s; any sanitizer report, trap, leak or
timeout fails the test with the reproducer's path. Long campaigns: `make fuzz` (docs/formats.md "Robustness").
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, require_cmd

sys.path.insert(0, str(ROOT / "fuzz"))
import corpus

BUILD = ROOT / "build" / "fuzz-fw"  # NOTE: shared and incremental: make rebuilds only what changed
SECONDS = 10


@pytest.fixture(scope="module")
def fuzzers():
    require_cmd("clang", "make")
    r = subprocess.run(["make", "-s", "-j2", "-C", str(ROOT / "firmware"), f"BUILD={BUILD}", "fuzz-build"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return BUILD / "fuzz"


@pytest.mark.parametrize("target", ["plan", "update", "frame"])
def test_libfuzzer_short_run(fuzzers, tmp_path, target):
    # Prepare
    seeds = corpus.write(tmp_path / "seeds")[f"c_{target}"]
    work = tmp_path / "corpus"
    work.mkdir()
    # Execute
    r = subprocess.run([str(fuzzers / f"fuzz_{target}"), f"-max_total_time={SECONDS}", "-timeout=10",
                        "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1",
                        str(work), str(seeds)], capture_output=True, text=True, check=False, timeout=SECONDS + 60)
    # Assert
    artifacts = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert r.returncode == 0 and not artifacts, f"fuzz_{target} found a crash {artifacts}:\n{r.stderr[-4000:]}"
    runs = [ln for ln in r.stderr.splitlines() if ln.startswith("stat::number_of_executed_units:")]
    assert runs and int(runs[0].split(":")[-1]) > 100, r.stderr[-2000:]
