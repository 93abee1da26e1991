"""The coordinator: registry + round machine + aggregation + store behind one ``handle(event) -> outputs`` call.

Sans-I/O: events are parsed-topic + payload bytes (or control ticks), outputs are publish intents with their
topic and retain flag; time comes from the injected ``clock``. The only side effect is the injected
:class:`~fleet.store.Store`, written before any output that depends on it is returned (write-ahead), so the
MQTT adapter may acknowledge an inbound message once ``handle`` returns. ``handle_many`` does the same for a
batch of events in one store transaction (group commit: one fsync per batch instead of per delta); the adapter
acknowledges the batch's messages once it returns. If either raises (store failure), discard the object and build
a new one from the same store: it resumes where the last committed transaction left off.
Each accepted delta is decoded once, on arrival, and folded into the open round's running sums (or kept, for the
robust aggregators that need every value), so committing does not re-read the store; a restarted coordinator
rebuilds that from the stored rows. It refuses to decode binary formats itself (an injected :class:`Codec` does)
and to aggregate (``aggregate``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from device_agent.engine.ir import DTYPE_NUMPY
from device_agent.wire.delta import delta_from_bytes, delta_to_flat, shared_layout
from device_agent.wire.errors import WireFormatError
from device_agent.wire.messages import Ack, Hello, MessageError, Publish, Task, parse
from device_agent.wire.plan import plan_hash, plan_to_bytes
from device_agent.wire.update import update_from_state, update_from_states, update_hash
from fleet import aggregate as agg
from fleet import round as rnd
from fleet.ratelimit import Buckets, RateLimit
from fleet.registry import Registry
from fleet.security.dp import DPConfig, RDPAccountant, dp_mean, round_rng, support_units
from fleet.store import DeltaRow, Store

# --- what the coordinator needs from the binary formats (device_agent.wire), as an interface -----------------


@dataclass(frozen=True)
class DecodedDelta:
    """A delta payload after the wire reader accepted it. ``values``/``masks`` are per shared trainable tensor
    id, full tensor shape: integer weight-unit differences and the coordinates this device actually sent."""

    header: rnd.Upload
    values: dict[int, np.ndarray]  # tensor id -> int64, tensor shape
    masks: dict[int, np.ndarray]  # tensor id -> bool, tensor shape


class CodecError(ValueError):
    """A payload the wire reader refused; ``code`` is its WireError number."""

    def __init__(self, code: int, detail: str):
        super().__init__(f"wire error {code}: {detail}")
        self.code, self.detail = code, detail


class Codec(Protocol):
    plan_hash: str  # hex

    def plan_bytes(self) -> bytes: ...

    def decode_delta(self, payload: bytes, content_hash: str) -> DecodedDelta: ...  # raises CodecError

    def encode_update(self, base_version: int, new_version: int, state: dict[int, np.ndarray]) -> bytes: ...

    def update_hash(self, payload: bytes) -> str: ...  # hex identity of a model version (a delta's base_hash)

    # optional: ``encode_diff(base_version, new_version, old_state, new_state) -> bytes``, the DIFF form of the
    # same version (same update_hash); see :func:`encode_diff`


def encode_diff(codec, base_version: int, new_version: int, old: dict[int, np.ndarray],
                new: dict[int, np.ndarray]) -> bytes | None:
    """The DIFF form of model ``new_version`` against ``base_version`` (``old``), or None when ``codec`` writes
    only the FULL form (the coordinator then publishes that)."""
    own = getattr(codec, "encode_diff", None)
    if own is not None:
        return own(base_version, new_version, old, new)
    if isinstance(codec, WireCodec):
        # NOTE: a function beside WireCodec rather than its method only because that class is being reworked
        # concurrently; fold it in as ``WireCodec.encode_diff`` afterwards
        upd = update_from_states(codec.plan, old, new, base_version=base_version, new_version=new_version,
                                 plan_hash=bytes.fromhex(codec.plan_hash))
        return upd.to_bytes(codec.signer)
    return None


class WireCodec:
    """:class:`Codec` over ``device_agent.wire``. ``signer`` signs plan and updates; ``verify`` checks deltas."""

    def __init__(self, plan, signer=None, verify=None):
        self.plan, self.signer, self.verify = plan, signer, verify
        self._layout = shared_layout(plan)  # where delta_to_flat puts each shared tensor: computed once
        self._slices = [(t.id, self._layout.slots[t.id][0], t.numel, t.shape) for t in plan.tensors
                        if t.id in self._layout.slots]
        self._hash = plan_hash(plan)
        self.plan_hash = self._hash.hex()
        self._plan_bytes: bytes | None = None

    def plan_bytes(self) -> bytes:
        if self._plan_bytes is None:
            self._plan_bytes = plan_to_bytes(self.plan, self.signer)
        return self._plan_bytes

    def decode_delta(self, payload: bytes, content_hash: str) -> DecodedDelta:
        try:
            d = delta_from_bytes(payload, verify=self.verify)
            header = rnd.Upload(d.device_id, d.round_id, bytes(d.plan_hash).hex(), bytes(d.base_hash).hex(),
                                d.counter, d.sample_count, content_hash)
            if bytes(d.plan_hash) != self._hash:  # a well-formed delta for another plan: the round rejects it
                return DecodedDelta(header, {}, {})
            flat_values, flat_mask = delta_to_flat(d, self.plan, plan_hash=self._hash, layout=self._layout)
        except WireFormatError as e:
            raise CodecError(int(e.code), str(e)) from None
        values = {tid: flat_values[off:off + n].reshape(shape) for tid, off, n, shape in self._slices}
        masks = {tid: flat_mask[off:off + n].reshape(shape) for tid, off, n, shape in self._slices}
        return DecodedDelta(header, values, masks)

    def encode_update(self, base_version: int, new_version: int, state: dict[int, np.ndarray]) -> bytes:
        upd = update_from_state(self.plan, state, base_version=base_version, new_version=new_version,
                                plan_hash=self._hash)
        return upd.to_bytes(self.signer)

    def update_hash(self, payload: bytes) -> str:
        return update_hash(payload).hex()


# --- events and outputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A device message: ``kind`` is the last topic level (hello | status | delta), ``device_id`` the <id> level."""

    kind: str
    device_id: str
    payload: bytes


