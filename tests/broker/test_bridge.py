"""Edge gateways: three site Mosquittos bridged to a central one, as `tinyfleet broker-config --bridge` writes them.

Real mosquitto processes on free loopback ports, per-device users and ACLs everywhere. The same six host devices
(real DeviceAgents training the tiny plan) run two rounds on a flat broker and on the bridged topology: the
committed models are identical, also when one site broker is SIGKILLed and restarted right after a round started
(no delta lost, none counted twice: every round accepts each of the six exactly once and the sums match). A
site's bridge password only speaks for that site's devices at the central broker.
"""

from __future__ import annotations

import os
import pwd
import threading
import time

import numpy as np
import paho.mqtt.client as paho
import pytest

from tests.broker.conftest import host_agent, wait_online
from tests.broker.test_acl import Mosquitto
from tests.conftest import require_cmd

pytestmark = pytest.mark.broker

FLEET = "edge"
SITES = {"siteA": ["a0", "a1"], "siteB": ["b0", "b1"], "siteC": ["c0", "c1"]}
DEVICES = [d for devs in SITES.values() for d in devs]


def _me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


class Fleet:
    """A coordinator on ``coord_url`` and the six devices, each on the URL ``device_url(d)`` gives."""

    def __init__(self, coord_url: str, device_url, store: str):
        from device_agent.mqtt import BrokerURL
        from fleet import round as rnd
        from fleet.coordinator import Coordinator, CoordinatorConfig, RoundClosed, WireCodec
        from fleet.mqtt import CoordinatorLink
        from fleet.store import Store
        from tests.fixtures.tiny import tiny_plan

        plan = tiny_plan()
        self.closed: list = []
        self.done = threading.Event()

        def on_output(o):
            if isinstance(o, RoundClosed):
                self.closed.append(o)
                self.done.set()

        cfg = CoordinatorConfig(round=rnd.RoundConfig(goal=len(DEVICES), quorum=1.0, deadline_s=60.0), lr=0.05,
                                local_steps=5)
        self.link = CoordinatorLink(BrokerURL.parse(coord_url), FLEET, lambda: Coordinator(
            plan, Store(store), cfg, time.time, WireCodec(plan)), on_output=on_output).start()
        self.agents = [host_agent(BrokerURL.parse(device_url(d)), FLEET, plan, d, seed=i).start()
                       for i, d in enumerate(DEVICES)]
        wait_online(self.link, len(DEVICES), what="devices did not register through the brokers")

    def round(self, after_start=None):
        from fleet.coordinator import StartRound

        self.done.clear()
        self.link.submit(StartRound())
        if after_start is not None:
            after_start()
        assert self.done.wait(60), "round did not close"
        rc = self.closed[-1]
        assert rc.committed and rc.accepted == tuple(sorted(DEVICES)), rc
        return self.link.call(lambda c: (c.hash, {k: v.copy() for k, v in c.state.items()}))

    def close(self):
        for a in self.agents:
            a.stop()
        self.link.stop()


def _url(user: str, password: str, port: int) -> str:
    return f"mqtt://{user}:{password}@127.0.0.1:{port}"


def test_bridged_sites_commit_what_the_flat_broker_commits(tmp_path):
    require_cmd("mosquitto")
    from fleet.security.broker_config import Bridge, write_broker_config
    from fleet.sim.broker import free_port

    # Prepare / Execute (flat): one broker, every device on it
    flat = write_broker_config(tmp_path / "flat", FLEET, DEVICES, port=free_port(), bind="127.0.0.1", run_as=_me())
    m = Mosquitto(flat)
    try:
        f = Fleet(_url(*flat.coordinator, flat.port), lambda d: _url(d, flat.devices[d], flat.port),
                  str(tmp_path / "flat.sqlite"))
        want = [f.round(), f.round()]
        f.close()
    finally:
        m.stop()

    # Prepare (bridged): the central broker knows the sites; each site broker its own devices and the bridge
    central = write_broker_config(tmp_path / "central", FLEET, [], port=free_port(), bind="127.0.0.1", run_as=_me(),
                                  sites=SITES)
    site_files = {s: write_broker_config(tmp_path / s, FLEET, devs, port=free_port(), bind="127.0.0.1", run_as=_me(),
                                         bridge=Bridge(s, f"127.0.0.1:{central.port}", central.sites[s]["password"]))
                  for s, devs in SITES.items()}
    assert site_files["siteA"].coordinator is None and "coordinator" not in site_files["siteA"].passwd.read_text()
    brokers = {"central": Mosquitto(central), **{s: Mosquitto(fs) for s, fs in site_files.items()}}
    site_of = {d: s for s, devs in SITES.items() for d in devs}
    try:
        f = Fleet(_url(*central.coordinator, central.port),
                  lambda d: _url(d, site_files[site_of[d]].devices[d], site_files[site_of[d]].port),
                  str(tmp_path / "bridged.sqlite"))

        def kill_site_b():  # mid-round: tasks are out, deltas on their way through siteB's broker
            time.sleep(0.05)
            brokers["siteB"].proc.kill()
            brokers["siteB"].proc.wait()
            time.sleep(1.0)
            brokers["siteB"] = Mosquitto(site_files["siteB"])

        # Execute
        got = [f.round(), f.round(after_start=kill_site_b)]
        forged = _forge(central, "siteA", "b0")
        f.close()
    finally:
        for b in brokers.values():
            b.stop()

    # Assert: the same models, bit for bit; the forged delta never reached the coordinator's topic
    for (h1, s1), (h2, s2) in zip(want, got):
        assert h1 == h2
        assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    assert forged == ["marker"], forged


def _forge(central, site: str, other_device: str) -> list[str]:
    """Log in at the central broker with ``site``'s bridge password, publish a delta as ``other_device`` (of
    another site), then one as the site's own first device as a marker; return what a coordinator-side
    subscriber received (in order: one client's publishes are routed in order)."""
    from fleet.security.broker_config import bridge_user

    got: list[str] = []
    seen = threading.Event()
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="forge-sub", protocol=paho.MQTTv5)
    sub.username_pw_set(*central.coordinator)

    def on_message(c, u, msg):
        got.append(msg.payload.decode())
        if msg.payload == b"marker":
            seen.set()
    sub.on_message = on_message
    sub.connect("127.0.0.1", central.port)
    sub.loop_start()
    sub.subscribe(f"tinyfleet/{FLEET}/dev/+/delta", 1)
    time.sleep(0.3)
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="forge-pub", protocol=paho.MQTTv5)
    pub.username_pw_set(bridge_user(site), central.sites[site]["password"])
    pub.connect("127.0.0.1", central.port)
    pub.loop_start()
    pub.publish(f"tinyfleet/{FLEET}/dev/{other_device}/delta", b"forged", qos=1).wait_for_publish(5)
    pub.publish(f"tinyfleet/{FLEET}/dev/{SITES[site][0]}/delta", b"marker", qos=1).wait_for_publish(5)
    seen.wait(5)
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()
    return got
