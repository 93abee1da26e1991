"""`tinyfleet simulate` with the device behaviour model on host devices: speed, sleep/wake, report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, require_cmd


def _simulate(tmp_path, rounds: int, behaviour: str, deadline: int = 30) -> subprocess.CompletedProcess:
    """`tinyfleet simulate` of the quickstart on 4 host devices at 3 M instructions per step (no QEMU here), with
    the ``behaviour`` fields (no speed spread, no dropouts) and ``deadline``, into tmp_path/run."""
    require_cmd("mosquitto")
    cfg = tmp_path / "b.yaml"
    text = (ROOT / "configs" / "quickstart.yaml").read_text().replace("deadline: 30", f"deadline: {deadline}")
    cfg.write_text(text + (
        f"behaviour: {{enabled: true, instructions_per_step: 3000000, speed_sigma: 0, dropout: 0, "
        f"delay_s: [0.01, 0.05], {behaviour}}}\n"))
    cmd = [sys.executable, "-m", "fleet.cli", "simulate", str(cfg), "--rounds", str(rounds), "--devices", "4",
           "--json", "--quiet", "--out", str(tmp_path / "run")]
    return subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_sleeping_devices_answer_only_while_awake_and_the_report_shows_when(tmp_path):
    """Host devices at the speed of an STM32F746 (3 M instructions per step at 216 MHz, a fixed figure: no QEMU
    here), half of them sleeping half of every 6 simulated seconds: every delta leaves while its device is awake,
    and metrics.json + the report say who was awake when."""
    from fleet.sim.report import awake_spans

    proc = _simulate(tmp_path, 3, "period_s: 6, sleepers: 0.5, sleeper_duty: 0.5, stragglers: 0.25, straggler_factor: 3")

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rounds"] == 3
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    b, rows = m["behaviour"], m["per_device"]
    assert [d["instructions_per_step"] for d in b["devices"]] == [3_000_000] * 4
    assert sum(d["duty"] < 1 for d in b["devices"]) == 2 and b["model"]["stragglers"] == 1
    steps = sorted(d["step_s"] for d in b["devices"])  # 3 M / 216 MHz = 13.9 ms, one straggler 3x slower
    assert steps == pytest.approx([3e6 / 216e6] * 3 + [3 * 3e6 / 216e6], rel=1e-4)
    events = b["events"]
    kinds = {e[2] for e in events}
    assert {"sleep", "task", "delta"} <= kinds, events
    if b["sim_seconds"] > 6:  # a whole period: every sleeper woke at least once (a fast run may end before that)
        assert "wake" in kinds, events
    for t, dev, what in events:  # the point: nothing leaves a sleeping device
        if what == "delta":
            assert any(a - 1e-6 <= t <= e + 1e-6 for a, e in awake_spans(events, dev, b["sim_seconds"])), (t, dev)
    sleepers = [r for r, d in zip(rows, b["devices"]) if d["duty"] < 1]
    assert all(r["awake_s"] < 0.75 * b["sim_seconds"] for r in sleepers if b["sim_seconds"] > 6), rows
    assert "behaviour.png" in (tmp_path / "run" / "index.html").read_text()


def test_the_round_deadline_is_on_the_fleets_simulated_clock(tmp_path):
    """time_scale 0.05 (20 simulated seconds per wall second), deadline 60 simulated seconds: one device 2000x
    slower needs 100 steps x 13.9 ms x 2000 = 2778 simulated seconds (139 wall s), so it misses the round, which
    closes on the deadline after 3 wall seconds (on a wall-clock deadline: 60 s). round_seconds also holds the
    harness's wait (<= 10 s) for the busy straggler to take the new model."""
    proc = _simulate(tmp_path, 1, "time_scale: 0.05, sleepers: 0, stragglers: 0.25, straggler_factor: 2000", 60)

    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["round_status"] == ["committed"] and out["devices_per_round"] == [3], out
    assert all(s < 30 for s in out["round_seconds"]), out["round_seconds"]  # wall seconds: 60 simulated = 3 wall