@dataclass(frozen=True)
class Boot:
    """First event after construction: republish plan and model, resume the open round (re-send its tasks)."""


@dataclass(frozen=True)
class StartRound:
    pass


@dataclass(frozen=True)
class Tick:
    """Check deadlines and heartbeats against ``clock()``."""


@dataclass(frozen=True)
class Verdict:
    """Informational (no topic): what happened to one delta. ``reason`` is a Reject name, ok or duplicate."""

    device_id: str
    round_id: int
    reason: str
    code: int = 0  # Reject value (0 = accepted or duplicate); for MALFORMED, ``detail`` holds the WireError
    detail: str = ""


@dataclass(frozen=True)
class Dropped:
    """Informational: a control message that was refused (state unchanged)."""

    device_id: str
    kind: str
    detail: str


@dataclass(frozen=True)
class RoundClosed:
    """Informational: a round ended; ``version`` is the new model version when committed."""

    round_id: int
    committed: bool
    version: int
    accepted: tuple[str, ...] = ()
    detail: str = ""
    epsilon: float | None = None  # with DP: cumulative epsilon (at the configured delta) after this round


@dataclass(frozen=True)
class RoundRefused:
    """Informational: StartRound was refused and nothing changed (e.g. the privacy budget is spent)."""

    detail: str


Output = Publish | Verdict | Dropped | RoundClosed | RoundRefused


