"""The Flower Grid contract on an in-memory link: real devices (DeviceProtocol + engine Trainer, tiny plan)."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

from device_agent import protocol as dp
from device_agent.buffer import SampleBuffer
from device_agent.engine.trainer import Trainer
from device_agent.wire.envelope import Verifier
from fleet.flower import (
    FleetGrid,
    GridConfig,
    GridCore,
    GridErrorCode,
    SparseDeltaStrategy,
    initial_arrays,
    node_id,
    state_from_arrays,
)
from fleet.flower_app import InMemoryLink
from tests.fixtures.tiny import tiny_dataset, tiny_plan

PLAN = tiny_plan()
TEST_X, TEST_Y = tiny_dataset(200, seed=1000)


def make_grid(n=6, top_k=None, clock=None):
    devices = {}
    for i in range(n):
        x, y = tiny_dataset(48, seed=i)
        buf = SampleBuffer(64, x.shape[1:])
        buf.add(x, y)
        ident = dp.Identity(f"d{i:02d}", "stm32f746", 320_000, 1_000_000)
        devices[ident.device_id] = dp.DeviceProtocol(ident, PLAN, Trainer(PLAN),
                                                     dp.WireDeviceCodec(PLAN, Verifier.unsigned(), top_k), buf, seed=i)
    core = GridCore(PLAN, clock or (lambda: 0.0), GridConfig(lr=0.2, local_steps=8, batch_size=8))
    link = InMemoryLink(core, devices)
    return FleetGrid(link, pull_interval=0.0), link


def accuracy(arrays: ArrayRecord) -> float:
    t = Trainer(PLAN)
    t.load_trainable(state_from_arrays(PLAN, arrays))
    return t.evaluate(TEST_X, TEST_Y)


def train_msg(grid, node, arrays=None, **cfg):
    content = RecordDict({"config": ConfigRecord({"lr": 0.2, "local-steps": 8, **cfg})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, node, MessageType.TRAIN)


def test_node_ids_are_stable_and_come_from_the_registry():
    grid, _ = make_grid(4)
    ids = list(grid.get_node_ids())
    assert sorted(ids) == sorted(node_id(f"d{i:02d}") for i in range(4))
    assert grid.device_ids()[node_id("d02")] == "d02"
    assert node_id("d02") == node_id("d02") and node_id("d02") != node_id("d03")


def test_fedavg_serverapp_loop_completes_rounds_and_accuracy_improves():
    grid, link = make_grid(6)
    strategy = SparseDeltaStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=6, min_train_nodes=6), PLAN)
    start = initial_arrays(PLAN)
    result = strategy.start(grid, start, num_rounds=3, timeout=5.0,
                            train_config=ConfigRecord({"lr": 0.2, "local-steps": 8, "batch-size": 8}))
    assert set(result.train_metrics_clientapp) == {1, 2, 3}  # every round aggregated
    assert accuracy(result.arrays) > accuracy(start) + 0.1
    # the aggregated model is exactly representable on device: integral, and what the grid will publish next
    for arr in result.arrays.values():
        assert np.array_equal(arr.numpy(), np.floor(arr.numpy()))
    assert link.bytes_up > 0


def test_reply_is_a_dense_record_with_num_examples_and_matches_the_device_delta():
    grid, _ = make_grid(3)
    nodes = list(grid.get_node_ids())
    msgs = [train_msg(grid, n) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=5.0))
    assert len(replies) == 3 and not any(r.has_error() for r in replies)
    by_parent = {m.metadata.message_id for m in msgs}
    for r in replies:
        assert r.metadata.reply_to_message_id in by_parent
        assert r.content.metric_records["metrics"]["num-examples"] == 48
        arrs = r.content.array_records["arrays"]
        assert set(arrs.keys()) == {t.name for t in PLAN.trainable if not t.personal}
        assert any(not np.array_equal(arrs[t.name].numpy(), np.asarray(t.data, np.float64)) for t in PLAN.trainable)


def test_a_silent_device_yields_an_error_reply_at_the_timeout():
    grid, link = make_grid(3)
    link.silent.add("d01")
    msgs = [train_msg(grid, n) for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=0.2))
    assert len(replies) == 3
    errors = [r for r in replies if r.has_error()]
    assert len(errors) == 1 and errors[0].error.code == GridErrorCode.TIMEOUT
    assert errors[0].metadata.src_node_id == node_id("d01")


def test_deadline_tick_and_last_will_give_error_replies():
    from fleet.coordinator import Tick

    now = [0.0]
    grid, link = make_grid(3, clock=lambda: now[0])
    link.silent.update({"d00", "d01"})
    ids = list(grid.push_messages([train_msg(grid, n) for n in grid.get_node_ids()]))
    link.kill("d00")  # Last Will while it owes a delta
    now[0] = 1e6
    link.submit(Tick())  # past every deadline
    replies = {r.metadata.reply_to_message_id: r for r in grid.pull_messages(ids)}
    codes = sorted(r.error.code for r in replies.values() if r.has_error())
    assert len(replies) == 3 and codes == [GridErrorCode.TIMEOUT, GridErrorCode.OFFLINE]


def test_evaluate_and_unknown_nodes_are_refused_with_errors():
    grid, _ = make_grid(2)
    ev = Message(RecordDict({"config": ConfigRecord()}), next(iter(grid.get_node_ids())), MessageType.EVALUATE)
    bad = train_msg(grid, 12345)
    replies = list(grid.send_and_receive([ev, bad], timeout=1.0))
    assert sorted(r.error.code for r in replies) == [GridErrorCode.UNKNOWN_NODE, GridErrorCode.UNSUPPORTED]


def test_duplicate_delta_is_deduplicated_and_a_replayed_one_refused():
    grid, link = make_grid(2)
    nodes = list(grid.get_node_ids())
    first = list(grid.send_and_receive([train_msg(grid, n) for n in nodes], timeout=1.0))
    assert not any(r.has_error() for r in first)
    core = link.core
    payload = bytes(first[0].content.config_records["tinyfleet"]["delta"])
    device = str(first[0].content.config_records["tinyfleet"]["device-id"])
    from fleet.coordinator import Received
    link.submit(Received("delta", device, payload))  # QoS 1 redelivery of the same bytes: no new reply
    assert not core.replies
    # next round: a silent device's old delta replayed into the new round is refused (wrong round / stale)
    link.silent.add(device)
    ids = list(grid.push_messages([train_msg(grid, node_id(device))]))
    link.submit(Received("delta", device, payload))
    assert not core.replies and ids[0] in core.pending  # wrong_round: ignored, still waiting




def test_a_failed_status_answers_the_owed_instruction_with_an_error():
    # Prepare: a device that will not answer its task by itself
    from device_agent.wire.messages import Status
    from fleet.coordinator import Received

    grid, link = make_grid(2)
    device = "d00"
    link.silent.add(device)
    (mid,) = list(grid.push_messages([train_msg(grid, node_id(device))]))
    # Execute: its status says it cannot train that round (as the MQTT link delivers it: raw bytes)
    failed = Status(device, "failed", 1, 0, link.core.round_id, "no_samples").to_json()
    link.core.handle(Received("status", device, failed))
    # Assert: the strategy gets an Error reply at once instead of waiting for the deadline
    (reply,) = grid.pull_messages([mid])
    assert reply.has_error() and "no_samples" in reply.error.reason


def test_topk_requested_in_the_train_config_reaches_the_devices():
    grid, _ = make_grid(3)
    dense = list(grid.send_and_receive([train_msg(grid, n) for n in grid.get_node_ids()]))
    sparse = list(grid.send_and_receive([train_msg(grid, n, **{"topk-permille": 100})
                                         for n in grid.get_node_ids()]))
    full = min(r.content.metric_records["metrics"]["sent-fraction"] for r in dense)
    fractions = [r.content.metric_records["metrics"]["sent-fraction"] for r in sparse]
    assert all(0 < f < full / 3 for f in fractions), (full, fractions)
    assert all(r.content.metric_records["metrics"]["samples-trained"] == 8 * 8 for r in sparse)  # steps x batch


def test_a_proximal_term_is_refused_not_silently_dropped():
    import pytest
    from flwr.serverapp.strategy import FedProx

    grid, _ = make_grid(2)
    replies = list(grid.send_and_receive([train_msg(grid, n, **{"proximal-mu": 0.1})
                                          for n in grid.get_node_ids()]))
    assert all(r.has_error() and r.error.code == GridErrorCode.BAD_CONTENT for r in replies)
    assert "proximal term" in replies[0].error.reason
    with pytest.raises(ValueError, match="proximal term"):
        SparseDeltaStrategy(FedProx(proximal_mu=0.1), PLAN)
