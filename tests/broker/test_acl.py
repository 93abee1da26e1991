"""`tinyfleet broker-config` against a real Mosquitto: per-device users, %u ACL, packet size limit, TLS.

Each test writes a config with :func:`fleet.security.broker_config.write_broker_config` on a free port, starts
mosquitto with it, and probes it with raw paho clients (the attacker is a normal MQTT client with valid
credentials). What a client must *not* see is checked on the receiving side: a marker message published after
the forbidden ones proves that the forbidden ones would have arrived by then (one client's publishes are routed
in order).
"""

from __future__ import annotations

import json
import os
import pwd
import ssl
import stat
import subprocess
import threading
import time

import numpy as np
import paho.mqtt.client as paho
import pytest

from fleet.security import broker_config
from fleet.security.broker_config import BrokerConfigError, check_password, write_broker_config
from tests.conftest import require_cmd

FLEET = "acl"
P = f"tinyfleet/{FLEET}"
MAX_PACKET = 8192


class Mosquitto:
    def __init__(self, files):
        from fleet.sim.broker import find_mosquitto, wait_for_port

        self.files = files
        self.proc = subprocess.Popen([find_mosquitto(), "-c", str(files.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        if not wait_for_port("127.0.0.1", files.port, 10.0, self.proc):
            self.stop()
            log = (files.conf.parent / "mosquitto.log").read_text(errors="replace")
            raise RuntimeError(f"mosquitto did not start with {files.conf}: {log[-2000:]}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


def _start(tmp_path, tls: bool, devices=("a", "b")):
    require_cmd("mosquitto")
    from fleet.sim.broker import free_port

    files = write_broker_config(tmp_path / "broker", FLEET, list(devices), tls=tls, port=free_port(),
                                bind="127.0.0.1", max_packet_size=MAX_PACKET,
                                run_as=pwd.getpwuid(os.geteuid()).pw_name)
    return files, Mosquitto(files)


@pytest.fixture
def secured(tmp_path):
    files, m = _start(tmp_path, tls=False)
    try:
        yield files
    finally:
        m.stop()


@pytest.fixture
def secured_tls(tmp_path):
    files, m = _start(tmp_path, tls=True)
    try:
        yield files
    finally:
        m.stop()


class Client:
    """A raw paho v5 client that records CONNACK, SUBACKs, messages and the disconnect reason."""

    def __init__(self, files, user, password, *, tls=None, ca=None, reconnect=True, client_id=None):
        self.messages: list[tuple[str, bytes]] = []
        self.connack = None
        self.subacks: list = []
        self.disconnect = None
        self.cv = threading.Condition()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{user}-{time.time_ns()}",
                        protocol=paho.MQTTv5)
        if user is not None:
            c.username_pw_set(user, password)
        if files.tls if tls is None else tls:
            c.tls_set(ca_certs=str(ca or files.ca_cert), cert_reqs=ssl.CERT_REQUIRED)
        if not reconnect:
            c.reconnect_delay_set(3600, 3600)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = lambda _c, _u, _mid, rcs, _p: self._note(self.subacks.extend, list(rcs))
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self._note(setattr, self, "disconnect", rc)
        self.c = c
        self.error: Exception | None = None
        try:
            c.connect("127.0.0.1", files.port, keepalive=30)
            c.loop_start()
        except (OSError, ssl.SSLError) as e:
            self.error = e

    def _note(self, fn, *args):
        with self.cv:
            fn(*args)
            self.cv.notify_all()

    def _on_connect(self, _c, _u, _flags, rc, _p):
        self._note(setattr, self, "connack", rc)

    def _on_message(self, _c, _u, msg):
        self._note(self.messages.append, (msg.topic, bytes(msg.payload)))

    def wait(self, pred, timeout=5.0) -> bool:
        with self.cv:
            return self.cv.wait_for(pred, timeout)

    def connected(self, timeout=5.0) -> bool:
        ok = self.wait(lambda: self.connack is not None or self.disconnect is not None, timeout)
        return ok and self.connack is not None and not self.connack.is_failure

    def sub(self, topic):
        n = len(self.subacks)
        self.c.subscribe(topic, qos=1)
        assert self.wait(lambda: len(self.subacks) > n), f"no SUBACK for {topic}"
        return self.subacks[-1]

    def pub(self, topic, payload, retain=False):
        return self.c.publish(topic, payload, qos=1, retain=retain)

    def got(self, payload: bytes) -> list[str]:
        with self.cv:
            return [t for t, p in self.messages if p == payload]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def _login(files, who):
    if who == "coordinator":
        return files.coordinator
    return who, files.devices[who]


@pytest.fixture
def clients(secured):
    made = []

    def make(who, **kw):
        c = Client(secured, *_login(secured, who), **kw)
        made.append(c)
        assert c.connected(), f"{who} could not connect: {c.connack} {c.error}"
        return c

    yield secured, make
    for c in made:
        c.close()


def test_device_cannot_publish_on_other_devices_or_coordinator_topics(clients):
    _files, make = clients
    coord, a, b = make("coordinator"), make("a"), make("b")
    for k in ("hello", "status", "delta"):
        coord.sub(f"{P}/dev/+/{k}")
    for t in ("task", "ack"):
        b.sub(f"{P}/dev/b/{t}")
    b.sub(f"{P}/model/current")
    b.sub(f"{P}/plan/+")

    evil = b"forged-by-a"
    for topic in [f"{P}/dev/b/{k}" for k in ("hello", "status", "delta", "task", "ack")] + [
            f"{P}/model/current", f"{P}/plan/{'00' * 32}", f"{P}/dev/a/task", f"{P}/dev/a/ack", "elsewhere/x"]:
        a.pub(topic, evil)
    a.pub(f"{P}/dev/a/delta", b"marker").wait_for_publish(5)
    assert coord.wait(lambda: coord.got(b"marker"))
    b.pub(f"{P}/dev/b/hello", b"b-marker").wait_for_publish(5)
    assert coord.wait(lambda: coord.got(b"b-marker"))
    time.sleep(0.2)

    assert coord.got(evil) == [] and b.got(evil) == []
    assert coord.got(b"marker") == [f"{P}/dev/a/delta"]


def test_device_subscribing_to_everything_sees_only_its_own_and_public_topics(clients):
    _files, make = clients
    coord, b = make("coordinator"), make("b")
    b.pub(f"{P}/dev/b/hello", b"b-hello", retain=True).wait_for_publish(5)
    b.pub(f"{P}/dev/b/status", b"b-status", retain=True).wait_for_publish(5)
    a = make("a")
    for t in ("#", f"{P}/#", f"{P}/dev/+/task", f"{P}/dev/b/task", f"{P}/dev/b/delta"):
        a.sub(t)  # mosquitto may grant the SUBACK; what matters is what it delivers
    coord.pub(f"{P}/dev/b/task", b"task-for-b").wait_for_publish(5)
    coord.pub(f"{P}/dev/b/ack", b"ack-for-b").wait_for_publish(5)
    b.pub(f"{P}/dev/b/delta", b"b-delta").wait_for_publish(5)
    coord.pub(f"{P}/model/current", b"model", retain=True).wait_for_publish(5)
    coord.pub(f"{P}/dev/a/task", b"task-for-a").wait_for_publish(5)

    assert a.wait(lambda: a.got(b"task-for-a"))
    time.sleep(0.2)
    seen = {t for t, _ in a.messages}
    assert not any(t.startswith(f"{P}/dev/b/") for t in seen), seen
    assert seen <= {f"{P}/model/current", f"{P}/dev/a/task"}, seen


@pytest.mark.parametrize("login", ["anonymous", "wrong-password", "unknown-user", "device-with-coord-password"])
def test_anonymous_and_bad_credentials_are_refused(secured, login):
    files = secured
    user, pw = {"anonymous": (None, None), "wrong-password": ("a", "not-the-password"),
                "unknown-user": ("mallory", "x"), "device-with-coord-password": ("a", files.coordinator[1])}[login]

    c = Client(files, user, pw, reconnect=False)
    try:
        assert not c.connected(), f"{login} was let in"
        assert c.connack is None or c.connack.is_failure
    finally:
        c.close()


def test_oversize_payload_disconnects_sender_and_coordinator_keeps_working(clients):
    _files, make = clients
    coord, b = make("coordinator"), make("b")
    coord.sub(f"{P}/dev/+/delta")
    b.sub(f"{P}/dev/b/task")
    a = make("a", reconnect=False)
    big = b"\xee" * (MAX_PACKET + 1000)

    a.pub(f"{P}/dev/a/delta", big)
    assert a.wait(lambda: a.disconnect is not None, 10), "oversize sender was not disconnected"
    b.pub(f"{P}/dev/b/delta", b"after").wait_for_publish(5)
    coord.pub(f"{P}/dev/b/task", b"still-here").wait_for_publish(5)

    assert coord.wait(lambda: coord.got(b"after"))
    assert b.wait(lambda: b.got(b"still-here"))
    assert coord.got(big) == []
    assert a.disconnect.is_failure  # "Packet too large" (MQTT v5 reason 0x95)


def test_tls_with_generated_ca_works_and_plain_tcp_is_refused(secured_tls, tmp_path):
    files = secured_tls
    ok = Client(files, *files.coordinator)
    try:
        assert ok.connected()
        plain = Client(files, *files.coordinator, tls=False, reconnect=False)
        assert not plain.connected(2.0)
        plain.close()
        # a client that does not trust our CA (another, freshly made CA) refuses the server
        other = write_broker_config(tmp_path / "other", FLEET, ["a"], tls=True, port=1)
        wrong_ca = Client(files, *files.coordinator, ca=other.ca_cert, reconnect=False)
        assert not wrong_ca.connected(2.0)
        wrong_ca.close()
    finally:
        ok.close()


def test_real_fleet_round_over_tls_with_per_device_credentials(secured_tls, tmp_path):
    """The ACL is not only strict but sufficient: a real coordinator and devices complete a round through it."""
    from device_agent.buffer import SampleBuffer
    from device_agent.engine.trainer import Trainer
    from device_agent.mqtt import BrokerURL, DeviceAgent
    from device_agent.protocol import DeviceProtocol, Identity, WireDeviceCodec
    from device_agent.wire.envelope import Verifier
    from fleet import round as rnd
    from fleet.coordinator import Coordinator, CoordinatorConfig, RoundClosed, StartRound, WireCodec
    from fleet.mqtt import CoordinatorLink
    from fleet.store import Store
    from tests.fixtures.tiny import tiny_dataset, tiny_plan

    files = secured_tls
    ca = str(files.ca_cert)

    def url(user, pw):
        return BrokerURL("127.0.0.1", files.port, tls=True, username=user, password=pw, ca_file=ca)

    plan = tiny_plan()
    closed: list = []
    cfg = CoordinatorConfig(round=rnd.RoundConfig(goal=2, over_selection=1.0, quorum=1.0, deadline_s=30.0),
                            local_steps=3)
    link = CoordinatorLink(url(*files.coordinator), FLEET,
                           lambda: Coordinator(plan, Store(str(tmp_path / "c.db")), cfg, time.time, WireCodec(plan)),
                           on_output=lambda o: closed.append(o) if isinstance(o, RoundClosed) else None,
                           client_id="coordinator").start()
    agents = []
    try:
        for i, dev in enumerate(("a", "b")):
            x, y = tiny_dataset(16, seed=i)
            buf = SampleBuffer(16, x.shape[1:], np.int8, seed=i)
            buf.add(x, y)
            proto = DeviceProtocol(Identity(dev, "host", 1 << 20, 1 << 20), plan, Trainer(plan),
                                   WireDeviceCodec(plan, Verifier.unsigned()), buf, seed=i)
            agents.append(DeviceAgent(url(dev, files.devices[dev]), FLEET, proto, will_delay=0).start())
        end = time.monotonic() + 20
        while link.call(lambda c: sum(r.online for r in c.registry.devices.values())) < 2:
            assert time.monotonic() < end, "devices never came online through the ACL"
            time.sleep(0.05)
        link.submit(StartRound())
        while not closed:
            assert time.monotonic() < end + 20, "round did not close"
            time.sleep(0.05)
        assert closed[0].committed and closed[0].accepted == ("a", "b")
    finally:
        for a in agents:
            a.stop()
        link.stop()


# --- the writer itself (no broker needed, but kept with its broker tests) -------------------------------------


def test_files_are_private_passwords_verify_and_rerun_keeps_them(tmp_path):
    f1 = write_broker_config(tmp_path / "b", FLEET, ["a", "b"], tls=True, port=18883)
    for p in (f1.credentials, f1.passwd, f1.acl, f1.conf.parent / "ca.key", f1.conf.parent / "server.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    creds = json.loads(f1.credentials.read_text())
    assert creds["devices"] == f1.devices and creds["coordinator"]["password"] == f1.coordinator[1]
    lines = dict(ln.split(":", 1) for ln in f1.passwd.read_text().splitlines())
    assert check_password(f1.devices["a"], lines["a"]) and not check_password(f1.devices["b"], lines["a"])
    assert f1.devices["a"] not in f1.passwd.read_text() and f1.devices["a"] not in f1.conf.read_text()
    conf = f1.conf.read_text()
    assert "allow_anonymous false" in conf and f"max_packet_size {1 << 20}" in conf and "persistence true" in conf

    f2 = write_broker_config(tmp_path / "b", FLEET, ["a", "b", "c"], tls=True, port=18883)
    assert f2.devices["a"] == f1.devices["a"] and f2.coordinator == f1.coordinator
    assert (tmp_path / "b" / "ca.crt").read_bytes() == f1.ca_cert.read_bytes()
    f3 = write_broker_config(tmp_path / "b", FLEET, ["a"], tls=True, port=18883, rotate=True)
    assert f3.devices["a"] != f1.devices["a"]


@pytest.mark.parametrize("devices, match", [
    (["a/b"], "MQTT topic levels"), (["#"], "MQTT topic levels"), (["%u"], "MQTT topic levels"),
    (["coordinator"], "coordinator's user name"), (["a", "a"], "duplicate"), ([], "at least one"),
])
def test_unsafe_device_ids_are_refused(tmp_path, devices, match):
    with pytest.raises(BrokerConfigError, match=match):
        write_broker_config(tmp_path / "b", FLEET, devices)


def test_cli_writes_config_from_devices_file(tmp_path, capsys):
    from fleet.cli import main

    (tmp_path / "devs.txt").write_text("# fleet A\nd1\nd2  # spare\n\n")
    rc = main(["broker-config", "--fleet", FLEET, "--devices-file", str(tmp_path / "devs.txt"),
               "--out", str(tmp_path / "o"), "--port", "1999"])
    assert rc == 0
    assert set(json.loads((tmp_path / "o" / "credentials.json").read_text())["devices"]) == {"d1", "d2"}
    assert main(["broker-config", "--fleet", FLEET, "--devices", "bad/id", "--out", str(tmp_path / "p")]) == 2
    assert "MQTT topic levels" in capsys.readouterr().err
    assert callable(broker_config.add_arguments) and callable(broker_config.run)


def test_aggregation_workers_in_a_secret_group_get_every_delta_whoever_else_subscribes(secured):
    # Prepare: a worker logs in as the coordinator and joins the workers' shared subscription under a group named
    # after a secret; a device joins the default-named group and, as a device could, subscribes without $share
    from fleet.coordinator.pool import secret_group, share_topic

    creds = json.loads(secured.credentials.read_text())
    worker = Client(secured, "coordinator", creds["coordinator"]["password"])
    device = Client(secured, "a", creds["devices"]["a"])
    assert worker.connected() and device.connected()
    assert not worker.sub(share_topic(FLEET, secret_group(FLEET, b"the fleet key"))).is_failure
    device.sub(share_topic(FLEET))
    device.sub(f"{P}/dev/+/delta")
    # Execute
    for k in range(10):
        device.pub(f"{P}/dev/a/delta", b"delta %d" % k)
    # Assert: the worker gets every delta, the device reads none (its read ACL). NOTE: a device in the *same*
    # group would be routed every other delta, which its read ACL then drops: why the group name is secret
    assert worker.wait(lambda: len(worker.messages) >= 10), worker.messages
    assert sorted(worker.messages) == sorted((f"{P}/dev/a/delta", b"delta %d" % k) for k in range(10))
    assert device.messages == []
