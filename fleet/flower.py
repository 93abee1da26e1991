"""Flower 1.42 on a TinyFleet fleet: a ``flwr.serverapp.Grid`` whose nodes are our MQTT devices, and a strategy
wrapper that lets any stock Flower strategy aggregate sparse int8 deltas.

Three layers, top to bottom:

- :class:`FleetGrid` — the ``Grid`` a ServerApp (or ``Strategy.start``) talks to. Every call becomes an event
  or a query on a :class:`Link` (``fleet.flower_app`` has an MQTT link and an in-memory one).
- :class:`GridCore` — sans-I/O, the same ``handle(event) -> outputs`` shape as ``fleet.coordinator.Coordinator``
  so ``fleet.mqtt.CoordinatorLink`` can drive it unchanged. It turns a Flower train ``Message`` into our model
  update + ``task``; one push of train messages is one round of ``fleet.round.RoundMachine``, which judges each
  delta by the coordinator's own rules (dedup, replayed counter, stale base, plan, samples, deadline), and the
  hello/status rule is the registry's (``Registry.receive``), as for the coordinator. An accepted delta becomes
  ``Message(RecordDict, reply_to=...)``; a device that goes offline, misses the
  deadline or sends a refused delta gets ``Message(Error, reply_to=...)``.
- Records (pure): the model as Flower sees it is an ``ArrayRecord`` of float64 arrays holding the **integer
  values** of the plan's shared trainable tensors (int8 weight units, int32 bias units), keyed by tensor name.
  Float64 holds every int32 exactly, so a FedAvg of dense replies equals ``fleet.aggregate.fedavg`` except
  at exact .5 ties, where Flower's float weighting may land one ulp low and round one unit down.
  Aggregated floats go back to integers by ``floor(x + 0.5)`` (round half up, as ``aggregate.to_int_delta``),
  clamped to [-127, 127] (int8) or the int32 range; NaN/Inf are refused.

It refuses what our devices cannot do: evaluate messages (devices only train; use ``evaluate_fn`` on the
server) and two tasks for one device in one push are answered with an ``Error`` reply at once. It keeps no
store: a restarted ServerApp starts a new Flower run (crash-resume is the native coordinator's job).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from device_agent.engine.ir import DTYPE_NUMPY
from device_agent.wire.messages import Ack, MessageError, Publish, Task
from fleet import aggregate as agg
from fleet import round as rnd
from fleet.coordinator import Boot, CodecError, Received, Tick, WireCodec, plan_sram
from fleet.registry import Registry

ARRAYS, METRICS, CONFIG, META = "arrays", "metrics", "config", "tinyfleet"
NUM_EXAMPLES = "num-examples"


class GridErrorCode:
    """``Error.code`` of the replies this grid makes up (100+ so they never clash with ``flwr`` ErrorCode)."""

    TIMEOUT = 101  # no delta before the deadline (the task's TTL or send_and_receive's timeout)
    OFFLINE = 102  # the device's Last Will (or an offline status) arrived while it owed a delta
    REJECTED = 103  # the device's delta was refused (reason names the rule: stale_base, replayed_counter...)
    UNKNOWN_NODE = 104  # dst_node_id is not a registered, eligible device
    UNSUPPORTED = 105  # a message type devices cannot run (evaluate, query)
    BAD_CONTENT = 106  # the instruction's records do not fit the plan (array names, shapes, config types)


# --- node ids and records (pure) -----------------------------------------------------------------------------


def node_id(device_id: str) -> int:
    """The stable Flower node id of a device: the first 8 bytes of sha256(device id) as an int in [2, 2**63)."""
    v = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "little") & (2**63 - 1)
    return v if v > SUPERLINK_NODE_ID else v + 2


def shared_tensors(plan) -> list:
    """The plan's shared (uploaded, downloaded) trainable tensors in id order; names must be unique."""
    ts = sorted((t for t in plan.trainable if not t.personal), key=lambda t: t.id)
    names = [t.name for t in ts]
    if len(set(names)) != len(names):
        raise ValueError(f"plan {plan.name}: shared trainable tensor names are not unique: {names}")
    return ts


def arrays_from_state(plan, state: dict[int, np.ndarray]) -> ArrayRecord:
    """Integer model state (tensor id -> int8/int32) -> ArrayRecord of float64 arrays, keyed by tensor name."""
    return ArrayRecord({t.name: Array(np.asarray(state[t.id], np.float64).reshape(t.shape))
                        for t in shared_tensors(plan)})