@dataclass
class CoordinatorConfig:
    """The coordinator's policy, derived from a validated fleet config (:meth:`fleet.schema.FleetConfig.
    coordinator_config`); not validated again here."""

    round: rnd.RoundConfig = field(default_factory=rnd.RoundConfig)
    lr: float = 0.05
    local_steps: int = 10
    batch_size: int = 1
    aggregator: str = "fedavg"  # fedavg | clipped | median | trimmed
    clip: float = 0.0  # L2 clip norm (integer weight units) for "clipped"
    trim: float = 0.1  # fraction trimmed at each end for "trimmed"
    min_sram: int = 0  # 0: the plan's own need (arena + trainable bytes)
    require_plan: bool = False  # only devices that already hold the plan are eligible
    heartbeat_timeout: float = 0.0  # seconds of silence before a device counts as offline (0 = Last Will only)
    topk_permille: int = 0  # sent in every task: devices upload the top k = ceil(numel * permille / 1000) per
    #                        tensor (error feedback keeps the rest for later rounds); 0 = every coordinate
    dp: DPConfig | None = None  # central DP: clip each delta, add Gaussian noise to the sum, account epsilon
    control_limit: RateLimit = field(default_factory=lambda: RateLimit(2.0, 20.0))  # hello+status per device/s
    delta_limit: RateLimit = field(default_factory=lambda: RateLimit(1.0, 10.0))  # deltas per device/s (0: off)


def plan_sram(plan) -> int:
    """Bytes a board needs to train ``plan``: the arena plus the trainable tensors held in SRAM."""
    return int(plan.arena_bytes) + sum(t.nbytes for t in plan.trainable)


