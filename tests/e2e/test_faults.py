"""``benchmarks/faults.py --quick``: real Mosquitto, ``tinyfleet serve`` and device agents, SIGKILLed, hung, fed
duplicated/reordered and garbage traffic; every scenario must pass (no acknowledged delta lost, none counted
twice, nothing crashed on its own, the model bit-identical to the fault-free run, lost devices seen in time), the
kill and chaos scenarios also in async mode.

About a minute and a half on a free machine (3 kills per kill scenario, 3 devices, 8 rounds).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, require_cmd

SCENARIOS = {"broker_kill", "coordinator_kill", "chaos_proxy", "garbage", "poison", "device_restart", "device_kill",
             "device_hang", "async_broker_kill", "async_coordinator_kill", "async_chaos_proxy", "secagg_dropout",
             "secagg_coordinator_kill", "secagg_broker_kill"}


def test_faults_quick_every_scenario_passes(tmp_path):
    require_cmd("mosquitto")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--quick", "--keep",
                          str(tmp_path)], check=False, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    table, last = run.stdout.strip().rsplit("\n", 1)
    scenarios = json.loads(last)["scenarios"]

    assert set(scenarios) == SCENARIOS, table
    for name, row in scenarios.items():
        secure = name.startswith("secagg_")
        assert set(row) == {"pass", "lost", "duplicated", "rejected", "crashes"} | ({"revealed"} if secure else set())
        assert not secure or row["revealed"] == 0, f"{name}:\n{table}"
        assert row["pass"] is True and row["lost"] == 0 and row["duplicated"] == 0 and row["crashes"] == 0, \
            f"{name}:\n{table}"
    assert scenarios["garbage"]["rejected"] >= 10, table  # every bad delta came back rejected