def initial_arrays(plan) -> ArrayRecord:
    """The plan's own values (model version 1) as the ServerApp's ``initial_arrays``."""
    return arrays_from_state(plan, {t.id: np.asarray(t.data) for t in shared_tensors(plan)})


def state_from_arrays(plan, arrays: ArrayRecord) -> dict[int, np.ndarray]:
    """Float arrays (integer units) -> int state: ``floor(x + 0.5)``, clamped to the tensor's integer range.

    Raises ValueError naming the tensor when names or shapes differ from the plan, or values are not finite.
    """
    ts = shared_tensors(plan)
    want, got = {t.name for t in ts}, set(arrays.keys())
    if want != got:
        raise ValueError(f"ArrayRecord names {sorted(got)} != the plan's shared trainable tensors {sorted(want)}")
    out = {}
    for t in ts:
        x = np.asarray(arrays[t.name].numpy(), np.float64)
        if x.size != t.numel:
            raise ValueError(f"array {t.name!r}: {t.numel} values expected (shape {t.shape}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"array {t.name!r}: NaN or Inf after aggregation")
        zero = np.zeros(t.shape, DTYPE_NUMPY[t.dtype])
        out[t.id] = agg.apply_int_delta(zero, np.floor(x.reshape(t.shape) + 0.5).astype(np.int64))
    return out


def reply_content(plan, base: dict[int, np.ndarray], values: dict[int, np.ndarray], masks: dict[int, np.ndarray],
                  num_samples: int, device_id: str, round_id: int, payload: bytes) -> RecordDict:
    """One decoded delta as a Flower train reply: the updated tensors (base + delta, dense, float64 integer
    units), ``num-examples`` = the delta's sample count, and the raw delta bytes under ``tinyfleet``."""
    arrays = ArrayRecord({t.name: Array((base[t.id].astype(np.float64) + np.where(masks[t.id], values[t.id], 0))
                                        .reshape(t.shape)) for t in shared_tensors(plan)})
    meta = ConfigRecord({"device-id": device_id, "round-id": round_id, "delta": payload})
    return RecordDict({ARRAYS: arrays, METRICS: MetricRecord({NUM_EXAMPLES: int(num_samples)}), META: meta})


# --- the sans-I/O core -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Push:
    """Instruction messages, their ``message_id`` already set by :meth:`FleetGrid.push_messages`."""

    messages: tuple[Message, ...]


@dataclass
class GridConfig:
    lr: float = 0.05  # defaults for a ConfigRecord that does not say
    local_steps: int = 10
    batch_size: int = 1
    deadline_s: float = 60.0  # a task's deadline is min(this, the message's TTL)


@dataclass
class _Pending:
    message: Message
    device_id: str
    round_id: int
    base_hash: str
    deadline: float


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

    def __post_init__(self):
        self.codec = self.codec or WireCodec(self.plan)
        self.shared = shared_tensors(self.plan)
        self.min_sram = plan_sram(self.plan)
        self.version, self.state = 0, {}
        self.hash, self.model_payload = "", b""
        self._set_model({t.id: np.asarray(t.data).astype(DTYPE_NUMPY[t.dtype]).reshape(t.shape)
                         for t in self.shared})
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
            return []
        if isinstance(event, Boot):
            return [Publish(f"plan/{self.codec.plan_hash}", self.codec.plan_bytes(), retain=True),
                    Publish("model/current", self.model_payload, retain=True)]
        raise TypeError(f"unknown grid event {type(event).__name__}")

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
            self.owing[device] = mid
            tasks[device] = task
        if tasks:  # the round: every device with a task must deliver; the machine's deadline is the latest one
            m = self.machine
            m.config = rnd.RoundConfig(goal=len(tasks), over_selection=1.0, quorum=1 / len(tasks),
                                       deadline_s=max(t.deadline for t in tasks.values()) - now)
            m.handle(rnd.StartRound(round_id, self.version, self.hash, now))
            m.handle(rnd.Eligible(tuple(tasks), now))
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
        try:
            task = Task(round_id, self.codec.plan_hash, self.version, self.hash, lr, steps, batch, deadline)
            task.to_json()  # the schema check: lr > 0, 1 <= steps <= 10**6, 1 <= batch <= 4096
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
        if ctl.lost:
            self._lost(ev.device_id, now, f"{ev.device_id} went offline (Last Will)")
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
                                            up.device_id, up.round_id, ev.payload)
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
        return [Publish(f"dev/{device_id}/ack", Ack(max(round_id, 0), content_hash, ok, name).to_json())]


