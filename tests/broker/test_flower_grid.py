"""The Flower Grid over a real Mosquitto: stock FedAvg drives host devices (DeviceAgent) through the broker."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.conftest import require_cmd


@pytest.fixture
def fleet(broker):
    """``make(n)`` -> (FleetGrid, agents); everything stopped afterwards."""
    require_cmd("mosquitto")
    from device_agent.buffer import SampleBuffer
    from device_agent.engine.trainer import Trainer
    from device_agent.mqtt import DeviceAgent
    from device_agent.protocol import DeviceProtocol, Identity, WireDeviceCodec
    from device_agent.wire.envelope import Verifier
    from fleet.flower import GridConfig
    from fleet.flower_app import mqtt_grid
    from tests.fixtures.tiny import tiny_dataset, tiny_plan

    plan = tiny_plan()
    made: list = []

    def make(n: int, silent: tuple[str, ...] = ()):
        grid, link = mqtt_grid(broker.url, "fl", plan, GridConfig(lr=0.2, local_steps=8, batch_size=8, deadline_s=20))
        made.append(link)
        agents = []
        for i in range(n):
            x, y = tiny_dataset(48, seed=i)
            buf = SampleBuffer(64, x.shape[1:], np.int8, seed=i)
            buf.add(x, y)
            proto = DeviceProtocol(Identity(f"d{i}", "host", 1 << 20, 1 << 20), plan, Trainer(plan),
                                   WireDeviceCodec(plan, Verifier.unsigned()), buf, seed=i)
            if proto.id.device_id in silent:  # hears its tasks, never answers (a device stuck in training)
                real = proto.handle
                proto.handle = lambda ev, _real=real: [] if getattr(ev, "kind", "") == "task" else _real(ev)
            agents.append(DeviceAgent(broker.url, "fl", proto).start())
            made.append(agents[-1])
        end = time.monotonic() + 20
        while len(list(grid.get_node_ids())) < n:
            assert time.monotonic() < end, "devices did not register"
            time.sleep(0.05)
        return grid, plan

    yield make
    for m in reversed(made):
        m.stop()


def test_stock_fedavg_serverapp_loop_over_mqtt_improves_accuracy(fleet):
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from device_agent.engine.trainer import Trainer
    from fleet.flower import SparseDeltaStrategy, initial_arrays, state_from_arrays
    from tests.fixtures.tiny import tiny_dataset

    grid, plan = fleet(4)
    x, y = tiny_dataset(200, seed=1000)

    def acc(arrays):
        t = Trainer(plan)
        t.load_trainable(state_from_arrays(plan, arrays))
        return t.evaluate(x, y)

    strategy = SparseDeltaStrategy(FedAvg(fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4), plan)
    start = initial_arrays(plan)
    result = strategy.start(grid, start, num_rounds=3, timeout=20.0,
                            train_config=ConfigRecord({"lr": 0.2, "local-steps": 8, "batch-size": 8}))
    assert set(result.train_metrics_clientapp) == {1, 2, 3}
    assert acc(result.arrays) > acc(start) + 0.1


def test_a_device_that_does_not_answer_yields_an_error_reply(fleet):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fleet.flower import GridErrorCode, node_id

    grid, _ = fleet(3, silent=("d1",))
    msgs = [Message(RecordDict({"config": ConfigRecord({"lr": 0.2, "local-steps": 4})}), n, MessageType.TRAIN)
            for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=4.0))
    assert len(replies) == 3
    errors = [r for r in replies if r.has_error()]
    assert [e.metadata.src_node_id for e in errors] == [node_id("d1")]
    assert errors[0].error.code == GridErrorCode.TIMEOUT
    ok = [r for r in replies if not r.has_error()]
    assert all(r.content.metric_records["metrics"]["num-examples"] == 48 for r in ok)


def test_a_second_serverapp_for_the_same_fleet_is_refused_until_the_first_ends(broker):
    require_cmd("mosquitto")
    from fleet.flower import FleetBusy
    from fleet.flower_app import mqtt_grid
    from tests.fixtures.tiny import tiny_plan

    plan = tiny_plan()
    _, first = mqtt_grid(broker.url, "one", plan)
    try:
        with pytest.raises(FleetBusy, match=f"already served by Flower run 1 \\(MQTT client {first.client_id}"):
            mqtt_grid(broker.url, "one", plan)
        _, other_fleet = mqtt_grid(broker.url, "two", plan)  # the lock is per fleet
        other_fleet.stop()
        assert first.inner.endpoint.connects == 1  # no one knocked it off the broker: no reconnects
    finally:
        first.stop()
    _, second = mqtt_grid(broker.url, "one", plan)  # released by stop()
    assert second.client_id != first.client_id
    second.stop()


def test_a_crashed_serverapp_frees_its_fleet_by_its_last_will(broker):
    require_cmd("mosquitto")
    from device_agent.mqtt import WILL_DELAY_S
    from fleet.flower import FleetBusy
    from fleet.flower_app import mqtt_grid
    from tests.fixtures.tiny import tiny_plan

    plan = tiny_plan()
    _, crashed = mqtt_grid(broker.url, "one", plan)
    crashed.inner.endpoint.stop(graceful=False)  # the process dies: no DISCONNECT, no release
    crashed.inner.stop()
    with pytest.raises(FleetBusy):
        mqtt_grid(broker.url, "one", plan)
    end = time.monotonic() + WILL_DELAY_S + 10
    while True:
        try:
            _, link = mqtt_grid(broker.url, "one", plan)
            break
        except FleetBusy:
            assert time.monotonic() < end, "the Last Will did not free the fleet"
            time.sleep(0.5)
    link.stop()


def test_the_serverapp_fails_when_no_device_delivers_and_frees_the_fleet(broker, tmp_path):
    require_cmd("mosquitto")
    from flwr.app import Context, RecordDict

    from device_agent.buffer import SampleBuffer
    from device_agent.engine.trainer import Trainer
    from device_agent.mqtt import DeviceAgent
    from device_agent.protocol import DeviceProtocol, Identity, WireDeviceCodec
    from device_agent.wire.envelope import Verifier
    from device_agent.wire.plan import plan_to_bytes
    from fleet.flower import FleetGrid
    from fleet.flower_app import main, mqtt_grid
    from tests.fixtures.tiny import tiny_dataset, tiny_plan

    plan = tiny_plan()
    (tmp_path / "plan.ttp").write_bytes(plan_to_bytes(plan, None))
    x, y = tiny_dataset(16)
    buf = SampleBuffer(16, x.shape[1:], np.int8)
    buf.add(x, y)
    proto = DeviceProtocol(Identity("mute", "host", 1 << 20, 1 << 20), plan, Trainer(plan),
                           WireDeviceCodec(plan, Verifier.unsigned()), buf)
    real = proto.handle
    proto.handle = lambda ev: [] if getattr(ev, "kind", "") == "task" else real(ev)  # hears tasks, never trains
    agent = DeviceAgent(broker.url, "quiet", proto).start()
    try:
        rc = {"plan": str(tmp_path / "plan.ttp"), "insecure-unsigned": True, "broker": str(broker.url),
              "fleet": "quiet", "num-rounds": 2, "min-nodes": 1, "round-timeout": 1.0}
        with pytest.raises(RuntimeError, match="no device delivered an accepted delta in any of the 2 rounds"):
            main(FleetGrid(None, run_id=9), Context(9, 0, {}, RecordDict(), rc))
        _, link = mqtt_grid(broker.url, "quiet", plan)  # the failed run released the fleet
        link.stop()
    finally:
        agent.stop()
