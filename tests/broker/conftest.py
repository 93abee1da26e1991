"""Broker-group fixtures: each test gets its own Mosquitto on a free loopback port, stopped afterwards; the pieces
of a fleet the broker tests share (host devices on the tiny plan, waiting for them to register, `tinyfleet serve`
with two `device-agent run` processes)."""

from __future__ import annotations

import time

import pytest

from tests.conftest import require_cmd


def host_agent(url, fleet: str, plan, device_id: str, seed: int, samples: int = 32):
    """A host device (a :class:`DeviceAgent`, not started) training ``plan`` on ``tiny_dataset(samples, seed)``
    through ``url`` (a URL string or a BrokerURL with its credentials)."""
    import numpy as np

    from device_agent.buffer import SampleBuffer
    from device_agent.engine.trainer import Trainer
    from device_agent.mqtt import DeviceAgent
    from device_agent.protocol import DeviceProtocol, Identity, WireDeviceCodec
    from device_agent.wire.envelope import Verifier
    from tests.fixtures.tiny import tiny_dataset

    x, y = tiny_dataset(samples, seed=seed)
    buf = SampleBuffer(samples, x.shape[1:], np.int8, seed=seed)
    buf.add(x, y)
    proto = DeviceProtocol(Identity(device_id, "host", 1 << 20, 1 << 20), plan, Trainer(plan),
                           WireDeviceCodec(plan, Verifier.unsigned()), buf, seed=seed)
    return DeviceAgent(url, fleet, proto, will_delay=0)


def online(link) -> int:
    """Devices the coordinator behind ``link`` counts online."""
    return link.call(lambda c: sum(r.online for r in c.registry.devices.values()))


def wait_online(link, n: int, timeout: float = 30.0, what: str = "devices did not register") -> None:
    """Wait until the coordinator counts at least ``n`` devices online; fail with ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while online(link) < n:
        assert time.monotonic() < end, what
        time.sleep(0.05)


@pytest.fixture
def broker(tmp_path):
    """A started :class:`fleet.sim.broker.EmbeddedBroker` with persistence (so ``restart()`` keeps sessions)."""
    require_cmd("mosquitto")
    from fleet.sim.broker import EmbeddedBroker

    b = EmbeddedBroker(persistence=True, workdir=tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.close()


class TinyFleet:
    """A coordinator (CoordinatorLink) and ``n`` host devices (DeviceAgent) on the engine's tiny plan, all
    through the broker under test. Outputs of the coordinator are recorded in ``outputs``."""

    def __init__(self, url, store_path, n=3, fleet="t", goal=None, quorum=0.5, deadline=20.0, dup_deltas=False):
        import threading

        from fleet import round as rnd
        from fleet.coordinator import Coordinator, CoordinatorConfig, WireCodec
        from fleet.mqtt import CoordinatorLink
        from fleet.store import Store
        from tests.fixtures.tiny import tiny_plan

        self.plan = plan = tiny_plan()
        self.outputs: list = []
        self.cv = threading.Condition()
        cfg = CoordinatorConfig(round=rnd.RoundConfig(goal=goal or n, over_selection=1.0, quorum=quorum,
                                                      deadline_s=deadline), lr=0.05, local_steps=5)
        self.link = CoordinatorLink(url, fleet, lambda: Coordinator(plan, Store(store_path), cfg, time.time,
                                                                    WireCodec(plan)), on_output=self._record)
        self.link.start()
        self.agents = []
        for i in range(n):
            agent = host_agent(url, fleet, plan, f"d{i}", seed=i)
            if dup_deltas:  # every delta published twice: what a QoS 1 redelivery looks like to the coordinator
                pub = agent.endpoint.publish

                def twice(topic, payload, retain=False, _pub=pub):
                    info = _pub(topic, payload, retain)
                    if topic.endswith("/delta"):
                        _pub(topic, payload, retain)
                    return info
                agent.endpoint.publish = twice
            self.agents.append(agent.start())
        self.wait(lambda: self.online() == n)

    def _record(self, out):
        with self.cv:
            self.outputs.append(out)
            self.cv.notify_all()

    def of(self, cls):
        with self.cv:
            return [o for o in self.outputs if isinstance(o, cls)]

    def wait(self, pred, timeout=20.0):
        end = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < end, "timed out"
            time.sleep(0.05)

    def run_round(self, timeout=30.0, after_start=None):
        from fleet.coordinator import RoundClosed, StartRound

        n = len(self.of(RoundClosed))
        self.link.submit(StartRound())
        if after_start is not None:
            after_start()
        self.wait(lambda: len(self.of(RoundClosed)) > n, timeout)
        return self.of(RoundClosed)[-1]

    def online(self):
        return online(self.link)

    def state(self):
        return self.link.call(lambda c: {k: v.copy() for k, v in c.state.items()})

    def close(self):
        for a in self.agents:
            a.stop()
        self.link.stop()


@pytest.fixture
def tiny_fleet(broker, tmp_path):
    """``tiny_fleet(n=3, **kw)`` -> a started :class:`TinyFleet` on the ``broker`` fixture; closed afterwards."""
    made = []

    def make(**kw):
        f = TinyFleet(broker.url, str(tmp_path / f"store{len(made)}.sqlite"), fleet=f"t{len(made)}", **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def tiny_fleet_files(tmp_path, name: str, port: int, settings: str) -> None:
    """What `tinyfleet serve` and two agents of the tiny plan read: ``tmp_path/plan.ttp``, ``tmp_path/fleet.yaml``
    (fleet ``name``, 2 devices on the broker at ``port``, then the YAML lines ``settings``), ``d0.npz``, ``d1.npz``."""
    import numpy as np

    from device_agent.wire.plan import plan_to_bytes
    from tests.fixtures.tiny import tiny_dataset, tiny_plan

    (tmp_path / "plan.ttp").write_bytes(plan_to_bytes(tiny_plan()))
    (tmp_path / "fleet.yaml").write_text(f"name: {name}\nbroker: mqtt://127.0.0.1:{port}\ndevices: 2\n{settings}")
    for i in range(2):
        x, y = tiny_dataset(32, seed=i)
        np.savez(tmp_path / f"d{i}.npz", x=x, y=y)


@pytest.fixture
def serve_tiny(broker, tmp_path):
    """``serve_tiny(name, settings, serve_args=(), store=None)`` -> ``(rc, stderr)``: `tinyfleet serve` of the tiny
    plan (``tmp_path/plan.ttp``) for the fleet ``name`` of ``tmp_path/fleet.yaml`` (2 devices on the ``broker``
    fixture, then the YAML lines ``settings``) with two `device-agent run` processes on ``tmp_path/d0.npz``,
    ``d1.npz``; the store is ``tmp_path/store.sqlite`` unless given. Every process has ended when it returns."""
    from tests.fixtures.serve import serve_with_agents

    def run(name: str, settings: str, serve_args=(), store=None):
        tiny_fleet_files(tmp_path, name, broker.port, settings)
        return serve_with_agents(tmp_path / "fleet.yaml", store or tmp_path / "store.sqlite",
                                 [tmp_path / f"d{i}.npz" for i in range(2)], name, broker.port,
                                 ["--plan", tmp_path / "plan.ttp", *serve_args])

    return run