def _num(cfg: ConfigRecord, keys: tuple[str, ...], default, kind: type):
    for k in keys:
        if k in cfg:
            v = cfg[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
                raise ValueError(f"config {k!r}: expected {kind.__name__}, got {v!r}")
            return kind(v)
    return default


# --- the Grid ------------------------------------------------------------------------------------------------


class Link(Protocol):
    """What :class:`FleetGrid` needs from a transport (``fleet.mqtt.CoordinatorLink`` fits as it is)."""

    def submit(self, event: object) -> None: ...  # handle(event) on the core, publish its outputs

    def call(self, fn: Callable[[Any], Any], timeout: float = 30.0) -> Any: ...  # fn(core) on the core's thread


class FleetGrid(Grid):
    """A Flower ``Grid`` over a TinyFleet fleet. Outside ``flwr run`` (tests, scripts) it sets Flower's task
    identity (run id, SuperLink node id) itself, since ``Message(...)`` needs one."""

    def __init__(self, link: Link, run_id: int = 1, pull_interval: float = 0.05):
        self.link, self.pull_interval = link, pull_interval
        self._run = Run.create_empty(run_id)
        try:
            TaskIdentity.run_id  # noqa: B018  set by flwr when running under a SuperLink
        except RuntimeError:
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be a flwr Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.link.call(lambda core: core.node_ids()))

    def device_ids(self) -> dict[int, str]:
        """Node id -> device id (ours, not Flower's API: for logs and tests)."""
        return self.link.call(lambda core: core.node_ids())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = tuple(messages)
        for m in msgs:
            md = m.metadata
            if md.reply_to_message_id or md.ttl <= 0:
                raise ValueError(f"not an instruction message: {md}")
            md.__dict__["_message_id"] = uuid.uuid4().hex  # NOTE: what Flower's own grids do (no public setter)
        self.link.submit(Push(msgs))
        return [m.metadata.message_id for m in msgs]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        ids = list(message_ids)
        return self.link.call(lambda core: core.pull(ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every instruction has a reply; at ``timeout`` the missing ones get an Error
        reply (``GridErrorCode.TIMEOUT``), so the result always has one reply per message."""
        ids = list(self.push_messages(messages))
        waiting, out = set(ids), []
        end = None if timeout is None else time.monotonic() + timeout
        while waiting:
            got = list(self.pull_messages(waiting))
            out += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.pull_interval)
        if waiting:
            left = list(waiting)
            out += self.link.call(lambda core: core.expire(left, f"no reply within send_and_receive's {timeout} s"))
        return out


# --- the strategy wrapper ------------------------------------------------------------------------------------


class SparseDeltaStrategy(Strategy):
    """Wrap any stock Flower strategy (FedAvg, FedProx, Krum, DP wrappers...) for a TinyFleet plan.

    Replies that carry only the raw delta (``tinyfleet.delta`` bytes, e.g. forwarded by a ClientApp on a
    bridge) are decoded into dense records first; then the inner strategy aggregates; then its float arrays
    become the next integer model (``floor(x + 0.5)``, clamped; see :func:`state_from_arrays`), so the arrays
    sent in the next round are exactly what devices will hold. ``state`` is that integer model.
    """

    def __init__(self, inner: Strategy, plan, codec=None):
        self.inner, self.plan = inner, plan
        self.codec = codec or WireCodec(plan)
        self.state: dict[int, np.ndarray] = state_from_arrays(plan, initial_arrays(plan))
        self._base = self.state

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._base = state_from_arrays(self.plan, arrays)
        return self.inner.configure_train(server_round, arrays_from_state(self.plan, self._base), config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        dense = [self._densify(m) for m in replies]
        arrays, metrics = self.inner.aggregate_train(server_round, dense)
        if arrays is None:
            return None, metrics
        self.state = state_from_arrays(self.plan, arrays)
        return arrays_from_state(self.plan, self.state), metrics

    def _densify(self, m: Message) -> Message:
        if m.has_error() or m.content.array_records or META not in m.content.config_records:
            return m
        payload = bytes(m.content.config_records[META]["delta"])  # type: ignore[arg-type]
        d = self.codec.decode_delta(payload, hashlib.sha256(payload).hexdigest())
        up = d.header
        content = reply_content(self.plan, self._base, d.values, d.masks, up.num_samples, up.device_id,
                                up.round_id, payload)
        return _with_content(m, content)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


def _with_content(m: Message, content: RecordDict) -> Message:
    """The same reply (metadata kept) with dense content in place of the raw delta."""
    return Message(metadata=m.metadata, content=content)  # type: ignore[call-overload]
