"""A device through a real Mosquitto: a clean stop publishes ``offline`` (with the version it holds) before
DISCONNECT and the broker drops the Last Will; a crash gets the Last Will, which carries no stale version; a task
the device cannot train is answered with a ``failed`` status; the CLI logs what happens and stops cleanly on
SIGTERM.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from device_agent.buffer import SampleBuffer
from device_agent.engine.trainer import Trainer
from device_agent.mqtt import DeviceAgent, MqttEndpoint
from device_agent.protocol import DeviceProtocol, Identity, WireDeviceCodec
from device_agent.wire.envelope import Verifier
from device_agent.wire.messages import Status, Task, full_topic, parse
from device_agent.wire.plan import plan_to_bytes
from device_agent.wire.update import trainable_state, update_from_state, update_hash
from tests.conftest import ROOT
from tests.fixtures.tiny import tiny_dataset, tiny_plan

FLEET = "errs"
PLAN = tiny_plan()
MODEL_V1 = update_from_state(PLAN, trainable_state(PLAN), base_version=0, new_version=1).to_bytes()


def topic(rel: str) -> str:
    return full_topic(FLEET, rel)


def collector(broker, subs: list[str], client_id: str = "watcher") -> tuple[MqttEndpoint, queue.Queue]:
    got: queue.Queue = queue.Queue()
    ep = MqttEndpoint(broker.url, client_id, subs, lambda t, p, ack: (got.put((t, p)), ack()), session_expiry=0)
    return ep.start(), got


def statuses(got: queue.Queue, until, timeout: float = 10.0) -> list[Status]:
    """Status messages from ``got`` until one satisfies ``until`` (or the timeout: AssertionError)."""
    seen, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            _, payload = got.get(timeout=max(0.05, end - time.monotonic()))
        except queue.Empty:
            break
        seen.append(parse(payload, Status))
        if until(seen[-1]):
            return seen
    raise AssertionError(f"no matching status; saw {seen}")


def holds_v1(agent: DeviceAgent, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while ("model", "v1") not in agent.notes:
        assert time.monotonic() < end, list(agent.notes)
        time.sleep(0.02)


def device(broker, samples: int = 8) -> DeviceAgent:
    x, y = tiny_dataset(max(samples, 1))
    buf = SampleBuffer(16, x.shape[1:])
    if samples:
        buf.add(x[:samples], y[:samples])
    proto = DeviceProtocol(Identity("d1", "host", 1 << 20, 1 << 20), PLAN, Trainer(PLAN),
                           WireDeviceCodec(PLAN, Verifier.unsigned()), buf)
    return DeviceAgent(broker.url, FLEET, proto, will_delay=0)


def publish_model(broker) -> MqttEndpoint:
    coord = MqttEndpoint(broker.url, "coord", [], lambda t, p, a: a(), session_expiry=0).start()
    coord.publish(topic("model/current"), MODEL_V1, retain=True).wait_for_publish(5)
    return coord


def test_clean_stop_publishes_offline_with_its_version_and_no_will(broker):
    # Prepare: a device holding model v1
    coord = publish_model(broker)
    watcher, got = collector(broker, [topic("dev/d1/status")])
    agent = device(broker).start()
    holds_v1(agent)
    # Execute
    agent.stop(graceful=True)
    seen = statuses(got, lambda s: s.state == "offline")
    time.sleep(1.0)  # will delay is 0: a will would arrive by now
    # Assert: the device's own offline status, with its version; no will after it
    assert agent.said_offline and seen[-1].model_version == 1 and seen[-1].samples == 8
    assert got.empty()
    watcher.stop(), coord.stop()


def test_crash_publishes_a_will_without_a_stale_version(broker):
    # Prepare
    coord = publish_model(broker)
    watcher, got = collector(broker, [topic("dev/d1/status")])
    agent = device(broker).start()
    holds_v1(agent)
    # Execute: drop the socket, as a crash would
    agent.stop(graceful=False)
    seen = statuses(got, lambda s: s.state == "offline")
    # Assert
    assert seen[-1].model_version is None and seen[-1].samples is None
    watcher.stop(), coord.stop()


@pytest.mark.parametrize(("samples", "plan_hash", "reason"), [(0, None, "no_samples"), (8, "ee" * 32, "wrong_plan")])
def test_task_it_cannot_train_is_answered_with_failed(broker, samples, plan_hash, reason):
    # Prepare
    coord = publish_model(broker)
    watcher, got = collector(broker, [topic("dev/d1/status"), topic("dev/d1/delta")])
    agent = device(broker, samples).start()
    holds_v1(agent)
    task = Task(7, plan_hash or agent.protocol.codec.plan_hash, 1, update_hash(MODEL_V1).hex(), 0.1, 2, 2, 0.0)
    # Execute
    coord.publish(topic("dev/d1/task"), task.to_json()).wait_for_publish(5)
    seen = statuses(got, lambda s: s.state == "failed")
    # Assert
    assert (seen[-1].round_id, seen[-1].reason) == (7, reason)
    assert any(what == reason for what, _ in agent.notes)
    agent.stop(), watcher.stop(), coord.stop()


def test_cli_logs_a_failed_round_and_stops_cleanly_on_sigterm(broker, tmp_path):
    # Prepare: a device-agent process with a plan file and good data
    (tmp_path / "plan.ttp").write_bytes(plan_to_bytes(PLAN))
    x, y = tiny_dataset(8)
    np.savez(tmp_path / "d1.npz", x=x, y=y)
    coord = publish_model(broker)
    watcher, got = collector(broker, [topic("dev/d1/status")])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--broker", f"mqtt://127.0.0.1:{broker.port}",
                             "--id", "d1", "--fleet", FLEET, "--data", str(tmp_path / "d1.npz"), "--plan",
                             str(tmp_path / "plan.ttp"), "--insecure-unsigned", "--will-delay", "0"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        while "device-agent: d1: model: v1" not in lines:  # the agent logs each event on one line
            line = proc.stderr.readline()
            assert line, lines
            lines.append(line.strip())
        task = Task(3, "ee" * 32, 1, update_hash(MODEL_V1).hex(), 0.1, 2, 2, 0.0)
        coord.publish(topic("dev/d1/task"), task.to_json()).wait_for_publish(5)
        statuses(got, lambda s: s.state == "failed")
        # Execute
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        err = "\n".join(lines) + "\n" + proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    # Assert: one line per event, the failure named, offline published before leaving
    assert rc == 0 and "Traceback" not in err, err
    assert "device-agent: d1: wrong_plan: round 3 failed: task plan eeeeeeeeeeeeeeee" in err
    assert "device-agent: d1: stopped: offline status published" in err
    last = statuses(got, lambda s: s.state == "offline")[-1]
    assert last.model_version == 1 and json.loads(last.to_json())["samples"] == 8
    watcher.stop(), coord.stop()


def test_agent_with_a_wrong_fleet_name_says_so(broker, tmp_path):
    # Prepare: a coordinator's retained plan under fleet "errs"; the device asks for fleet "eros"
    ep, _ = collector(broker, [], client_id="coordinator")
    ep.publish(topic("plan/abc"), plan_to_bytes(PLAN), retain=True)
    x, y = tiny_dataset(8)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    # Execute
    proc = subprocess.run([sys.executable, "-m", "device_agent.cli", "run", "--broker", f"mqtt://127.0.0.1:{broker.port}",
                           "--id", "d0", "--fleet", "eros", "--data", str(tmp_path / "d.npz"), "--insecure-unsigned",
                           "--connect-timeout", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    ep.stop()
    # Assert: the message names the fleet it looked for and the config's `name:` as the likely cause
    assert proc.returncode != 0
    assert "--fleet 'eros' must equal the config's `name:`" in proc.stderr and "tinyfleet serve" in proc.stderr, \
        proc.stderr
