"""Masked rounds through a real Mosquitto: host devices, dropouts at each stage, threshold abort, nothing stored.

Each secure fleet is checked against a plain FedAvg fleet of the same devices (same seeds, same data) on the same
broker: the committed model must be bit for bit the one plain FedAvg commits from the devices in the masked sum.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.wire.secagg_frames import secagg_from_bytes
from fleet.coordinator import RoundClosed, StartRound
from fleet.security.secagg_config import SecureAggregationConfig
from tests.broker.conftest import host_agent, wait_online


class Fleet:
    """A coordinator (CoordinatorLink) and host devices d0..d<n-1> (DeviceAgent) on the tiny plan.

    ``silent_after`` maps a device to a message kind (e.g. ``"MaskedInput"``): once it has published that kind,
    it publishes no further secure-aggregation message and is then killed (socket dropped: its Last Will goes).
    """

    def __init__(self, url, store_path, fleet, n=4, secure=True, silent_after=None, skip=(), dp=None):
        from fleet import round as rnd
        from fleet.coordinator import Coordinator, CoordinatorConfig, WireCodec
        from fleet.mqtt import CoordinatorLink
        from fleet.store import Store
        from tests.fixtures.tiny import tiny_plan

        self.plan = plan = tiny_plan()
        self.store_path = store_path
        self.outputs: list = []
        self.cv = threading.Condition()
        self.masked: dict[str, bytes] = {}  # device -> its masked input's values as sent
        sa = SecureAggregationConfig(threshold=0.6, stage_timeout=5.0) if secure else None
        ids = [f"d{i}" for i in range(n) if f"d{i}" not in skip]
        cfg = CoordinatorConfig(round=rnd.RoundConfig(goal=len(ids), over_selection=1.0, quorum=0.5,
                                                      deadline_s=20.0), lr=0.05, local_steps=5,
                                secure_aggregation=sa, dp=dp)
        self.link = CoordinatorLink(url, fleet, lambda: Coordinator(plan, Store(store_path), cfg, time.time,
                                                                    WireCodec(plan)), on_output=self._record)
        self.link.start()
        self.agents = {}
        self.went_silent = {d: threading.Event() for d in (silent_after or {})}
        self.last_sent = {}  # device -> the MessageInfo of the last message it sent before going silent
        for did in ids:
            agent = host_agent(url, fleet, plan, did, seed=int(did[1:]))
            self._tap(agent, did, (silent_after or {}).get(did))
            self.agents[did] = agent.start()
        wait_online(self.link, len(ids))

    def _tap(self, agent, did, silent_after):
        pub = agent.endpoint.publish

        def publish(topic, payload, retain=False):
            if topic.endswith("/secagg"):
                if did in self.went_silent and self.went_silent[did].is_set():
                    return None  # a dead device sends nothing more
                kind = type(secagg_from_bytes(payload)[1]).__name__
                if kind == "MaskedInput":
                    self.masked[did] = payload
                if kind == silent_after:
                    info = pub(topic, payload, retain)
                    self.last_sent[did] = info
                    self.went_silent[did].set()
                    return info
            return pub(topic, payload, retain)
        agent.endpoint.publish = publish

    def _record(self, out):
        with self.cv:
            self.outputs.append(out)
            self.cv.notify_all()

    def closed(self):
        with self.cv:
            return [o for o in self.outputs if isinstance(o, RoundClosed)]

    def wait(self, pred, timeout=30.0):
        end = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < end, "timed out"
            time.sleep(0.05)

    def run_round(self, timeout=40.0):
        n = len(self.closed())
        self.link.submit(StartRound())
        end = time.monotonic() + timeout
        while len(self.closed()) == n:
            for did, ev in self.went_silent.items():
                # NOTE: killed once its last message left (PUBACKed), not while paho still queues it
                sent = self.last_sent.get(did)
                if ev.is_set() and (sent is None or sent.is_published()) and self.agents[did].endpoint.connected.is_set():
                    self.agents[did].stop(graceful=False)
            assert time.monotonic() < end, "round did not close"
            time.sleep(0.05)
        return self.closed()[-1]

    def state(self):
        return self.link.call(lambda c: {k: v.copy() for k, v in c.state.items()})

    def close(self):
        for a in self.agents.values():
            a.stop()
        self.link.stop()


@pytest.fixture
def fleets(broker, tmp_path):
    made = []

    def make(**kw):
        f = Fleet(broker.url, str(tmp_path / f"store{len(made)}.sqlite"), f"s{len(made)}", **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def same(a, b) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_drop_after_masked_input_commits_the_exact_sum(fleets):
    secure = fleets(silent_after={"d2": "MaskedInput"})
    closed = secure.run_round()
    assert closed.committed and closed.accepted == ("d0", "d1", "d2", "d3"), closed  # d2's input is in the sum
    plain = fleets(secure=False)
    ref = plain.run_round()
    assert ref.committed and ref.accepted == closed.accepted
    assert same(secure.state(), plain.state())


def test_drop_after_sharing_keys_commits_the_survivors_exact_sum(fleets):
    secure = fleets(silent_after={"d1": "ShareKeys"})
    closed = secure.run_round()
    assert closed.committed and closed.accepted == ("d0", "d2", "d3"), closed
    plain = fleets(secure=False, skip=("d1",))
    assert plain.run_round().accepted == closed.accepted
    assert same(secure.state(), plain.state())
    # the coordinator's store holds no individual update, masked or not: no delta row, no masked bytes
    db = sqlite3.connect(secure.store_path)
    assert db.execute("SELECT COUNT(*) FROM deltas").fetchone() == (0,)
    raw = b"".join(p.read_bytes() for p in Path(secure.store_path).parent.glob(Path(secure.store_path).name + "*"))
    assert len(secure.masked) == 3
    for payload in secure.masked.values():
        y = secagg_from_bytes(payload)[1].y
        assert y[:16].tobytes() not in raw


def test_below_threshold_aborts_with_the_model_unchanged(fleets):
    secure = fleets(silent_after={"d0": "AdvertiseKeys", "d3": "AdvertiseKeys"})
    before = secure.state()
    closed = secure.run_round()
    assert not closed.committed and closed.version == 1 and "threshold 3" in closed.detail, closed
    assert same(secure.state(), before)


def test_masked_dp_round_spends_a_skellam_round_and_moves_the_model(fleets):
    from fleet.security.dp import DPConfig

    secure = fleets(dp=DPConfig(clip=0.5, noise_multiplier=1.0))
    before = secure.state()
    closed = secure.run_round()
    assert closed.committed and len(closed.accepted) == 4 and 4.0 < closed.epsilon < 5.5, closed
    assert not same(secure.state(), before)
    assert secure.link.call(lambda c: len(c.accountant.rounds[0])) == 5  # a Skellam round, stored with the model


def test_medical_pilot_config_masked_round_over_tls_with_per_device_credentials(tmp_path, monkeypatch):
    """configs/medical-heart-secure.yaml's policy through Mosquitto as broker-config writes it (TLS, a user and an
    ACL per device): 16 host devices, one masked round, the model moves; a device reads only its own relay."""
    import os
    import pwd

    import paho.mqtt.client as paho

    from device_agent.mqtt import BrokerURL
    from fleet.coordinator import Coordinator, WireCodec
    from fleet.mqtt import CoordinatorLink
    from fleet.schema import load_fleet_config
    from fleet.security.broker_config import write_broker_config
    from fleet.sim.broker import free_port
    from fleet.store import Store
    from tests.broker.test_acl import Mosquitto
    from tests.conftest import ROOT, require_cmd
    from tests.fixtures.tiny import tiny_plan

    require_cmd("mosquitto")
    ids = [f"h{h}-d{i}" for h in range(4) for i in range(4)]
    files = write_broker_config(tmp_path / "pilot" / "broker", "medical-heart-secure", ids, tls=True, port=free_port(),
                                bind="127.0.0.1", run_as=pwd.getpwuid(os.geteuid()).pw_name)
    monkeypatch.chdir(tmp_path)  # where serve runs: pilot/broker/ca.crt, as the config's commented tls block says
    user, pw = files.coordinator
    cfg = load_fleet_config(ROOT / "configs" / "medical-heart-secure.yaml",
                            broker=f"mqtts://{user}:{pw}@127.0.0.1:{files.port}",
                            tls={"ca_file": "pilot/broker/ca.crt"})
    assert cfg.secure_aggregation is not None and cfg.dp is None
    mosq = Mosquitto(files)
    plan = tiny_plan()  # NOTE: the pilot's policy and security on the tiny plan: the heart model needs its data
    closed: list = []
    link = CoordinatorLink(BrokerURL.parse(cfg.broker, **cfg.tls_files()), cfg.name,
                           lambda: Coordinator(plan, Store(str(tmp_path / "c.db")), cfg.coordinator_config(),
                                               time.time, WireCodec(plan)),
                           on_output=lambda o: closed.append(o) if isinstance(o, RoundClosed) else None,
                           client_id="coordinator")
    agents = []
    try:
        link.start()
        for i, dev in enumerate(ids):
            url = BrokerURL("127.0.0.1", files.port, tls=True, username=dev, password=files.devices[dev],
                            ca_file=str(files.ca_cert))
            agents.append(host_agent(url, cfg.name, plan, dev, seed=i, samples=16).start())
        # a curious device subscribes to another device's relay topic: the ACL delivers nothing
        spy_got: list = []
        spy = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="spy", protocol=paho.MQTTv5)
        spy.username_pw_set(ids[0], files.devices[ids[0]])
        spy.tls_set(ca_certs=str(files.ca_cert))
        spy.on_message = lambda _c, _u, m: spy_got.append(m.topic)
        spy.connect("127.0.0.1", files.port)
        spy.subscribe(f"tinyfleet/{cfg.name}/dev/{ids[1]}/secagg_relay", qos=1)
        spy.subscribe(f"tinyfleet/{cfg.name}/dev/+/secagg", qos=1)
        spy.subscribe(f"tinyfleet/{cfg.name}/dev/{ids[0]}/secagg_relay", qos=1)  # its own: the control
        spy.loop_start()
        wait_online(link, len(ids), what="devices never came online through the ACL")
        end = time.monotonic() + 30
        before = link.call(lambda c: {k: v.copy() for k, v in c.state.items()})
        link.submit(StartRound())
        while not closed:
            assert time.monotonic() < end + 60, "round did not close"
            time.sleep(0.05)
        time.sleep(0.5)
        spy.loop_stop()
        spy.disconnect()
        assert closed[0].committed and len(closed[0].accepted) >= cfg.goal_count, closed[0]
        assert not same(link.call(lambda c: c.state), before)
        assert link.call(lambda c: c.store.deltas(1)) == []
        own = f"tinyfleet/{cfg.name}/dev/{ids[0]}/secagg_relay"
        assert spy_got and set(spy_got) == {own}, spy_got  # its own relay only: no other device's, no uplinks
    finally:
        for a in agents:
            a.stop()
        link.stop()
        mosq.stop()
