"""Async buffered rounds end to end through a real Mosquitto: the coordinator's MQTT link and host DeviceAgents."""

from __future__ import annotations

import threading
import time

import numpy as np


def test_async_commits_every_k_over_mqtt(broker, tmp_path):
    from device_agent.buffer import SampleBuffer
    from device_agent.engine.trainer import Trainer
    from device_agent.mqtt import DeviceAgent
    from device_agent.protocol import DeviceProtocol, Identity, WireDeviceCodec
    from device_agent.wire.envelope import Verifier
    from fleet import round as rnd
    from fleet.coordinator import Coordinator, CoordinatorConfig, RoundClosed, StartRound, Verdict, WireCodec
    from fleet.coordinator.async_round import AsyncConfig
    from fleet.mqtt import CoordinatorLink
    from fleet.store import Store
    from tests.fixtures.tiny import tiny_dataset, tiny_plan

    plan = tiny_plan()
    outputs: list = []
    lock = threading.Lock()

    def record(o):
        with lock:
            outputs.append(o)

    def of(cls):
        with lock:
            return [o for o in outputs if isinstance(o, cls)]

    def wait(pred, timeout=30.0):
        end = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < end, "timed out"
            time.sleep(0.05)

    cfg = CoordinatorConfig(round=rnd.RoundConfig(goal=2), lr=0.05, local_steps=5, mode="async",
                            asynchronous=AsyncConfig(buffer_size=2, max_staleness=4, task_timeout_s=20.0))
    store_path = str(tmp_path / "async.sqlite")
    link = CoordinatorLink(broker.url, "ta", lambda: Coordinator(plan, Store(store_path), cfg, time.time,
                                                                 WireCodec(plan)), on_output=record).start()
    agents = []
    try:
        for i in range(4):
            x, y = tiny_dataset(32, seed=i)
            buf = SampleBuffer(32, x.shape[1:], np.int8, seed=i)
            buf.add(x, y)
            proto = DeviceProtocol(Identity(f"d{i}", "host", 1 << 20, 1 << 20), plan, Trainer(plan),
                                   WireDeviceCodec(plan, Verifier.unsigned()), buf, seed=i)
            agents.append(DeviceAgent(broker.url, "ta", proto, will_delay=0).start())
        wait(lambda: link.call(lambda c: sum(r.online for r in c.registry.devices.values())) == 4)

        link.submit(StartRound())
        wait(lambda: len(of(RoundClosed)) >= 5, timeout=60.0)

        closed = of(RoundClosed)[:5]
        assert [c.version for c in closed] == [2, 3, 4, 5, 6]
        assert all(c.committed and len(c.accepted) == 2 == len(set(c.accepted)) for c in closed)
        assert all(c.detail.startswith("staleness ") for c in closed)
        # every stored delta sits in exactly one buffer; no device counts twice in one version
        version, buffer, rows = link.call(lambda c: (c.version, dict(c.machine.buffer), [
            (r.round_id, r.device_id) for b in range(1, c.version + 1) for r, _ in c.store.buffered(b)]))
        assert len(rows) == len(set(rows)) == 2 * (version - 1) + len(buffer)
        assert not [v for v in of(Verdict) if v.reason not in ("ok", "duplicate", "too_stale", "wrong_round")]
        # devices follow the newest versions through model/current (DIFF) or their FULL catch-up
        wait(lambda: min(a.protocol.version for a in agents) >= 4, timeout=30.0)
    finally:
        for a in agents:
            a.stop()
        link.stop()
