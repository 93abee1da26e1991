"""GridCore: the Flower grid's state, sans-I/O (see the package docstring)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict

from device_agent.engine.ir import DTYPE_NUMPY
from device_agent.wire.messages import Ack, MessageError, Publish, Status, Task, ack_detail
from fleet import round as rnd
from fleet.coordinator import Boot, CodecError, Received, Tick, WireCodec, plan_sram
from fleet.flower.claim import LOCK_TOPIC, LOCK_TTL_S, STATE_TOPIC, Lock, State
from fleet.flower.records import GridErrorCode, node_id, reply_content, shared_tensors, state_from_arrays
from fleet.registry import Registry


@dataclass(frozen=True)
class Push:
    """Instruction messages, their ``message_id`` already set by :meth:`FleetGrid.push_messages`."""

    messages: tuple[Message, ...]


@dataclass(frozen=True)
class SetModel:
    """Make ``state`` (tensor id -> integer array) the fleet's model: a new version on ``model/current`` if it
    differs from the current one (the final model of a run, so devices hold what the strategy returned)."""

    state: dict


@dataclass(frozen=True)
class Release:
    """The run ends: delete the retained ``flower/lock`` (the last ``flower/state`` stays for the next run)."""


@dataclass
class GridConfig:
    lr: float = 0.05  # defaults for a ConfigRecord that does not say
    local_steps: int = 10
    batch_size: int = 1
    deadline_s: float = 60.0  # a task's deadline is min(this, the message's TTL)
    topk_permille: int = 0  # ask devices for top-k deltas (k = ceil(numel * permille / 1000)); 0: every coordinate


@dataclass
class _Pending:
    message: Message
    device_id: str
    round_id: int
    base_hash: str
    deadline: float
    trained: int = 0  # local_steps * batch_size of its task: the samples the device trains on


@dataclass
class GridCore:
    """The grid's state: registry, model versions, pending instructions and their replies. No I/O, no clock
    of its own (``clock`` is injected); drive it with ``handle`` and read it with the query methods."""

    plan: Any
    clock: Callable[[], float] = time.time
    config: GridConfig = field(default_factory=GridConfig)
    first_round: int = 1  # NOTE: devices ignore tasks for rounds below the last one they trained: pick above it
    codec: Any = None
    registry: Registry = field(default_factory=Registry)
    # resuming a fleet (flower_app reads both from the broker): the model version the devices hold, and its
    # tensors when known; without them the grid starts at start_version + 1 with the plan's values
    start_version: int = 0
    start_state: dict | None = None
    lock: Lock | None = None  # when set, published retained on flower/lock at Boot and refreshed on Tick

    def __post_init__(self):
        self.codec = self.codec or WireCodec(self.plan)
        self.shared = shared_tensors(self.plan)
        self.min_sram = plan_sram(self.plan)
        self.version, self.state = self.start_version, {}
        self.hash, self.model_payload = "", b""
        if self.start_state is not None and self.start_version > 0:
            self.version -= 1  # NOTE: the same version again (same model hash): devices holding it ignore it
            self._set_model(self.start_state)
        else:
            self._set_model({t.id: np.asarray(t.data).astype(DTYPE_NUMPY[t.dtype]).reshape(t.shape)
                             for t in self.shared})
        self._lock_due = float("inf") if self.lock is None else 0.0
        # NOTE: the round machine of fleet/round.py judges every delta, as for the coordinator (one push of
        # train messages = one round); it also keeps the per-device counters (replay protection).
        self.machine = rnd.RoundMachine(rnd.RoundConfig(), self.codec.plan_hash, round_id=self.first_round - 1)
        self.bases: dict[str, dict[int, np.ndarray]] = {}  # model hash -> state, for the hashes tasks still name
        self.pending: dict[str, _Pending] = {}  # message id -> instruction awaiting its device's delta
        self.owing: dict[str, str] = {}  # device id -> message id
        self.replies: dict[str, Message] = {}  # message id -> reply, until pulled

    @property
    def round_id(self) -> int:
        return self.machine.round_id

    # --- queries (run on the link's thread) -----------------------------------------------------------------

    def node_ids(self) -> dict[int, str]:
        """Eligible devices (online, SRAM for the plan, holding the plan) by node id."""
        return {node_id(d): d for d in self.registry.eligible(self.min_sram, self.codec.plan_hash)}

    def pull(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def expire(self, message_ids: Iterable[str], why: str) -> list[Message]:
        """Give up on these instructions now: an Error reply for each one still pending, returned (not stored)."""
        for i in list(message_ids):
            if i in self.pending:
                self._fail(i, GridErrorCode.TIMEOUT, why)
        return self.pull(message_ids)

    # --- events ---------------------------------------------------------------------------------------------

    def handle(self, event: object) -> list[Publish]:
        if isinstance(event, Received):
            return self._received(event)
        if isinstance(event, Push):
            return self._push(event.messages)
        if isinstance(event, Tick):
            now = float(self.clock())
            for i in [i for i, p in self.pending.items() if now > p.deadline]:
                self._fail(i, GridErrorCode.TIMEOUT, f"no delta from {self.pending[i].device_id} by the deadline")
            return self._refresh_lock(now)
        if isinstance(event, Boot):
            self._lock_due = 0.0 if self.lock is not None else float("inf")
            return [*self._refresh_lock(float(self.clock())),
                    Publish(f"plan/{self.codec.plan_hash}", self.codec.plan_bytes(), retain=True),
                    Publish("model/current", self.model_payload, retain=True), self._state()]
        if isinstance(event, SetModel):
            if all(np.array_equal(event.state[t.id], self.state[t.id]) for t in self.shared):
                return []
            self._set_model({t.id: np.asarray(event.state[t.id]) for t in self.shared})
            return [Publish("model/current", self.model_payload, retain=True), self._state()]
        if isinstance(event, Release):
            held, self.lock, self._lock_due = self.lock is not None, None, float("inf")
            return [self._state()] + ([Publish(LOCK_TOPIC, b"", retain=True)] if held else [])
        raise TypeError(f"unknown grid event {type(event).__name__}")

    def _state(self) -> Publish:
        return Publish(STATE_TOPIC, State(self.machine.round_id, self.version).to_bytes(), retain=True)

    def _refresh_lock(self, now: float) -> list[Publish]:
        if self.lock is None or now < self._lock_due:
            return []
        self._lock_due = now + LOCK_TTL_S / 3
        self.lock = Lock(self.lock.holder, self.lock.run_id, self.lock.since, now + LOCK_TTL_S)
        return [Publish(LOCK_TOPIC, self.lock.to_bytes(), retain=True)]

    def _set_model(self, state: dict[int, np.ndarray]) -> None:
        self.version += 1
        self.state = state
        self.model_payload = self.codec.encode_update(self.version - 1, self.version, state)
        self.hash = self.codec.update_hash(self.model_payload)

    def _reply(self, mid: str, content_or_error) -> None:
        p = self.pending.pop(mid)
        if self.owing.get(p.device_id) == mid:
            del self.owing[p.device_id]
        self.replies[mid] = Message(content_or_error, reply_to=p.message)

    def _fail(self, mid: str, code: int, reason: str) -> None:
        self._reply(mid, Error(code, reason))

    def _push(self, messages: tuple[Message, ...]) -> list[Publish]:
        out: list[Publish] = []
        nodes = self.node_ids()
        now = float(self.clock())
        self._close_round(now)
        round_id = self.machine.round_id + 1
        tasks: dict[str, Task] = {}
        for msg in messages:
            mid, md = msg.metadata.message_id, msg.metadata
            self.pending[mid] = _Pending(msg, nodes.get(md.dst_node_id, ""), round_id, "", 0.0)
            if md.message_type != MessageType.TRAIN:
                self._fail(mid, GridErrorCode.UNSUPPORTED, f"TinyFleet devices only train, not {md.message_type!r}: "
                           "evaluate on the server (evaluate_fn) and set fraction_evaluate=0")
                continue
            device = nodes.get(md.dst_node_id)
            if device is None:
                self._fail(mid, GridErrorCode.UNKNOWN_NODE, f"node {md.dst_node_id} is not an eligible device")
                continue
            if device in self.owing:
                self._fail(mid, GridErrorCode.BAD_CONTENT, f"{device} already has a task in this round")
                continue
            try:
                task, model = self._task(round_id, msg.content, now + min(self.config.deadline_s, md.ttl))
            except ValueError as e:
                self._fail(mid, GridErrorCode.BAD_CONTENT, str(e))
                continue
            if model is not None:
                out.append(model)
            p = self.pending[mid]
            p.device_id, p.base_hash, p.deadline = device, task.model_hash, task.deadline
            p.trained = task.local_steps * task.batch_size
            self.owing[device] = mid
            tasks[device] = task
        if tasks:  # the round: every device with a task must deliver; the machine's deadline is the latest one
            m = self.machine
            m.config = rnd.RoundConfig(goal=len(tasks), over_selection=1.0, quorum=1 / len(tasks),
                                       deadline_s=max(t.deadline for t in tasks.values()) - now)
            m.handle(rnd.StartRound(round_id, self.version, self.hash, now))
            m.handle(rnd.Eligible(tuple(tasks), now))
            out.append(self._state())  # NOTE: before the tasks: a run that dies now still left its round id
            out += [Publish(f"dev/{d}/task", t.to_json()) for d, t in tasks.items()]
        self.bases = {h: st for h, st in self.bases.items() if h == self.hash or any(
            p.base_hash == h for p in self.pending.values())}
        return out

    def _close_round(self, now: float) -> None:
        """Close the machine's round (Flower aggregates; the machine only judges) so the next push opens one."""
        m = self.machine
        if m.state in (rnd.RoundState.TRAINING, rnd.RoundState.COLLECTING):
            m.handle(rnd.Tick(max(now, m.deadline) + 1.0))
        if m.state in (rnd.RoundState.COMMITTING, rnd.RoundState.ABANDONED):
            m.handle(rnd.Closed(now))

    def _task(self, round_id: int, content: RecordDict, deadline: float) -> tuple[Task, Publish | None]:
        """The task for one instruction, plus a new ``model/current`` if its ArrayRecord is another model."""
        model = None
        if content.array_records:
            state = state_from_arrays(self.plan, next(iter(content.array_records.values())))
            if any(not np.array_equal(state[t.id], self.state[t.id]) for t in self.shared):
                self._set_model(state)
                model = Publish("model/current", self.model_payload, retain=True)
        self.bases[self.hash] = self.state
        cfg = next(iter(content.config_records.values()), ConfigRecord())
        c = self.config
        lr = _num(cfg, ("lr", "learning-rate"), c.lr, float)
        steps = _num(cfg, ("local-steps", "local_steps"), c.local_steps, int)
        batch = _num(cfg, ("batch-size", "batch_size"), c.batch_size, int)
        topk = _num(cfg, ("topk-permille", "topk_permille"), c.topk_permille, int)
        mu = _num(cfg, ("proximal-mu", "proximal_mu"), 0.0, float)
        if mu != 0.0:
            # NOTE: FedProx only differs from FedAvg by this term in the *device's* loss; our devices do not add it
            raise ValueError(f"proximal-mu = {mu:g}: TinyFleet devices do not add FedProx's proximal term to their "
                             "int8 update, so this would silently be FedAvg; use proximal-mu = 0 or FedAvg")
        try:
            task = Task(round_id, self.codec.plan_hash, self.version, self.hash, lr, steps, batch, deadline, topk)
            task.to_json()  # the schema check: lr > 0, 1 <= steps <= 10**6, 1 <= batch <= 4096, permille <= 1000
        except MessageError as e:
            raise ValueError(f"config does not make a valid task: {e}") from None
        return task, model

    def _received(self, ev: Received) -> list[Publish]:
        if ev.kind == "delta":
            return self._delta(ev)
        now = float(self.clock())
        try:
            ctl = self.registry.receive(ev.kind, ev.device_id, ev.payload, now)  # the coordinator's own rule
        except MessageError:
            return []
        if ctl.stale:
            return []
        msg = ctl.message
        if ctl.lost:
            self._lost(ev.device_id, now, f"{ev.device_id} went offline (Last Will)")
        elif isinstance(msg, Status) and msg.state == "failed" and msg.round_id == self.machine.round_id:
            self._lost(ev.device_id, now, f"{ev.device_id} cannot train: {msg.reason}")
        return []

    def _lost(self, device_id: str, now: float, why: str) -> None:
        mid = self.owing.get(device_id)
        if mid is not None:
            self._fail(mid, GridErrorCode.OFFLINE, why)
        if self.machine.state in (rnd.RoundState.TRAINING, rnd.RoundState.COLLECTING):
            self.machine.handle(rnd.DeviceLost(device_id, now))

    def _delta(self, ev: Received) -> list[Publish]:
        content_hash = hashlib.sha256(ev.payload).hexdigest()
        m = self.machine
        mid = self.owing.get(ev.device_id)
        try:
            d = self.codec.decode_delta(ev.payload, content_hash)
        except CodecError as e:
            detail = f"WireError {e.code}: {e.detail}"
            if mid is not None:
                self._fail(mid, GridErrorCode.REJECTED, f"malformed delta: {detail}")
            return self._ack(ev.device_id, m.round_id, content_hash, rnd.Reject.MALFORMED, detail)
        up = d.header
        if up.device_id != ev.device_id:
            return self._ack(ev.device_id, up.round_id, content_hash, rnd.Reject.WRONG_DEVICE,
                             f"payload says {up.device_id!r}")
        out: list[Publish] = []
        for cmd in m.handle(rnd.DeltaArrived(up, float(self.clock()))):
            if isinstance(cmd, rnd.Accepted):
                p = self.pending.get(mid) if mid is not None else None
                if p is not None:
                    content = reply_content(self.plan, self.bases[p.base_hash], d.values, d.masks, up.num_samples,
                                            up.device_id, up.round_id, ev.payload, trained=p.trained)
                    self._reply(mid, content)  # type: ignore[arg-type]
                out += self._ack(ev.device_id, up.round_id, content_hash, None, "ok", ok=True)
            elif isinstance(cmd, rnd.Duplicate):
                out += self._ack(ev.device_id, up.round_id, content_hash, None, "", ok=True)
            elif isinstance(cmd, rnd.Rejected):
                if mid is not None and cmd.reason not in (rnd.Reject.WRONG_ROUND, rnd.Reject.ROUND_CLOSED):
                    self._fail(mid, GridErrorCode.REJECTED, f"delta refused: {cmd.reason.name.lower()}")
                out += self._ack(ev.device_id, up.round_id, content_hash, cmd.reason, cmd.detail)
            else:  # Commit / Abandon: every device with a task answered; Flower aggregates what it pulls
                self._close_round(float(self.clock()))
        return out

    def _ack(self, device_id: str, round_id: int, content_hash: str, reason: rnd.Reject | None, detail: str,
             ok: bool = False) -> list[Publish]:
        name = ("ok" if detail == "ok" else "duplicate") if reason is None else reason.name.lower()
        extra = ack_detail(detail) if reason is not None and detail else None
        return [Publish(f"dev/{device_id}/ack", Ack(max(round_id, 0), content_hash, ok, name, extra).to_json())]


def _num(cfg: ConfigRecord, keys: tuple[str, ...], default, kind: type):
    for k in keys:
        if k in cfg:
            v = cfg[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
                raise ValueError(f"config {k!r}: expected {kind.__name__}, got {v!r}")
            return kind(v)
    return default


# --- the Grid ------------------------------------------------------------------------------------------------
