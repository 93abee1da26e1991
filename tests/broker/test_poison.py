"""Poison messages against a live `tinyfleet serve` and real device agents: nested JSON and garbage on every
device topic, before and after a coordinator restart, never stall a round (hardening finding 2)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.broker.conftest import tiny_fleet_files
from tests.conftest import ROOT

POISON = [b"[" * 995, b"{" * 3000, b"\xff\xfe garbage", b"", b'{"v": 1, "type": "hello", "device_id": ' * 50]


def _flood(port: int, fleet: str, devices: dict[str, int]) -> None:
    """Every poison payload ``devices[id]`` times on each of that device's topics."""
    import paho.mqtt.client as paho

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="poisoner", protocol=paho.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for dev, times in devices.items():
            for kind in ("hello", "status", "delta"):
                for payload in POISON:
                    for _ in range(times):
                        c.publish(f"tinyfleet/{fleet}/dev/{dev}/{kind}", payload, qos=1).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()


def _serve(tmp_path, rounds: int):
    return subprocess.Popen([sys.executable, "-m", "fleet.cli", "serve", str(tmp_path / "fleet.yaml"),
                             "--store", str(tmp_path / "store.sqlite"), "--plan", str(tmp_path / "plan.ttp"),
                             "--rounds", str(rounds)], cwd=ROOT, stderr=subprocess.PIPE, text=True)


def test_poison_on_every_device_topic_stalls_no_round_across_a_coordinator_restart(broker, tmp_path):
    # Prepare: a fleet of two real agents, and a poisoner flooding an unknown device's topics and sending some
    # garbage on the good devices' topics (NOTE: under the broker ACL only a device itself can publish there; the
    # per-device rate limits stop a device that floods its own topics, at its own expense)
    tiny_fleet_files(tmp_path, "poison", broker.port, "local_steps: 5\ndeadline: 30\n")
    serve = _serve(tmp_path, 1)
    agents = []
    try:
        assert "plan" in serve.stderr.readline()
        _flood(broker.port, "poison", {"evil": 8, "d0": 1, "d1": 1})
        for i in range(2):
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "device_agent.cli", "run", "--broker", f"mqtt://127.0.0.1:{broker.port}",
                 "--id", f"d{i}", "--fleet", "poison", "--data", str(tmp_path / f"d{i}.npz"),
                 "--pubkey", f"{tmp_path / 'store.sqlite'}.key.pem.pub"], cwd=ROOT, stderr=subprocess.PIPE,
                text=True))
        # Execute: round 1 under poison
        t0 = time.monotonic()
        rc1 = serve.wait(timeout=60)
        first = serve.stderr.read()
        first_s = time.monotonic() - t0
        # Execute: poison again while no coordinator runs (its persistent session queues it), then restart
        _flood(broker.port, "poison", {"evil": 8, "d0": 1})
        serve = _serve(tmp_path, 2)
        rc2 = serve.wait(timeout=60)
        second = serve.stderr.read()
    finally:
        for p in [serve, *agents]:
            p.send_signal(signal.SIGTERM)
            p.wait(10)
    # Assert: both rounds committed both deltas, well before their 30 s deadline
    assert rc1 == 0 and "round 1: committed v2 (2 deltas)" in first, first
    assert first_s < 25, first
    logs = "".join(p.stderr.read() for p in agents)
    assert rc2 == 0 and "round 2: committed v3 (2 deltas)" in second, second + logs
