"""The embedded Mosquitto: starts on a free port, restarts on the same port, refuses clearly when missing."""

from __future__ import annotations

import socket

import pytest

from fleet.sim.broker import BrokerError, BrokerURL, EmbeddedBroker, resolve


def test_broker_accepts_connections_and_restarts_on_same_port(broker):
    port = broker.port
    socket.create_connection(("127.0.0.1", port), timeout=1).close()

    broker.restart()

    assert broker.port == port
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert (broker.workdir / "mosquitto.db").exists()  # persistence written on SIGTERM


def test_missing_mosquitto_says_what_to_do(tmp_path):
    b = EmbeddedBroker(executable=None, workdir=tmp_path)
    b.executable = None

    with pytest.raises(BrokerError, match="apt-get install mosquitto"):
        b.start()


def test_broker_urls():
    u = BrokerURL.parse("mqtts://dev%2F1:s3cret@broker.example:8884", ca_file="ca.pem")
    assert (u.host, u.port, u.tls, u.username, u.password, u.ca_file) == (
        "broker.example", 8884, True, "dev/1", "s3cret", "ca.pem")
    assert "s3cret" not in str(u)
    assert BrokerURL.parse("mqtt://h").port == 1883
    assert BrokerURL.parse("mqtts://h").port == 8883
    url, embedded = resolve("embedded")
    assert url is None and embedded is not None
    for bad in ("http://h:1", "mqtt://", "mqtt://h:99999", "mqtt://h:1/x"):
        with pytest.raises(BrokerError):
            resolve(bad)
