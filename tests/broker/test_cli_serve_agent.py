"""`tinyfleet serve` + two `device-agent run` processes through a real Mosquitto: one signed round."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from tests.conftest import ROOT


def test_serve_and_two_device_agents_commit_a_round(broker, tmp_path):
    from device_agent.wire.plan import plan_to_bytes
    from tests.fixtures.tiny import tiny_dataset, tiny_plan

    (tmp_path / "plan.ttp").write_bytes(plan_to_bytes(tiny_plan()))
    (tmp_path / "fleet.yaml").write_text(
        f"name: clitest\nbroker: mqtt://127.0.0.1:{broker.port}\ndevices: 2\nrounds: 1\nlocal_steps: 5\n"
        "deadline: 30\n")
    for i in range(2):
        x, y = tiny_dataset(32, seed=i)
        np.savez(tmp_path / f"d{i}.npz", x=x, y=y)
    store = tmp_path / "store.sqlite"
    serve = subprocess.Popen([sys.executable, "-m", "fleet.cli", "serve", str(tmp_path / "fleet.yaml"),
                              "--store", str(store), "--plan", str(tmp_path / "plan.ttp")],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True)
    agents = []
    try:
        assert "plan" in serve.stderr.readline()  # key written and plan published
        for i in range(2):
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "device_agent.cli", "run", "--broker", f"mqtt://127.0.0.1:{broker.port}",
                 "--id", f"d{i}", "--fleet", "clitest", "--data", str(tmp_path / f"d{i}.npz"),
                 "--pubkey", f"{store}.key.pem.pub"], cwd=ROOT, stderr=subprocess.PIPE, text=True))

        rc = serve.wait(timeout=60)
        err = serve.stderr.read()
    finally:
        for p in [serve, *agents]:
            p.terminate()
            p.wait(10)

    assert rc == 0, err
    assert "round 1: committed v2 (2 deltas)" in err
