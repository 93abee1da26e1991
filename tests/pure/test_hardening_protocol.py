"""A device that cannot train a task says so: a retained ``failed`` status naming the round and a lowercase
reason (never silence), its shared tensors back at the round's base, no counter used. Also: the Last Will
leaves out the version it could not keep current, and samples are checked against the plan.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from device_agent.buffer import SampleBuffer
from device_agent.engine.trainer import Trainer
from device_agent.protocol import DeviceProtocol, Identity, Note, Received, Start, WireDeviceCodec
from device_agent.samples import SampleError, input_spec, prepare
from device_agent.wire.envelope import Verifier
from device_agent.wire.messages import Ack, Publish, Status, Task, parse
from device_agent.wire.update import trainable_state, update_from_state, update_hash
from tests.fixtures.tiny import tiny_dataset, tiny_plan, tiny_text_plan

PLAN = tiny_plan()
MODEL_V1 = update_from_state(PLAN, trainable_state(PLAN), base_version=0, new_version=1).to_bytes()


def device(x=None, y=None, trainer=None) -> DeviceProtocol:
    """A started device holding model v1, with samples ``x``, ``y`` (default: 8 good ones)."""
    if x is None:
        x, y = tiny_dataset(8)
    buf = SampleBuffer(16, x.shape[1:])
    if len(x):
        buf.add(x, y)
    dev = DeviceProtocol(Identity("d07", "host", 1, 1), PLAN, trainer or Trainer(PLAN),
                         WireDeviceCodec(PLAN, Verifier.unsigned()), buf)
    dev.handle(Start())
    dev.handle(Received("model", MODEL_V1))
    return dev


def task(dev: DeviceProtocol, round_id: int = 5, **kw) -> bytes:
    fields = {"round_id": round_id, "plan_hash": dev.codec.plan_hash, "model_version": 1,
              "model_hash": update_hash(MODEL_V1).hex(), "lr": 0.1, "local_steps": 2, "batch_size": 2, "deadline": 0.0}
    return Task(**{**fields, **kw}).to_json()


def failed_status(out) -> Status:
    (pub,) = [o for o in out if isinstance(o, Publish)]
    assert pub.topic == "dev/d07/status" and pub.retain
    status = parse(pub.payload, Status)
    assert isinstance(status, Status) and status.state == "failed"
    return status


def test_empty_buffer_answers_failed_no_samples():
    # Prepare
    dev = device(np.zeros((0, 3, 8, 8), np.int8), np.zeros(0, np.int32))
    # Execute
    out = dev.handle(Received("task", task(dev)))
    # Assert
    status = failed_status(out)
    assert (status.round_id, status.reason, status.samples) == (5, "no_samples", 0)
    assert isinstance(out[0], Note) and out[0].what == "no_samples"


def test_task_for_another_plan_answers_failed_wrong_plan():
    # Prepare
    dev = device()
    # Execute
    out = dev.handle(Received("task", task(dev, plan_hash="ee" * 32)))
    # Assert
    assert failed_status(out).reason == "wrong_plan" and dev.counter == 0


def test_task_for_a_model_hash_it_does_not_hold_answers_failed_wrong_model():
    # Prepare
    dev = device()
    # Execute
    out = dev.handle(Received("task", task(dev, model_hash="00" * 32)))
    # Assert
    assert failed_status(out).reason == "wrong_model"


def test_labels_outside_the_plan_answer_failed_bad_samples_and_restore_the_base():
    # Prepare: the buffer takes any integer label; the plan has 4 classes
    x, _ = tiny_dataset(8)
    dev = device(x, np.full(8, 9, np.int32))
    before = {k: v.copy() for k, v in dev.trainer.trainable_state().items()}
    # Execute
    out = dev.handle(Received("task", task(dev)))
    # Assert
    assert failed_status(out).reason == "bad_samples" and "[0, 4)" in out[0].detail
    assert dev.counter == 0 and dev.last_round == 0 and dev.last_delta == b""
    after = dev.trainer.trainable_state()
    assert all(np.array_equal(before[k], after[k]) for k in before)


class _Exploding(Trainer):
    def train_step(self, x, y, lr):
        super().train_step(x, y, lr)  # changes the tensors, then fails
        raise MemoryError("arena exhausted")


def test_trainer_error_answers_failed_train_error_and_restores_the_base():
    # Prepare
    dev = device(trainer=_Exploding(PLAN))
    base = {k: v.copy() for k, v in dev.trainer.trainable_state().items()}
    # Execute
    out = dev.handle(Received("task", task(dev)))
    # Assert
    assert failed_status(out).reason == "train_error" and "MemoryError: arena exhausted" in out[0].detail
    assert all(np.array_equal(base[k], v) for k, v in dev.trainer.trainable_state().items())


def test_a_trainable_task_still_sends_its_delta():
    # Prepare
    dev = device()
    # Execute
    out = dev.handle(Received("task", task(dev)))
    # Assert
    assert [o.topic for o in out if isinstance(o, Publish)] == ["dev/d07/delta"] and dev.counter == 1
    assert dev.last_failure is None


def test_stale_task_is_still_ignored_not_failed():
    # Prepare: the device trained round 5
    dev = device()
    dev.handle(Received("task", task(dev)))
    # Execute
    out = dev.handle(Received("task", task(dev, round_id=4)))
    # Assert
    assert not [o for o in out if isinstance(o, Publish)] and out[0].what == "stale_task"


def test_last_will_has_no_model_version_but_a_heartbeat_does():
    # Prepare
    dev = device()
    # Execute
    will, beat = dev.last_will(), dev.status()
    # Assert
    assert json.loads(will.payload) == {"v": 1, "type": "status", "device_id": "d07", "state": "offline"}
    assert will.retain and parse(beat.payload).model_version == 1


# --- samples against the plan ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("x", "y", "words"), [
    (np.zeros((4, 3, 8, 8), np.int8), np.array([0, 1, 2, 4]), "[0, 4)"),
    (np.zeros((4, 3, 8, 8), np.int8), np.array([0.0, 1.0, 2.0, 3.0]), "integer"),
    (np.zeros((4, 3, 8, 8), np.int8), np.array([True, False, True, False]), "integer"),
    (np.zeros((4, 3, 8, 8), np.int8), np.array([0, 1, 2]), "one per sample"),
    (np.zeros((0, 3, 8, 8), np.int8), np.zeros(0, np.int64), "no samples"),
    (np.zeros((4, 8, 8, 3), np.int8), np.zeros(4, np.int64), "(N, 3, 8, 8)"),
    (np.full((4, 3, 8, 8), np.nan), np.zeros(4, np.int64), "NaN"),
    (np.array([["a"] * 192] * 4).reshape(4, 3, 8, 8), np.zeros(4, np.int64), "numbers"),
])
def test_prepare_refuses_samples_the_plan_cannot_train(x, y, words):
    # Prepare / Execute
    with pytest.raises(SampleError) as e:
        prepare(PLAN, x, y)
    # Assert
    assert words in str(e.value)


def test_prepare_quantizes_floats_and_counts_saturation():
    # Prepare: the plan's input scale is 1/32, so 10.0 saturates at 127
    x = np.zeros((2, 3, 8, 8), np.float32)
    x[0, 0, 0, 0] = 10.0
    # Execute
    q, y, saturated = prepare(PLAN, x, np.array([0, 1]))
    # Assert
    assert q.dtype == np.int8 and q[0, 0, 0, 0] == 127 and saturated == 1 and y.dtype == np.int32


def test_prepare_checks_token_ids_against_the_embedding_table():
    # Prepare
    text = tiny_text_plan(vocab=16, length=6)
    spec = input_spec(text)
    # Execute
    with pytest.raises(SampleError) as e:
        prepare(text, np.full((2, 6), 16), np.array([0, 1]))
    ok, _, _ = prepare(text, np.full((2, 6), 15, np.int64), np.array([0, 1]))
    # Assert
    assert spec.vocab == 16 and "[0, 16)" in str(e.value) and ok.dtype == np.int32


def test_ack_detail_reaches_the_device_log():
    # Prepare: a device that sent a delta the coordinator refused as malformed
    dev = device()
    dev.handle(Received("task", task(dev)))
    ack = Ack(5, hashlib.sha256(dev.last_delta).hexdigest(), False, "malformed", "size_overflow: record 0 too big")
    # Execute
    out = dev.handle(Received("ack", ack.to_json()))
    # Assert
    assert out[0].what == "ack" and out[0].detail == "round 5: malformed (size_overflow: record 0 too big)"
