"""MqttEndpoint through a real Mosquitto: QoS 1 delivery, Last Will on a killed device, broker restarts."""

from __future__ import annotations

import queue
import subprocess
import sys
import textwrap

from device_agent.mqtt import MqttEndpoint, publish_size
from device_agent.wire.messages import Status, full_topic, parse


class T:
    root = "tinyfleet/test/"

    @staticmethod
    def dev(device_id, kind):
        return full_topic("test", f"dev/{device_id}/{kind}")


def _collector(url, client_id, subs):
    got: queue.Queue = queue.Queue()
    ep = MqttEndpoint(url, client_id, subs, lambda t, p, ack: (got.put((t, p)), ack())).start()
    return ep, got


def test_publish_reaches_subscriber_and_is_counted(broker):
    coord, got = _collector(broker.url, "coord", [T.root + "dev/+/hello"])
    dev, _ = _collector(broker.url, "dev-a", [T.dev("dev-a", "task")])

    dev.publish(T.dev("dev-a", "hello"), b"hi").wait_for_publish(5)
    topic, payload = got.get(timeout=5)

    assert (topic, payload) == (T.dev("dev-a", "hello"), b"hi")
    assert dev.traffic_snapshot().sent == publish_size(topic, 2) > 2
    assert coord.traffic_snapshot().received == dev.traffic_snapshot().sent
    coord.stop(), dev.stop()


def test_last_will_marks_killed_device_offline(broker):
    coord, got = _collector(broker.url, "coord", [T.root + "dev/+/status"])
    will = Status("dev-k", "offline").to_json()
    script = textwrap.dedent(f"""
        import sys, time
        from device_agent.mqtt import BrokerURL, MqttEndpoint
        ep = MqttEndpoint(BrokerURL("127.0.0.1", {broker.port}), "dev-k", [], lambda t, p, a: a(),
                          will=({T.dev("dev-k", "status")!r}, {will!r}), will_delay=0).start()
        ep.publish({T.dev("dev-k", "status")!r}, b'{{"online":1}}').wait_for_publish(5)
        print("up", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert got.get(timeout=5)[1] == b'{"online":1}'

        proc.kill()  # no DISCONNECT: the broker must publish the will
        topic, payload = got.get(timeout=10)
    finally:
        proc.kill()
        proc.wait()

    assert topic == T.dev("dev-k", "status")
    msg = parse(payload)
    assert isinstance(msg, Status) and msg.state == "offline" and msg.device_id == "dev-k"
    coord.stop()


def test_messages_published_while_broker_down_arrive_after_restart(broker):
    coord, got = _collector(broker.url, "coord", [T.root + "dev/+/delta"])
    dev, _ = _collector(broker.url, "dev-r", [])
    dev.publish(T.dev("dev-r", "delta"), b"before").wait_for_publish(5)
    assert got.get(timeout=5)[1] == b"before"

    broker.stop()
    dev.publish(T.dev("dev-r", "delta"), b"during")  # queued by paho while the broker is down
    broker.start()

    assert got.get(timeout=20)[1] == b"during"  # both clients reconnect with backoff (1 s min)
    assert coord.connects >= 2 and dev.connects >= 2
    coord.stop(), dev.stop()


def test_persistent_session_keeps_messages_for_an_offline_subscriber(broker):
    dev, _ = _collector(broker.url, "dev-s", [T.dev("dev-s", "task")])
    dev.stop()  # graceful: session (and subscription) stays on the broker for SESSION_EXPIRY_S
    coord, _ = _collector(broker.url, "coord", [])
    coord.publish(T.dev("dev-s", "task"), b"task-1").wait_for_publish(5)

    dev2, got2 = _collector(broker.url, "dev-s", [T.dev("dev-s", "task")])

    assert got2.get(timeout=5)[1] == b"task-1"
    coord.stop(), dev2.stop()
