"""Thin paho-mqtt 2.x adapter: one MQTT v5 client per endpoint, bytes in -> state machine -> bytes out.

:class:`MqttEndpoint` owns one paho client (``CallbackAPIVersion.VERSION2``, MQTT v5, QoS 1, persistent session
via ``clean_start=False`` + session expiry, optional Last Will, reconnect with exponential backoff). It
subscribes on every (re)connect, counts the MQTT bytes it sends and receives, and hands each message to a
callback. It knows nothing about rounds, plans or deltas; the device glue (:class:`DeviceAgent`) feeds the
sans-I/O device protocol and publishes what it returns. The coordinator side reuses :class:`MqttEndpoint`
(``fleet/mqtt.py``).

Threads: paho's ``loop_start`` runs one network thread per client. Callbacks run on that thread and must be
short. One thread per client is fine up to ~100 clients per process (each costs ~8 MB virtual stack and a
socket; 2 cores serve the keepalives of 100 idle clients easily); beyond that run devices in several
processes (fleet/sim ``python`` backend) instead of one.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

QOS = 1
SESSION_EXPIRY_S = 3600  # the broker keeps a sleeping device's subscriptions and queued tasks this long
KEEPALIVE_S = 30
WILL_DELAY_S = 5  # the Last Will waits this long for a reconnect: a network blip is not a lost device
RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 30


class BrokerURLError(ValueError):
    """A broker URL that cannot be used; the message names the bad part."""


@dataclass(frozen=True)
class BrokerURL:
    """Where to connect: ``mqtt://[user:pass@]host[:port]`` or ``mqtts://...`` (TLS, default port 8883).

    TLS files (``ca_file``, ``cert_file``, ``key_file``) come from the config or CLI flags, not the URL.
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False  # skip the hostname check (self-signed dev certificates only)

    @classmethod
    def parse(cls, url: str, **tls_files: object) -> BrokerURL:
        """Parse ``mqtt://user:pass@host:1883``; raise :class:`BrokerURLError` naming the bad part."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise BrokerURLError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://, got {parts.scheme!r}")
        if not parts.hostname:
            raise BrokerURLError(f"broker URL {url!r}: missing host (expected mqtt://host:port)")
        if parts.path not in ("", "/") or parts.query:
            raise BrokerURLError(f"broker URL {url!r}: unexpected path or query {parts.path + parts.query!r}")
        try:
            port = parts.port
        except ValueError:
            raise BrokerURLError(f"broker URL {url!r}: port must be a number in 1..65535") from None
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            **tls_files,  # type: ignore[arg-type]
        )

    def __str__(self) -> str:  # never prints the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def publish_size(topic: str, payload_len: int) -> int:
    """Bytes of an MQTT v5 QoS 1 PUBLISH without properties: fixed header + topic + packet id + payload."""
    rest = 2 + len(topic.encode()) + 2 + 1 + payload_len  # topic, packet id, property length 0, payload
    return 1 + _varint_len(rest) + rest


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


@dataclass
class Traffic:
    """MQTT PUBLISH bytes (headers + topic + payload; no TCP/TLS, no acks) and payload bytes, each direction."""

    sent: int = 0
    received: int = 0
    sent_payload: int = 0
    received_payload: int = 0
    sent_messages: int = 0
    received_messages: int = 0

    def copy(self) -> Traffic:
        return Traffic(**vars(self))

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(**{k: v - getattr(other, k) for k, v in vars(self).items()})


MessageCallback = Callable[[str, bytes, Callable[[], None]], None]  # (full topic, payload, ack)


class MqttEndpoint:
    """One paho MQTT v5 client: persistent session, QoS 1, optional Last Will, auto-reconnect.

    ``on_message(topic, payload, ack)`` runs on paho's network thread for every message on ``subscriptions``;
    the receiver calls ``ack()`` once it has handled the message (its state machine returned), from any thread.
    Until then the broker keeps the message for this session and redelivers it after a reconnect: a message
    is never lost between arrival and handling, at the price of a possible duplicate (QoS 1 is at least once).
    ``on_connect(session_present)`` runs after each successful (re)connect, after subscribing.
    """

    def __init__(
        self,
        url: BrokerURL,
        client_id: str,
        subscriptions: list[str],
        on_message: MessageCallback,
        will: tuple[str, bytes] | None = None,  # (topic, payload), published retained at QoS 1
        on_connect: Callable[[bool], None] | None = None,
        session_expiry: int = SESSION_EXPIRY_S,
        keepalive: int = KEEPALIVE_S,
        will_delay: int = WILL_DELAY_S,
        retained_on_resume: bool = False,
        on_disconnect: Callable[[], None] | None = None,
    ):
        self.url = url
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.on_connect_cb = on_connect
        self.on_disconnect_cb = on_disconnect
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.retained_on_resume = retained_on_resume
        self.traffic = Traffic()
        self.connects = 0  # successful connects (1 + reconnects)
        self.connected = threading.Event()
        self._lock = threading.Lock()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                        manual_ack=True)
        if url.username is not None:
            c.username_pw_set(url.username, url.password)
        if url.tls:
            c.tls_set(ca_certs=url.ca_file, certfile=url.cert_file, keyfile=url.key_file,
                      cert_reqs=ssl.CERT_REQUIRED)
            c.tls_insecure_set(url.tls_insecure)
        self.will_delay = will_delay
        self.client = c
        if will is not None:
            self.set_will(*will)
        c.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        c.max_queued_messages_set(0)  # unbounded: a QoS 1 message is never dropped while offline
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, timeout: float | None = 10.0) -> MqttEndpoint:
        """Connect in the background; with ``timeout``, wait for the first CONNACK (ConnectionError if none)."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        self.client.connect_async(self.url.host, self.url.port, keepalive=self.keepalive, clean_start=False,
                                  properties=props)
        self.client.loop_start()
        if timeout is not None and not self.connected.wait(timeout):
            self.client.loop_stop()
            raise ConnectionError(f"{self.client_id}: no connection to {self.url} within {timeout:g} s")
        return self

    def stop(self, graceful: bool = True) -> None:
        """Graceful: DISCONNECT (the broker drops the Last Will). Not graceful: just close the socket, so the
        broker publishes the Last Will as for a crashed device."""
        if graceful:
            self.client.disconnect()
        else:
            sock = self.client.socket()
            if sock is not None:
                sock.close()
        self.client.loop_stop()
        self.connected.clear()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    # --- traffic --------------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> paho.MQTTMessageInfo:
        """QoS 1 publish; while disconnected paho keeps the message and sends it after reconnecting."""
        info = self.client.publish(topic, payload, qos=QOS, retain=retain)
        with self._lock:
            self.traffic.sent += publish_size(topic, len(payload))
            self.traffic.sent_payload += len(payload)
            self.traffic.sent_messages += 1
        return info

    def traffic_snapshot(self) -> Traffic:
        with self._lock:
            return self.traffic.copy()

    # --- paho callbacks (network thread) --------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return  # paho retries with backoff
        if self.subscriptions:
            # NOTE: retainHandling=1: retained messages come only with a *new* subscription, so a resumed
            # session does not get model/current again on every reconnect of this process. Its first connect gets
            # them always (a restarted process holds nothing: a restarted device must see model/current even though
            # the broker kept its session), and so does every connect with ``retained_on_resume`` (the coordinator).
            again = self.retained_on_resume or self.connects == 0
            opts = SubscribeOptions(qos=QOS, retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
                                    if again else SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
            client.subscribe([(t, opts) for t in self.subscriptions])
        self.connects += 1
        self.connected.set()
        if self.on_connect_cb is not None:
            self.on_connect_cb(bool(flags.session_present))

    def set_will(self, topic: str, payload: bytes) -> None:
        """The Last Will of the next connect (QoS 1, retained, ``will_delay``); the current one keeps its own."""
        wprops = Properties(PacketTypes.WILLMESSAGE)
        wprops.WillDelayInterval = self.will_delay
        self.client.will_set(topic, payload, qos=QOS, retain=True, properties=wprops)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if self.on_disconnect_cb is not None:
            self.on_disconnect_cb()  # before paho reconnects: e.g. a new Last Will for the next connection

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.traffic.received += publish_size(msg.topic, len(msg.payload))
            self.traffic.received_payload += len(msg.payload)
            self.traffic.received_messages += 1
        mid, qos = msg.mid, msg.qos
        self.on_message(msg.topic, bytes(msg.payload), lambda: self._ack(mid, qos))

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self.client.ack(mid, qos)


def next_session(previous: int | None = None) -> int:
    """A connection number that grows across reconnects and restarts: wall-clock milliseconds, or one more than
    ``previous`` if the clock has not moved past it."""
    now = int(time.time() * 1000)
    return now if previous is None or now > previous else previous + 1


class DeviceAgent:
    """A :class:`device_agent.protocol.DeviceProtocol` on one MQTT endpoint.

    Messages are handled one at a time, in arrival order, off the network thread: on ``executor`` when given
    (many simulated devices share a small pool; each device still runs serially) or on a thread of its own.
    Each message is acknowledged only after the protocol handled it. On every (re)connect the protocol's
    ``Start`` is replayed, so the device re-announces itself (hello, status) after a broker restart.
    ``log(what, detail)``, when given, receives every Note the protocol returns and every handler error as it
    happens (the CLI prints them), besides the bounded ``notes`` history.
    """

    def __init__(self, url: BrokerURL, fleet: str, protocol, executor=None, client_id: str | None = None,
                 will_delay: int = WILL_DELAY_S, keepalive: int = KEEPALIVE_S,
                 log: Callable[[str, str], None] | None = None):
        from concurrent.futures import ThreadPoolExecutor

        from device_agent.wire.messages import full_topic

        self.protocol, self.fleet = protocol, fleet
        self.device_id = protocol.id.device_id
        self._topic = lambda rel: full_topic(fleet, rel)
        protocol.session = next_session()
        will = protocol.last_will()
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"dev-{self.device_id}")
        self._mailbox: deque = deque()
        self._mlock = threading.Lock()
        self._scheduled = False
        self._handle_lock = threading.Lock()
        self.notes: deque = deque(maxlen=200)  # recent Note outputs and handler errors, newest last
        self.errors = 0
        self.log = log
        self.said_offline = False  # stop(graceful=True) published the offline status and the broker took it
        self.endpoint = MqttEndpoint(
            url, client_id or f"tinyfleet-{fleet}-{self.device_id}", [self._topic(t) for t in protocol.subscriptions()],
            self._on_message, will=(self._topic(will.topic), will.payload), on_connect=self._on_connect,
            will_delay=will_delay, keepalive=keepalive, on_disconnect=self._new_session)

    def _new_session(self) -> None:
        """Number the next connection and give it its own Last Will: a will of this one that the broker delivers
        late (after the device is back) is then recognisably stale (``Status.session``)."""
        self.protocol.session = next_session(self.protocol.session)
        will = self.protocol.last_will()
        self.endpoint.set_will(self._topic(will.topic), will.payload)

    def start(self, timeout: float | None = 10.0) -> DeviceAgent:
        self.endpoint.start(timeout)
        return self

    def stop(self, graceful: bool = True) -> None:
        """Graceful: publish an offline status, then DISCONNECT. Not graceful: drop the socket (a crash: the
        broker publishes the Last Will)."""
        if graceful and self.endpoint.connected.is_set():
            with self._handle_lock:
                out = self.protocol.status("offline")
            info = self.endpoint.publish(self._topic(out.topic), out.payload, out.retain)
            try:
                info.wait_for_publish(2)
                self.said_offline = info.is_published()
            except (RuntimeError, ValueError):  # the connection went while publishing: the will covers it
                self.said_offline = False
        self.endpoint.stop(graceful)
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _note(self, what: str, detail: str) -> None:
        self.notes.append((what, detail))
        if self.log is not None:
            self.log(what, detail)

    def idle(self) -> bool:
        """Nothing queued or being handled."""
        with self._mlock:
            return not self._mailbox and not self._scheduled

    # --- network thread -> mailbox -> worker ----------------------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        from device_agent.protocol import Start

        self._post(Start(), None)

    def _on_message(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        from device_agent.protocol import Received
        from device_agent.wire.messages import split_topic

        where = split_topic(self.fleet, topic)
        if where is None:
            ack()
            return
        self._post(Received(where[1], payload), ack)

    def _post(self, event: object, ack: Callable[[], None] | None) -> None:
        with self._mlock:
            self._mailbox.append((event, ack))
            if self._scheduled:
                return
            self._scheduled = True
        self._executor.submit(self._drain)

    def _drain(self) -> None:
        from device_agent.wire.messages import Publish

        while True:
            with self._mlock:
                if not self._mailbox:
                    self._scheduled = False
                    return
                event, ack = self._mailbox.popleft()
            try:
                with self._handle_lock:
                    outputs = self.protocol.handle(event)
            except Exception as e:  # noqa: BLE001  NOTE: a bad message must not kill the device; it is logged and acked
                self.errors += 1
                self._note("error", f"{type(e).__name__}: {e}")
                outputs = []
            for out in outputs:
                if isinstance(out, Publish):
                    self.endpoint.publish(self._topic(out.topic), out.payload, out.retain)
                else:
                    self._note(getattr(out, "what", type(out).__name__), getattr(out, "detail", ""))
            if ack is not None:
                ack()
