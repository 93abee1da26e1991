"""CoordinatorLink: a message whose handler raises is refused alone; the rest of its batch is still handled."""

from __future__ import annotations

from device_agent.mqtt import BrokerURL
from device_agent.wire.messages import Publish
from fleet.coordinator import Dropped, Received
from fleet.mqtt import CoordinatorLink


class _Coordinator:
    """Raises for any batch holding a payload ``b"poison"``; otherwise echoes one publish per event."""

    def __init__(self, handled: list):
        self.handled = handled

    def handle(self, event):
        return []  # Boot after a rebuild

    def handle_many(self, events):
        if any(isinstance(e, Received) and e.payload == b"poison" for e in events):
            raise RecursionError("maximum recursion depth exceeded")
        self.handled.extend(e.device_id for e in events)
        return [Publish(f"dev/{e.device_id}/ack", b"{}") for e in events]


class _Endpoint:
    def __init__(self):
        self.published: list[str] = []

    def publish(self, topic, payload, retain=False):
        self.published.append(topic)


def test_a_poison_message_is_refused_alone_and_its_batch_mates_are_handled():
    # Prepare
    handled: list[str] = []
    builds: list[int] = []
    outputs: list[object] = []

    def factory():
        builds.append(1)
        return _Coordinator(handled)

    link = CoordinatorLink(BrokerURL("127.0.0.1", 1), "f", factory, on_output=outputs.append)
    link.coordinator, link.endpoint = factory(), _Endpoint()
    batch = [Received("hello", "d1", b"ok"), Received("hello", "evil", b"poison"), Received("delta", "d2", b"ok")]
    # Execute
    done = link._handle(batch)
    # Assert: the batch counts as handled (its outputs returned, to be acknowledged), the good messages were
    # handled, the poison was refused with its device id, and the coordinator was rebuilt after each failure
    assert done == outputs
    assert handled == ["d1", "d2"]
    assert link.endpoint.published == ["tinyfleet/f/dev/d1/ack", "tinyfleet/f/dev/d2/ack"]
    refused = [o for o in outputs if isinstance(o, Dropped)]
    assert [(o.device_id, o.kind) for o in refused] == [("evil", "hello")]
    assert any("device 'evil'" in e and "RecursionError" in e for e in link.errors)
    assert len(builds) == 3  # the first build, after the batch failed, after the poison failed alone