class RoundDeltas:
    """One round's accepted deltas, decoded once: running FedAvg sums, plus every row if the aggregator needs them.

    ``hashes`` (device -> content hash) says exactly which deltas are in, so the coordinator can tell whether this
    equals what the store holds for the round before trusting it.
    """

    def __init__(self, round_id: int, size: int, keep_rows: bool):
        self.round_id = round_id
        self.hashes: dict[str, str] = {}
        self.sums = agg.RunningSums(size)
        self.rows: dict[str, tuple[np.ndarray, np.ndarray, int]] | None = {} if keep_rows else None

    def add(self, device_id: str, content_hash: str, values: np.ndarray, mask: np.ndarray, weight: int) -> None:
        if device_id in self.hashes:
            raise ValueError(f"round {self.round_id}: {device_id} already counted")  # the machine never allows it
        self.sums.add(values, mask, weight)
        self.hashes[device_id] = content_hash
        if self.rows is not None:
            self.rows[device_id] = (values, mask, weight)

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``values, masks, weights`` sorted by device id, as :meth:`Coordinator.stacked` reads them back."""
        if self.rows is None:
            raise ValueError("rows were not kept (FedAvg needs only the running sums)")
        rows = [self.rows[d] for d in sorted(self.rows)]
        return (np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
                np.array([r[2] for r in rows], np.int64))


class Coordinator:
    """One fleet, one plan. Build with a store (fresh or from a previous run), then ``handle(Boot())``."""

    def __init__(self, plan, store: Store, config: CoordinatorConfig, clock, codec: Codec):
        self.plan, self.store, self.config, self.clock, self.codec = plan, store, config, clock, codec
        self.shared = [t for t in plan.trainable if not t.personal]  # what devices upload and download
        self.size = sum(t.numel for t in self.shared)  # coordinates of the flat delta vector
        self.round_deltas: RoundDeltas | None = None  # the open round's accepted deltas, decoded
        self.min_sram = config.min_sram or plan_sram(plan)
        self.registry = Registry(config.heartbeat_timeout)
        self.limits = {"control": Buckets(config.control_limit), "delta": Buckets(config.delta_limit)}
        self.machine = rnd.RoundMachine(config.round, codec.plan_hash)
        store.bind_plan(codec.plan_hash)
        self.keep_rows = config.aggregator != "fedavg" or config.dp is not None
        self.accountant: RDPAccountant | None = None
        if config.dp is not None:  # spent rounds are committed with the model, so a restart resumes the budget
            spent = store.meta("dp_accountant")
            self.accountant = (RDPAccountant.from_json(spent) if spent is not None
                               else RDPAccountant(config.dp.delta, config.dp.epsilon_budget))
            self.accountant.budget = config.dp.epsilon_budget  # the budget is policy: the config's wins
            self.dp_secret = store.secret("dp_noise")
            self.dp_units = support_units(plan) if config.dp.units == "real" else None
        initial = {t.id: np.asarray(t.data).astype(_np_dtype(t)).reshape(t.shape) for t in self.shared}
        first = codec.update_hash(codec.encode_update(0, 1, initial))
        row = store.init_model(1, first, self._pack(initial))  # version 1 = the plan's values (0 = "none")
        self.version, self.hash, self.state = row.version, row.hash, self._unpack(row.state)
        self.model_payload: bytes | None = None  # what model/current carries (DIFF against version - 1 if it can)
        self.model_base: int | None = None  # the version that payload is a DIFF against; None: FULL form
        self._full: tuple[int, bytes] | None = None  # (version, its FULL form) for devices that lag behind
        self.full_sent: dict[str, int] = {}  # device -> version whose FULL form it was sent (reset by its hello)
        for device_id, hello_json, _ in store.devices():
            if hello_json != "{}":
                self.registry.on_hello(parse(hello_json.encode(), Hello), 0.0)  # type: ignore[arg-type]
                self.registry.mark_offline(device_id)  # online again at its next hello/status
        last = store.last_round()
        if last is not None:
            self.machine.restore(last[2], store.accepted_hashes(last[0]), store.counters())
            if self.machine.state in (*_COLLECTING, rnd.RoundState.COMMITTING):
                self.round_deltas = self._reload(last[0])  # restart cost: decode the round's stored deltas once

    # --- state packing (the store's blob: tensors' raw bytes in id order) ------------------------------------

    def _pack(self, state: dict[int, np.ndarray]) -> bytes:
        return b"".join(np.ascontiguousarray(state[t.id]).astype(state[t.id].dtype.newbyteorder("<")).tobytes()
                        for t in self.shared)

    def _unpack(self, blob: bytes) -> dict[int, np.ndarray]:
        out, pos = {}, 0
        for t in self.shared:
            dt = np.dtype(_np_dtype(t)).newbyteorder("<")
            n = t.numel * dt.itemsize
            out[t.id] = np.frombuffer(blob[pos:pos + n], dt).astype(_np_dtype(t)).reshape(t.shape)
            pos += n
        if pos != len(blob):
            raise ValueError(f"stored model has {len(blob)} bytes, the plan's shared tensors need {pos}")
        return out

    # --- the one entry point -------------------------------------------------------------------------------

    def handle_many(self, events: Iterable[object]) -> list[Output]:
        """``handle`` each event in order, all in one store transaction; the outputs of all, once it committed.

        Same outputs and same stored state as calling ``handle`` on each, but one fsync for the batch. Nothing of
        the batch is durable, and no output leaves, until this returns: acknowledge the batch's inbound messages
        after it returns. If it raises, none of the batch happened (rebuild from the store and redeliver).
        """
        out: list[Output] = []
        with self.store.batch():
            for event in events:
                out += self.handle(event)
        return out

    def handle(self, event: object) -> list[Output]:
        now = float(self.clock())
        if isinstance(event, Received):
            return self._received(event, now)
        if isinstance(event, Tick):
            out: list[Output] = []
            for d in self.registry.expire(now):
                out += self._machine(rnd.DeviceLost(d, now), now)
            return out + self._machine(rnd.Tick(now), now)
        if isinstance(event, StartRound):
            return self._start(now)
        if isinstance(event, Boot):
            return self._boot(now)
        raise TypeError(f"unknown coordinator event {type(event).__name__}")

    def _boot(self, now: float) -> list[Output]:
        out: list[Output] = [Publish(f"plan/{self.codec.plan_hash}", self.codec.plan_bytes(), retain=True),
                             self._model_output()]
        m = self.machine
        if m.state in (rnd.RoundState.COMMITTING, rnd.RoundState.ABANDONED):
            pending = (rnd.Commit(m.round_id, tuple(sorted(m.accepted))) if m.state == rnd.RoundState.COMMITTING
                       else rnd.Abandon(m.round_id, "resumed after restart"))
            return out + self._close(pending, now)
        if m.state in (rnd.RoundState.TRAINING, rnd.RoundState.COLLECTING):
            waiting = tuple(d for d in m.selected if d not in m.accepted and d not in m.lost)
            out += self._tasks(rnd.Dispatch(m.round_id, waiting, m.deadline))
        elif m.state == rnd.RoundState.SELECTING:  # never persisted in this state; kept for completeness
            out += self._machine(rnd.Eligible(tuple(self._eligible()), now), now)
        return out

    def _eligible(self) -> list[str]:
        return self.registry.eligible(self.min_sram, self.codec.plan_hash if self.config.require_plan else None)

    def _start(self, now: float) -> list[Output]:
        m = self.machine
        acc, dp = self.accountant, self.config.dp
        if acc is not None and dp is not None and acc.budget is not None:
            after = acc.preview(1.0, dp.noise_multiplier)  # NOTE: q = 1: selection is public, no amplification
            if after > acc.budget:
                return [RoundRefused(f"privacy budget spent: another round would reach epsilon {after:.3g} > "
                                     f"budget {acc.budget:.3g} (delta {dp.delta:g}) after {len(acc.rounds)} rounds")]
        m.handle(rnd.StartRound(m.round_id + 1, self.version, self.hash, now))
        return self._machine(rnd.Eligible(tuple(self._eligible()), now), now)

    def _received(self, ev: Received, now: float) -> list[Output]:
        kind = "delta" if ev.kind == "delta" else "control"
        if not self.limits[kind].allow(ev.device_id, now):  # NOTE: before any decoding: a flood costs nothing
            lim = self.limits[kind].limit
            return [Dropped(ev.device_id, ev.kind, f"rate limited: {kind} messages above {lim.rate:g}/s "
                                                   f"(burst {lim.burst:g}) from this device")]
        if ev.kind == "delta":
            return self._delta(ev, now)
        if ev.kind not in ("hello", "status"):
            return [Dropped(ev.device_id, ev.kind, "devices publish only hello, status and delta")]
        try:
            ctl = self.registry.receive(ev.kind, ev.device_id, ev.payload, now)
        except MessageError as e:
            return [Dropped(ev.device_id, ev.kind, str(e))]
        msg = ctl.message
        if isinstance(msg, Hello):
            self.store.save_device(msg.device_id, ev.payload.decode())
            self.full_sent.pop(msg.device_id, None)  # a (re)started device may have lost what it was sent
            return self._machine(rnd.Rejoined(msg.device_id, now), now)  # ... incl. its task of the open round
        if msg.state == "offline":
            return self._machine(rnd.DeviceLost(msg.device_id, now), now) if ctl.lost else []
        return self._catch_up(msg.device_id, msg.model_version)

    def _catch_up(self, device_id: str, held: int) -> list[Output]:
        """The FULL form on ``dev/<id>/model`` for a device whose held version ``model/current`` cannot update:
        older than the current version and not the base of its DIFF. Once per device and version (until its next
        hello): a status sent before the FULL arrived must not fetch it twice."""
        if held >= self.version or held == self.model_base or self.model_base is None:
            return []
        if self.full_sent.get(device_id) == self.version:
            return []
        self.full_sent[device_id] = self.version
        return [Publish(f"dev/{device_id}/model", self._full_payload())]

    def _full_payload(self) -> bytes:
        if self._full is None or self._full[0] != self.version:
            self._full = (self.version, self.codec.encode_update(self.version - 1, self.version, self.state))
        return self._full[1]

    def _delta(self, ev: Received, now: float) -> list[Output]:
        content_hash = hashlib.sha256(ev.payload).hexdigest()
        m = self.machine
        if m.accepted.get(ev.device_id) == content_hash:  # QoS 1 redelivery of a counted delta: same bytes, same
            return self._verdict(ev.device_id, m.round_id, content_hash, None, "")  # verdict, no need to decode
        try:
            decoded = self.codec.decode_delta(ev.payload, content_hash)
        except CodecError as e:
            return self._verdict(ev.device_id, m.round_id, content_hash, rnd.Reject.MALFORMED,
                                 f"WireError {e.code}: {e.detail}")
        up = decoded.header
        if up.device_id != ev.device_id:
            return self._verdict(ev.device_id, up.round_id, content_hash, rnd.Reject.WRONG_DEVICE,
                                 f"payload says {up.device_id!r}")
        if up.round_id != m.round_id and self.store.has_delta(up.round_id, up.device_id, content_hash):
            return self._verdict(ev.device_id, up.round_id, content_hash, None, "")  # redelivered, old round
        out: list[Output] = []
        for cmd in m.handle(rnd.DeltaArrived(up, now)):
            if isinstance(cmd, rnd.Accepted):
                self.store.accept_delta(DeltaRow(up.round_id, up.device_id, content_hash, up.counter,
                                                 up.num_samples, ev.payload), m.state.value)
                self._count(up, decoded)
                out += self._verdict(up.device_id, up.round_id, content_hash, None, "ok", accepted=True)
            elif isinstance(cmd, rnd.Duplicate):
                out += self._verdict(up.device_id, up.round_id, content_hash, None, "")
            elif isinstance(cmd, rnd.Rejected):
                out += self._verdict(up.device_id, up.round_id, content_hash, cmd.reason, cmd.detail)
            else:
                out += self._close(cmd, now)
        return out

    def _verdict(self, device_id: str, round_id: int, content_hash: str, reason: rnd.Reject | None, detail: str,
                 accepted: bool = False) -> list[Output]:
        name = "ok" if accepted else "duplicate" if reason is None else reason.name.lower()
        ack = Ack(max(round_id, 0), content_hash, accepted or reason is None, name)
        return [Publish(f"dev/{device_id}/ack", ack.to_json()),
                Verdict(device_id, round_id, name, int(reason or 0), detail)]

    def _machine(self, event: object, now: float) -> list[Output]:
        """Feed the round machine; persist its new state and turn its commands into outputs."""
        before = self.machine.fingerprint()
        cmds = self.machine.handle(event)
        out: list[Output] = []
        if self.machine.fingerprint() != before and self.machine.state != rnd.RoundState.SELECTING:
            self.store.save_round(self.machine.snapshot())
        for cmd in cmds:
            if isinstance(cmd, rnd.Dispatch):
                out += self._tasks(cmd)
            elif isinstance(cmd, (rnd.Commit, rnd.Abandon)):
                out += self._close(cmd, now)
        return out

    def _tasks(self, d: rnd.Dispatch) -> list[Output]:
        c = self.config
        task = Task(d.round_id, self.codec.plan_hash, self.version, self.hash, c.lr, c.local_steps, c.batch_size,
                    d.deadline, c.topk_permille).to_json()
        return [Publish(f"dev/{dev}/task", task) for dev in d.device_ids]

    # --- closing a round: aggregate from the store, persist, publish ------------------------------------------

    def _close(self, cmd: rnd.Commit | rnd.Abandon, now: float) -> list[Output]:
        m = self.machine
        if isinstance(cmd, rnd.Abandon):
            m.handle(rnd.Closed(now))
            self.store.abandon_round(m.snapshot(), cmd.reason)
            self.round_deltas = None
            return [RoundClosed(cmd.round_id, False, self.version, tuple(sorted(m.accepted)), cmd.reason)]
        new_state = self.aggregate(cmd.round_id)
        base, payload = self._encode_model(self.version, self.state, self.version + 1, new_state)
        new_hash = self.codec.update_hash(payload)
        meta, epsilon = {}, None
        if self.accountant is not None and self.config.dp is not None:
            spent = RDPAccountant.from_json(self.accountant.to_json())  # spend a copy: the store decides
            spent.budget = None  # NOTE: checked when the round started; the noise is already in the model
            epsilon = spent.spend(1.0, self.config.dp.noise_multiplier).epsilon
            meta["dp_accountant"] = spent.to_json()
        m.handle(rnd.Closed(now))
        self.store.commit_round(m.snapshot(), self.version + 1, new_hash, self._pack(new_state), meta)
        if meta:  # committed: the copy is now the accountant of record
            spent.budget, self.accountant = self.config.dp.epsilon_budget, spent
        self.version, self.hash, self.state = self.version + 1, new_hash, new_state
        self.model_base, self.model_payload = base, payload
        self.round_deltas = None
        return [Publish("model/current", payload, retain=True),
                RoundClosed(cmd.round_id, True, self.version, tuple(sorted(m.accepted)), epsilon=epsilon)]

    def _encode_model(self, old_version: int, old_state: dict[int, np.ndarray] | None, version: int,
                      state: dict[int, np.ndarray]) -> tuple[int | None, bytes]:
        """``(base, payload)`` of model/current for ``version``: the DIFF against ``old_version`` when there is
        one to diff against and the codec writes it, else the FULL form (``base`` None). Deterministic, so a
        restarted coordinator republishes the same bytes."""
        if old_version >= 1 and old_state is not None:
            diff = encode_diff(self.codec, old_version, version, old_state, state)
            if diff is not None:
                return old_version, diff
        return None, self.codec.encode_update(version - 1, version, state)

    def _model_output(self) -> Publish:
        """The current version as published after a commit (DIFF against the previous version): same bytes."""
        if self.model_payload is None:
            prev = self.store.version(self.version - 1) if self.version > 1 else None
            old = self._unpack(prev.state) if prev is not None else None
            self.model_base, self.model_payload = self._encode_model(self.version - 1, old, self.version,
                                                                     self.state)
        return Publish("model/current", self.model_payload, retain=True)

    # --- the round's accepted deltas: decoded once on arrival, re-read from the store only after a restart ------

    def _flat(self, decoded: DecodedDelta) -> tuple[np.ndarray, np.ndarray]:
        vals = np.concatenate([decoded.values[t.id].reshape(-1) for t in self.shared]).astype(np.int64, copy=False)
        mask = np.concatenate([decoded.masks[t.id].reshape(-1) for t in self.shared]).astype(bool, copy=False)
        return vals, mask

    def _count(self, up: rnd.Upload, decoded: DecodedDelta) -> None:
        """Fold an accepted (already stored) delta into the open round's sums."""
        rd = self.round_deltas
        if rd is None or rd.round_id != up.round_id:
            rd = self.round_deltas = RoundDeltas(up.round_id, self.size, self.keep_rows)
        rd.add(up.device_id, up.content_hash, *self._flat(decoded), up.num_samples)

    def _reload(self, round_id: int) -> RoundDeltas:
        """The round's accepted deltas as stored, decoded again (restart, or anything in doubt)."""
        rd = RoundDeltas(round_id, self.size, self.keep_rows)
        for r in self.store.deltas(round_id):
            rd.add(r.device_id, r.content_hash, *self._flat(self.codec.decode_delta(r.payload, r.content_hash)),
                   r.num_samples)
        return rd

    def stacked(self, round_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The round's accepted deltas from the store, flat and sorted by device: ``values, masks, weights``."""
        rows = self.store.deltas(round_id)
        flat = [self._flat(self.codec.decode_delta(r.payload, r.content_hash)) for r in rows]
        weights = np.array([r.num_samples for r in rows], np.int64)
        return np.stack([f[0] for f in flat]), np.stack([f[1] for f in flat]), weights

    def aggregate(self, round_id: int) -> dict[int, np.ndarray]:
        """The model after applying the round's accepted deltas (pure given the store's rows).

        Uses the deltas decoded on arrival when they are exactly the round's stored ones, else decodes the store's.
        """
        c = self.config
        rd = self.round_deltas
        if rd is None or rd.round_id != round_id or rd.hashes != self.store.accepted_hashes(round_id):
            rd = self._reload(round_id)
        if c.dp is not None:
            values, masks, _ = rd.stacked()  # NOTE: equal weights: sample counts would scale a device's sensitivity
            mean = dp_mean(values, masks, clip=c.dp.clip, noise_multiplier=c.dp.noise_multiplier,
                           denominator=c.round.goal, rng=round_rng(self.dp_secret, round_id), units=self.dp_units)
        elif c.aggregator == "fedavg":
            mean = rd.sums.mean()
        else:
            mean = agg.aggregate(c.aggregator, *rd.stacked(), clip=c.clip, beta=c.trim)
        delta = agg.to_int_delta(mean)
        out, pos = {}, 0
        for t in self.shared:
            out[t.id] = agg.apply_int_delta(self.state[t.id], delta[pos:pos + t.numel])
            pos += t.numel
        return out


_COLLECTING = (rnd.RoundState.TRAINING, rnd.RoundState.COLLECTING)


def _np_dtype(t) -> type:
    return DTYPE_NUMPY[t.dtype]
