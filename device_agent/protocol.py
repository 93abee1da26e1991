"""The device side of the fleet protocol as a sans-I/O state machine: messages in, publish intents out.

``hello -> wait for a model -> wait for a task -> train locally on private samples -> delta -> ...``. Training
is a call into an injected trainer (the engine's ``Trainer``); encoding and decoding binary payloads is an
injected :class:`DeviceCodec` (``device_agent.wire``). The machine is strict: a task for another plan, an older
round or another model version, and a model update that is not newer than what it holds, change nothing (they
come back as :class:`Note` outputs saying why). Personal tensors train but never leave: the delta covers the
shared trainable tensors only, and a model update never overwrites personal ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np

from device_agent.buffer import SampleBuffer
from device_agent.messages import Ack, Hello, MessageError, Publish, Status, Task, parse
from device_agent.wire.delta import encode_delta
from device_agent.wire.errors import WireFormatError
from device_agent.wire.plan import plan_hash
from device_agent.wire.update import ModelUpdate, apply_update, update_hash


class CodecError(ValueError):
    """A downlink payload the wire reader refused; ``code`` is its WireError number."""

    def __init__(self, code: int, detail: str):
        super().__init__(f"wire error {code}: {detail}")
        self.code, self.detail = code, detail


@dataclass(frozen=True)
class DeltaHeader:
    device_id: str
    round_id: int
    base_hash: str  # hex sha256 of the shared trainable state trained from (== the task's model_hash)
    counter: int  # monotonic per device, never reused
    num_samples: int


@dataclass(frozen=True)
class ModelUpdateView:
    base_version: int
    new_version: int
    state: dict[int, np.ndarray]  # shared trainable tensor id -> new values
    hash: str  # hex identity of this model version (wire ``update_hash``): the base_hash of the next delta


class DeviceCodec(Protocol):
    plan_hash: str

    def encode_delta(self, header: DeltaHeader, old: dict[int, np.ndarray], new: dict[int, np.ndarray]) -> bytes: ...

    def decode_update(self, payload: bytes) -> ModelUpdateView: ...  # raises CodecError


class WireDeviceCodec:
    """:class:`DeviceCodec` over ``device_agent.wire``: deltas dense or top-``k``, updates checked with ``verify``."""

    def __init__(self, plan, verify, top_k: int | dict[int, int] | None = None):
        self.plan, self.verify, self.top_k = plan, verify, top_k
        self._hash = plan_hash(plan)
        self.plan_hash = self._hash.hex()

    def encode_delta(self, header: DeltaHeader, old: dict[int, np.ndarray], new: dict[int, np.ndarray]) -> bytes:
        return encode_delta(self.plan, old, new, device_id=header.device_id, round_id=header.round_id,
                            base_hash=bytes.fromhex(header.base_hash), counter=header.counter,
                            sample_count=header.num_samples, top_k=self.top_k, plan_hash=self._hash).to_bytes()

    def decode_update(self, payload: bytes) -> ModelUpdateView:
        try:
            upd = ModelUpdate.from_bytes(payload, verify=self.verify)
            state = apply_update(upd, self.plan, plan_hash=self._hash)
        except WireFormatError as e:
            raise CodecError(int(e.code), str(e)) from None
        shared = {tid: state[tid] for tid in sorted(upd.tensors)}
        return ModelUpdateView(upd.base_version, upd.new_version, shared, update_hash(payload).hex())


class LocalTrainer(Protocol):
    def trainable_state(self) -> dict[int, np.ndarray]: ...

    def load_trainable(self, state: dict[int, np.ndarray]) -> None: ...

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> object: ...


class DeviceState(str, Enum):
    OFF = "off"  # not started
    NO_MODEL = "no_model"  # announced, waiting for a model update
    READY = "ready"  # holds a model, waiting for a task
    WAIT_MODEL = "wait_model"  # holds a task for a newer model than it has


@dataclass(frozen=True)
class Start:
    pass


@dataclass(frozen=True)
class Heartbeat:
    """Time for a status message (the adapter's timer; the machine has no clock)."""


@dataclass(frozen=True)
class Received:
    """A message on one of the device's subscriptions: kind = task | ack | model."""

    kind: str
    payload: bytes


@dataclass(frozen=True)
class Note:
    """Informational output (no topic): something refused or done, for logs and tests."""

    what: str
    detail: str = ""


DeviceOutput = Publish | Note


@dataclass(frozen=True)
class Identity:
    device_id: str
    board: str
    sram: int
    flash: int
    firmware: str = ""


class DeviceProtocol:
    """One device. ``counter`` must persist across reboots on a real board (flash); pass it back in."""

    def __init__(self, identity: Identity, plan, trainer: LocalTrainer, codec: DeviceCodec, buffer: SampleBuffer,
                 counter: int = 0, seed: int = 0):
        self.id, self.plan, self.trainer, self.codec, self.buffer = identity, plan, trainer, codec, buffer
        self.shared_ids = sorted(t.id for t in plan.trainable if not t.personal)
        self.state = DeviceState.OFF
        self.version, self.model_hash = -1, ""
        self.base: dict[int, np.ndarray] = {}  # shared tensors of the held model version
        self.counter, self.seed = counter, seed
        self.pending: Task | None = None
        self.last_round, self.last_delta = 0, b""
        self.last_ack: Ack | None = None

    # --- topics ---------------------------------------------------------------------------------------------

    def _up(self, kind: str, payload: bytes, retain: bool = False) -> Publish:
        return Publish(f"dev/{self.id.device_id}/{kind}", payload, retain)

    def subscriptions(self) -> list[str]:
        """Topics (relative to tinyfleet/<fleet>/) the adapter subscribes to, QoS 1."""
        d = self.id.device_id
        return [f"dev/{d}/task", f"dev/{d}/ack", "model/current"]

    def status(self, state: str = "online") -> Publish:
        s = Status(self.id.device_id, state, max(self.version, 0), len(self.buffer))
        return self._up("status", s.to_json(), retain=True)

    def last_will(self) -> Publish:
        """What the adapter registers as MQTT Last Will: a retained offline status."""
        return self.status("offline")

    # --- events ---------------------------------------------------------------------------------------------

    def handle(self, event: object) -> list[DeviceOutput]:
        if isinstance(event, Start):
            return self._start()
        if self.state == DeviceState.OFF:
            raise RuntimeError(f"device {self.id.device_id}: handle(Start()) first")
        if isinstance(event, Heartbeat):
            return [self.status()]
        if isinstance(event, Received):
            if event.kind == "model":
                return self._model(event.payload)
            if event.kind == "task":
                return self._task(event.payload)
            if event.kind == "ack":
                return self._ack(event.payload)
            return [Note("ignored", f"unknown message kind {event.kind!r}")]
        raise TypeError(f"unknown device event {type(event).__name__}")

    def _start(self) -> list[DeviceOutput]:
        if self.state == DeviceState.OFF:
            self.state = DeviceState.NO_MODEL if self.version < 0 else DeviceState.READY
        i = self.id
        hello = Hello(i.device_id, i.board, i.sram, i.flash, (self.codec.plan_hash,), i.firmware)
        return [self._up("hello", hello.to_json(), retain=True), self.status()]

    def _model(self, payload: bytes) -> list[DeviceOutput]:
        try:
            upd = self.codec.decode_update(payload)
        except CodecError as e:
            return [Note("bad_model", str(e))]
        if upd.new_version <= self.version:
            return [Note("stale_model", f"v{upd.new_version} <= held v{self.version}")]
        if sorted(upd.state) != self.shared_ids:
            return [Note("bad_model", f"tensors {sorted(upd.state)} != shared {self.shared_ids}")]
        self.base = {tid: np.array(v, copy=True) for tid, v in upd.state.items()}
        self.trainer.load_trainable(self.base)  # personal tensors are not in the update: kept as they are
        self.version, self.model_hash = upd.new_version, upd.hash
        self.state = DeviceState.READY
        out: list[DeviceOutput] = [Note("model", f"v{self.version}")]
        if self.pending is not None:
            task, self.pending = self.pending, None
            out += self._run(task)
        return out

    def _task(self, payload: bytes) -> list[DeviceOutput]:
        try:
            task = parse(payload, Task)
        except MessageError as e:
            return [Note("bad_task", str(e))]
        assert isinstance(task, Task)
        if task.plan_hash != self.codec.plan_hash:
            return [Note("wrong_plan", task.plan_hash[:16])]
        if task.round_id < self.last_round:
            return [Note("stale_task", f"round {task.round_id} < {self.last_round}")]
        if task.round_id == self.last_round and self.last_delta:
            return [self._up("delta", self.last_delta), Note("resent", f"round {task.round_id}")]
        if task.model_version < self.version:
            return [Note("stale_task", f"model v{task.model_version} < held v{self.version}")]
        if task.model_version > self.version:
            self.pending, self.state = task, DeviceState.WAIT_MODEL
            return [Note("wait_model", f"task needs v{task.model_version}, holding v{self.version}")]
        return self._run(task)

    def _run(self, task: Task) -> list[DeviceOutput]:
        if task.model_version != self.version or task.model_hash != self.model_hash:
            return [Note("stale_task", f"task model v{task.model_version}/{task.model_hash[:12]} != held "
                                       f"v{self.version}/{self.model_hash[:12]}")]
        if len(self.buffer) == 0:
            return [Note("no_samples", f"round {task.round_id}")]
        self.trainer.load_trainable(self.base)  # train from the round's base, with this device's personal tensors
        rng = np.random.default_rng([self.seed, task.round_id])
        for _ in range(task.local_steps):
            x, y = self.buffer.batch(task.batch_size, rng)
            self.trainer.train_step(x, y, task.lr)
        trained = self.trainer.trainable_state()
        new = {tid: trained[tid] for tid in self.shared_ids}
        self.counter += 1
        header = DeltaHeader(self.id.device_id, task.round_id, self.model_hash, self.counter, len(self.buffer))
        self.last_delta = self.codec.encode_delta(header, self.base, new)
        self.last_round = task.round_id
        # the shared tensors go back to the base: the next round trains from the coordinator's next version
        self.trainer.load_trainable(self.base)
        self.state = DeviceState.READY
        return [self._up("delta", self.last_delta), Note("trained", f"round {task.round_id}")]

    def _ack(self, payload: bytes) -> list[DeviceOutput]:
        try:
            ack = parse(payload, Ack)
        except MessageError as e:
            return [Note("bad_ack", str(e))]
        assert isinstance(ack, Ack)
        self.last_ack = ack
        return [Note("ack", f"round {ack.round_id}: {ack.reason}")]
