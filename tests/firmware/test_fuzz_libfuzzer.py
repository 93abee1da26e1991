"""Short libFuzzer runs of the C readers (firmware/fuzz/, clang, ASan/UBSan): plan, model update, UART frames,
command sequences against a device holding a plan; and the atheris target of the JSON control-message parser.

Each target starts from the golden vectors (fuzz/corpus.py) and runs ~10 s; any sanitizer report, trap, leak or
timeout fails the test with the reproducer's path. Long campaigns: `make fuzz` (docs/formats.md "Robustness").
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from device_agent.wire.messages import MessageError, parse
from tests.conftest import ROOT, require, require_cmd

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


@pytest.mark.parametrize("target", ["plan", "update", "frame", "cmds"])
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


def test_atheris_messages_target_reports_what_parse_lets_escape(tmp_path):
    """Nested JSON (b"[" * 995): json.loads raises RecursionError. The atheris target must report exactly what
    parse does with it: a crash (non-zero exit naming the exception) while parse lets anything but MessageError
    escape, a clean run once parse refuses it with MessageError."""
    require(importlib.util.find_spec("atheris") is not None, "atheris not installed (run `make setup`)")
    # Prepare
    nested = tmp_path / "nested"
    nested.write_bytes(b"[" * 995)
    try:
        parse(b"[" * 995)
        escaped = None
    except MessageError:
        escaped = None
    except Exception as e:  # noqa: BLE001 - the class of bug under test: anything else escaping parse
        escaped = type(e).__name__
    # Execute
    r = subprocess.run([sys.executable, str(ROOT / "fuzz" / "fuzz_messages.py"), "-runs=1", str(nested)],
                       capture_output=True, text=True, check=False, timeout=120, cwd=tmp_path)
    # Assert
    if escaped is None:
        assert r.returncode == 0, r.stderr[-3000:]
    else:
        assert r.returncode != 0 and escaped in r.stdout + r.stderr, r.stderr[-3000:]
