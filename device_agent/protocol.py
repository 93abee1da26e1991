"""The device side of the fleet protocol as a sans-I/O state machine: messages in, publish intents out.

``hello -> wait for a model -> wait for a task -> train locally on private samples -> delta -> ...``. Training
is a call into an injected trainer (the engine's ``Trainer``); encoding and decoding binary payloads is an
injected :class:`DeviceCodec` (``device_agent.wire``). The machine is strict: a task for another plan, an older
round or another model version, and a model update that is not newer than what it holds, change nothing (they
come back as :class:`Note` outputs saying why). Personal tensors train but never leave: the delta covers the
shared trainable tensors only, and a model update never overwrites personal ones. With a personalizer
(``device_agent/engine/personal.py``) the device also trains its personal copy on its buffer after each model
update; that copy is only ever read locally (:meth:`DeviceProtocol.personal_model`). A task the device cannot train
(another plan, a model hash it does not hold, no or bad samples, a trainer error) is answered with a ``failed``
status naming the round, so the coordinator stops waiting for it (docs/protocol.md, "status").
A task that arrives inside an ``OPEN`` secure-aggregation message (``dev/<id>/secagg_relay``) trains the same way,
but its delta never leaves in clear: the device advertises keys instead and answers the coordinator's stages
with :class:`device_agent.secagg.MaskedRound` (docs/security.md, "Secure aggregation").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np

from device_agent.buffer import SampleBuffer
from device_agent.samples import SampleError, check_batch, input_spec
from device_agent.secagg import MaskedRound
from device_agent.wire.delta import encode_delta, residual_after
from device_agent.wire.errors import WireError, WireFormatError
from device_agent.wire.messages import Ack, Hello, MessageError, Publish, Status, Task, parse
from device_agent.wire.plan import plan_hash
from device_agent.wire.secagg import SecAggError, flat_delta, flat_units, session_label
from device_agent.wire.secagg_frames import Open, secagg_from_bytes, secagg_to_bytes
from device_agent.wire.update import Form, ModelUpdate, apply_update


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
    state: dict[int, np.ndarray] | None  # shared trainable tensor id -> new values; None: not applicable here
    hash: str  # hex identity of this model version (wire ``model_hash``): the base_hash of the next delta
    full: bool = True  # FULL form (applies anywhere) or DIFF (applies only on top of base_version)


class DeviceCodec(Protocol):
    plan_hash: str

    def encode_delta(self, header: DeltaHeader, old: dict[int, np.ndarray], new: dict[int, np.ndarray], *,
                     residual: dict[int, np.ndarray] | None = None,
                     topk_permille: int | None = None) -> tuple[bytes, dict[int, np.ndarray] | None]: ...
    # -> (delta payload, the residual left for the next round: None when everything was sent)

    def decode_update(self, payload: bytes, held_version: int = -1,
                      held: dict[int, np.ndarray] | None = None) -> ModelUpdateView: ...  # raises CodecError


def topk_counts(plan, permille: int | None) -> dict[int, int] | None:
    """Per shared tensor ``k = max(1, ceil(numel * permille / 1000))`` (as the firmware's GET_DELTA); None/0: all."""
    if not permille:
        return None
    return {t.id: max(1, -(-t.numel * permille // 1000)) for t in plan.trainable if not t.personal}


class WireDeviceCodec:
    """:class:`DeviceCodec` over ``device_agent.wire``: deltas with every coordinate or top-k, updates checked
    with ``verify``. ``top_k`` (k per tensor, or tensor id -> k) or ``topk_permille`` choose the default
    sparsity; a task may override the permille. ``error_feedback``: what top-k does not send this round is kept
    and added to the next round's change, so sparsification delays learning instead of losing it."""

    def __init__(self, plan, verify, top_k: int | dict[int, int] | None = None, *, topk_permille: int | None = None,
                 error_feedback: bool = True):
        self.plan, self.verify, self.top_k, self.topk_permille = plan, verify, top_k, topk_permille
        self.error_feedback = error_feedback
        self._hash = plan_hash(plan)
        self.plan_hash = self._hash.hex()

    def encode_delta(self, header: DeltaHeader, old: dict[int, np.ndarray], new: dict[int, np.ndarray], *,
                     residual: dict[int, np.ndarray] | None = None,
                     topk_permille: int | None = None) -> tuple[bytes, dict[int, np.ndarray] | None]:
        permille = self.topk_permille if topk_permille is None else topk_permille
        top_k = topk_counts(self.plan, permille) if permille is not None else self.top_k
        res = residual if self.error_feedback else None
        d = encode_delta(self.plan, old, new, device_id=header.device_id, round_id=header.round_id,
                         base_hash=bytes.fromhex(header.base_hash), counter=header.counter,
                         sample_count=header.num_samples, top_k=top_k, plan_hash=self._hash, residual=res)
        left = None
        if self.error_feedback:
            left = residual_after(d, self.plan, old, new, res)
            if not any(v.any() for v in left.values()):
                left = None
        return d.to_bytes(), left

    def decode_update(self, payload: bytes, held_version: int = -1,
                      held: dict[int, np.ndarray] | None = None) -> ModelUpdateView:
        try:
            upd = ModelUpdate.from_bytes(payload, verify=self.verify, plan=self.plan, plan_hash=self._hash)
            mh = bytes(upd.model_hash or b"").hex()
            if upd.form == Form.DIFF and (held is None or held_version != upd.base_version
                                          or upd.new_version <= held_version):
                return ModelUpdateView(upd.base_version, upd.new_version, None, mh, full=False)
            state = apply_update(upd, self.plan, held if upd.form == Form.DIFF else None, plan_hash=self._hash)
        except WireFormatError as e:
            raise CodecError(int(e.code), str(e)) from None
        ids = sorted(upd.tensors) if upd.version == 1 else [t.id for t in self.plan.trainable if not t.personal]
        shared = {tid: state[tid] for tid in ids}
        return ModelUpdateView(upd.base_version, upd.new_version, shared, mh, full=upd.form == Form.FULL)


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
    """A message on one of the device's subscriptions: kind = task | ack | model (``model/current`` or
    ``dev/<id>/model``: both carry model updates and are handled alike)."""

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
                 counter: int = 0, seed: int = 0, personalizer=None, masked_round=MaskedRound):
        self.id, self.plan, self.trainer, self.codec, self.buffer = identity, plan, trainer, codec, buffer
        self.personalizer = personalizer  # engine.personal.Personalizer or None
        self.masked_round = masked_round  # MaskedRound or a twin with its signature (a board that masks itself)
        self.shared_ids = sorted(t.id for t in plan.trainable if not t.personal)
        self.state = DeviceState.OFF
        self.version, self.model_hash = -1, ""
        self.base: dict[int, np.ndarray] = {}  # shared tensors of the held model version
        self.counter, self.seed = counter, seed
        self.pending: Task | None = None
        self.last_round, self.last_delta = 0, b""
        self.last_ack: Ack | None = None
        # error feedback: the part of earlier rounds' change not sent yet (None: nothing pending); if the
        # coordinator refuses the last delta, everything it carried goes back into the residual
        self.residual: dict[int, np.ndarray] | None = None
        self._if_refused: dict[int, np.ndarray] | None = None
        self.spec = input_spec(plan)
        self.last_failure: tuple[int, str, str] | None = None  # (round, reason, detail) of the last failed task
        self.session: int | None = None  # the MQTT connection's number, set by the adapter (messages.Status)
        self.shared = [t for t in plan.trainable if not t.personal]  # the layout of a masked input
        self.secure_round = 0  # the last round announced as masked (OPEN): its delta never leaves in clear
        self.masked: MaskedRound | None = None
        self.last_kind = "delta"  # the topic ``last_delta`` went out on (a masked round: its key advertisement)

    # --- topics ---------------------------------------------------------------------------------------------

    def _up(self, kind: str, payload: bytes, retain: bool = False) -> Publish:
        return Publish(f"dev/{self.id.device_id}/{kind}", payload, retain)

    def subscriptions(self) -> list[str]:
        """Topics (relative to tinyfleet/<fleet>/) the adapter subscribes to, QoS 1."""
        d = self.id.device_id
        return [f"dev/{d}/task", f"dev/{d}/ack", f"dev/{d}/model", f"dev/{d}/secagg_relay", "model/current"]

    def status(self, state: str = "online") -> Publish:
        s = Status(self.id.device_id, state, max(self.version, 0), len(self.buffer), session=self.session)
        return self._up("status", s.to_json(), retain=True)

    def failed(self, round_id: int, reason: str, detail: str) -> list[DeviceOutput]:
        """A Note ``reason`` carrying ``detail`` for the local log (the detail stays on the device), then a retained
        ``failed`` status for ``round_id``: the coordinator counts the device out of that round."""
        self.last_failure = (round_id, reason, detail)
        s = Status(self.id.device_id, "failed", max(self.version, 0), len(self.buffer), round_id, reason,
                   self.session)
        return [Note(reason, f"round {round_id} failed: {detail}"), self._up("status", s.to_json(), retain=True)]

    def set_session(self, session: int | None) -> None:
        """The adapter numbers each MQTT connection (``Status.session``); hello, status and will carry it."""
        self.session = session

    def last_will(self) -> Publish:
        """What the adapter registers as MQTT Last Will: a retained offline status without ``model_version`` and
        ``samples`` (the broker keeps the will from connect time on, so they would be stale after an update)."""
        s = Status(self.id.device_id, "offline", None, None, session=self.session)
        return self._up("status", s.to_json(), retain=True)

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
            if event.kind == "secagg_relay":
                return self._secagg(event.payload)
            return [Note("ignored", f"unknown message kind {event.kind!r}")]
        raise TypeError(f"unknown device event {type(event).__name__}")

    def _start(self) -> list[DeviceOutput]:
        if self.state == DeviceState.OFF:
            self.state = DeviceState.NO_MODEL if self.version < 0 else DeviceState.READY
        i = self.id
        hello = Hello(i.device_id, i.board, i.sram, i.flash, (self.codec.plan_hash,), i.firmware, self.session)
        return [self._up("hello", hello.to_json(), retain=True), self.status()]

    def _model(self, payload: bytes) -> list[DeviceOutput]:
        try:
            upd = self.codec.decode_update(payload, self.version, self.base if self.version >= 0 else None)
        except CodecError as e:  # NOTE: in a nested plan family model/current carries the largest plan: not ours
            return [Note("other_plan" if e.code == WireError.PLAN_MISMATCH else "bad_model", str(e))]
        if upd.new_version <= self.version:
            return [Note("stale_model", f"v{upd.new_version} <= held v{self.version}")]
        if upd.state is None:
            # a DIFF for a base this device does not hold: say which version it holds (status) so the coordinator
            # can send the FULL form; the task, if any, waits for it
            return [Note("need_full_model", f"diff v{upd.base_version}->v{upd.new_version}, holding "
                                            f"v{self.version}"), self.status()]
        if sorted(upd.state) != self.shared_ids:
            return [Note("bad_model", f"tensors {sorted(upd.state)} != shared {self.shared_ids}")]
        self.base = {tid: np.array(v, copy=True) for tid, v in upd.state.items()}
        self.trainer.load_trainable(self.base)  # personal tensors are not in the update: kept as they are
        self.version, self.model_hash = upd.new_version, upd.hash
        self.state = DeviceState.READY
        out: list[DeviceOutput] = [Note("model", f"v{self.version}")]
        out += self._personalize()
        if self.pending is not None:
            task, self.pending = self.pending, None
            out += self._run(task)
        return out

    def _personalize(self) -> list[DeviceOutput]:
        """Train the personal copy on the buffer, on top of the model just received (nothing is published)."""
        p = self.personalizer
        if p is None or len(self.buffer) == 0 or p.spec.steps == 0:
            return []
        rng = np.random.default_rng([self.seed, self.version, 0x9E5])  # NOTE: apart from any round's stream
        reference = self.trainer.trainable_state()
        try:
            p.update(self.trainer, reference, lambda _k: self.buffer.batch(p.spec.batch_size, rng))
        except Exception as e:  # noqa: BLE001  NOTE: a failed personalization keeps the last personal copy
            self.trainer.load_trainable(reference)
            return [Note("personalize_error", f"{type(e).__name__}: {e}")]
        return [Note("personalized", f"{p.spec.method} v{self.version}")]

    def personal_model(self) -> dict[int, np.ndarray]:
        """The model this device predicts with: what it holds, with its personal copy over it (local use only)."""
        held = self.trainer.trainable_state()
        return held if self.personalizer is None else self.personalizer.model(held)

    def _task(self, payload: bytes) -> list[DeviceOutput]:
        try:
            task = parse(payload, Task)
        except MessageError as e:
            return [Note("bad_task", str(e))]
        assert isinstance(task, Task)
        if task.plan_hash != self.codec.plan_hash:
            return self.failed(task.round_id, "wrong_plan", f"task plan {task.plan_hash[:16]}, this device holds "
                                                            f"{self.codec.plan_hash[:16]}: restart it with that plan")
        if task.round_id < self.last_round:
            return [Note("stale_task", f"round {task.round_id} < {self.last_round}")]
        if task.round_id == self.last_round and self.last_delta:
            return [self._up(self.last_kind, self.last_delta), Note("resent", f"round {task.round_id}")]
        if task.model_version < self.version:
            return [Note("stale_task", f"model v{task.model_version} < held v{self.version}")]
        if task.model_version > self.version:
            self.pending, self.state = task, DeviceState.WAIT_MODEL
            return [Note("wait_model", f"task needs v{task.model_version}, holding v{self.version}")]
        return self._run(task)

    def _run(self, task: Task) -> list[DeviceOutput]:
        if task.model_version != self.version:  # the model moved past the task's base: that round is over
            return [Note("stale_task", f"task model v{task.model_version} != held v{self.version}")]
        if task.model_hash != self.model_hash:
            return self.failed(task.round_id, "wrong_model", f"task model v{task.model_version} hash "
                                                             f"{task.model_hash[:12]}, held {self.model_hash[:12]}")
        if len(self.buffer) == 0:
            return self.failed(task.round_id, "no_samples", "the sample buffer is empty")
        self.trainer.load_trainable(self.base)  # train from the round's base, with this device's personal tensors
        rng = np.random.default_rng([self.seed, task.round_id])
        try:
            for _ in range(task.local_steps):
                x, y = self.buffer.batch(task.batch_size, rng)
                check_batch(self.spec, x, y)
                self.trainer.train_step(x, y, task.lr)
            trained = self.trainer.trainable_state()
        except SampleError as e:
            self.trainer.load_trainable(self.base)
            return self.failed(task.round_id, "bad_samples", str(e))
        except Exception as e:  # noqa: BLE001  NOTE: any trainer error ends this round for this device, not the device
            self.trainer.load_trainable(self.base)
            return self.failed(task.round_id, "train_error", f"{type(e).__name__}: {e}")
        new = {tid: trained[tid] for tid in self.shared_ids}
        if task.round_id == self.secure_round:
            return self._masked(task, new)
        self.counter += 1
        header = DeltaHeader(self.id.device_id, task.round_id, self.model_hash, self.counter, len(self.buffer))
        # NOTE: 0 (the task asks for nothing) leaves the codec's own default, which is every coordinate unless the
        # device was configured for top-k itself
        self.last_delta, left = self.codec.encode_delta(header, self.base, new, residual=self.residual,
                                                        topk_permille=task.topk_permille or None)
        self._if_refused = {tid: new[tid].astype(np.int64).reshape(-1) - self.base[tid].astype(np.int64).reshape(-1)
                            + (self.residual[tid] if self.residual else 0) for tid in self.shared_ids}
        self.residual = left
        self.last_round, self.last_kind = task.round_id, "delta"
        # the shared tensors go back to the base: the next round trains from the coordinator's next version
        self.trainer.load_trainable(self.base)
        self.state = DeviceState.READY
        return [self._up("delta", self.last_delta), Note("trained", f"round {task.round_id}")]

    def _masked(self, task: Task, new: dict[int, np.ndarray]) -> list[DeviceOutput]:
        """A masked round: keep the delta here and advertise this round's keys (the coordinator's stages follow)."""
        self.trainer.load_trainable(self.base)
        self.state = DeviceState.READY
        values = flat_delta(self.shared, self.base, new)
        self.masked = self.masked_round(self.id.device_id, task.round_id, session_label(bytes.fromhex(self.codec.plan_hash)),
                                  values, len(self.buffer), flat_units(self.shared))
        self.last_round, self.last_kind = task.round_id, "secagg"
        self.last_delta = secagg_to_bytes(task.round_id, self.masked.advert)
        return [self._up("secagg", self.last_delta), Note("trained", f"round {task.round_id} (masked)")]

    def _secagg(self, payload: bytes) -> list[DeviceOutput]:
        """A secure-aggregation message: OPEN carries a masked round's task; the rest are that round's stages."""
        try:
            round_id, msg = secagg_from_bytes(payload)
        except WireFormatError as e:
            return [Note("bad_secagg", str(e))]
        if isinstance(msg, Open):
            self.secure_round = max(self.secure_round, round_id)
            return self._task(msg.task)
        m = self.masked
        if m is None or m.round_id != round_id:
            return [Note("secagg_refused", f"round {round_id}: no masked round of this device is open")]
        try:
            reply = m.answer(msg)
        except SecAggError as e:
            return [Note("secagg_refused", f"round {round_id}: {e}")]
        out: list[DeviceOutput] = [self._up("secagg", secagg_to_bytes(round_id, reply)),  # type: ignore[arg-type]
                                   Note("secagg", f"round {round_id}: {type(reply).__name__}")]
        return out

    def _ack(self, payload: bytes) -> list[DeviceOutput]:
        try:
            ack = parse(payload, Ack)
        except MessageError as e:
            return [Note("bad_ack", str(e))]
        assert isinstance(ack, Ack)
        self.last_ack = ack
        why = f" ({ack.detail})" if ack.detail else ""  # the coordinator's words, e.g. the wire error of a refusal
        out: list[DeviceOutput] = [Note("ack", f"round {ack.round_id}: {ack.reason}{why}")]
        if ack.accepted and self.last_delta and ack.content_hash == hashlib.sha256(self.last_delta).hexdigest():
            self._if_refused = None
        elif (not ack.accepted and self._if_refused is not None and self.last_delta
                and ack.content_hash == hashlib.sha256(self.last_delta).hexdigest()):
            self.residual, self._if_refused = self._if_refused, None  # nothing of it counted: send it later
            out.append(Note("residual_restored", f"round {ack.round_id}"))
        return out
