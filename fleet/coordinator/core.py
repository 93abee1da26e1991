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
rebuilds that from the stored rows. With ``secure_aggregation`` a round's collection is the masked stages of
:mod:`fleet.coordinator.secagg_round` instead (plain deltas are refused; a restart abandons the masked round). It refuses to decode binary formats itself (an injected :class:`Codec` does)
and to aggregate (``aggregate``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from device_agent.engine.ir import DTYPE_NUMPY
from device_agent.wire.messages import Ack, Hello, MessageError, PlanIndex, Publish, ack_detail, parse
from fleet import round as rnd
from fleet.coordinator.codec import Codec
from fleet.coordinator.deltas import DeltaBook, RoundDeltas
from fleet.coordinator.events import (
    Boot,
    Claimed,
    CoordinatorConfig,
    DeviceFailed,
    Dropped,
    Output,
    Received,
    RoundClosed,
    RoundRefused,
    StartRound,
    Tick,
    Unfit,
    plan_sram,
)
from fleet.coordinator.publication import Publication
from fleet.coordinator.secagg_round import SecureRounds
from fleet.ratelimit import Buckets
from fleet.registry import Registry
from fleet.security.dp import RDPAccountant, support_units
from fleet.store import Store


class Coordinator(Publication, DeltaBook, SecureRounds):
    """One fleet, one plan. Build with a store (fresh or from a previous run), then ``handle(Boot())``."""

    def __init__(self, plan, store: Store, config: CoordinatorConfig, clock, codec: Codec):
        self.plan, self.store, self.config, self.clock, self.codec = plan, store, config, clock, codec
        self.shared = [t for t in plan.trainable if not t.personal]  # what devices upload and download
        self.size = sum(t.numel for t in self.shared)  # coordinates of the flat delta vector
        self.round_deltas: RoundDeltas | None = None  # the open round's accepted deltas, decoded
        needs = getattr(codec, "needs", None)  # a plan family (FamilyCodec): what each member's devices need
        if needs and len(needs) > 1 and (config.mode != "sync" or config.secure_aggregation is not None):
            raise ValueError("a plan family (nested plans) runs in sync rounds without secure aggregation: the async "
                             "machine and masking assume one support")
        self.min_sram = config.min_sram or (min(needs.values()) if needs else plan_sram(plan))
        self.registry = Registry(config.heartbeat_timeout)
        self.limits = {"control": Buckets(config.control_limit), "delta": Buckets(config.delta_limit)}
        self.machine = self._new_machine()
        store.bind_plan(codec.plan_hash, config.mode)
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
        self._member_full: dict[str, tuple] = {}  # smaller plan -> ((plan, version), its FULL update)
        self.full_sent: dict[str, int] = {}  # device -> version whose FULL form it was sent (reset by its hello)
        for device_id, hello_json, _ in store.devices():
            if hello_json != "{}":
                self.registry.on_hello(parse(hello_json.encode(), Hello), 0.0)
                self.registry.mark_offline(device_id)  # online again at its next hello/status
        self._resume()

    def __new__(cls, plan, store: Store, config: CoordinatorConfig, clock, codec: Codec):
        if cls is Coordinator and config.mode == "async":  # NOTE: one constructor for both modes (serve, sim)
            from fleet.coordinator.buffered import AsyncCoordinator

            return super().__new__(AsyncCoordinator)
        return super().__new__(cls)

    def _new_machine(self):
        return rnd.RoundMachine(self.config.round, self.codec.plan_hash)

    def _resume(self) -> None:
        """Restore the round machine (and the open round's decoded deltas) from the store."""
        last = self.store.last_round()
        if last is not None:
            self.machine.restore(last[2], self.store.accepted_hashes(last[0]), self.store.counters())
            if self.machine.state in (*_COLLECTING, rnd.RoundState.COMMITTING):
                self.round_deltas = self._reload(last[0])  # restart cost: decode the round's stored deltas once

    def _pack(self, state: dict[int, np.ndarray]) -> bytes:
        return pack_state(self.shared, state)

    def _unpack(self, blob: bytes) -> dict[int, np.ndarray]:
        return unpack_state(self.shared, blob)


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
        if isinstance(event, Claimed):  # a delta an aggregation worker read (fleet/coordinator/pool.py)
            return self._refused("delta", event.device_id, now) or self._claimed(event, now)
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
        blobs = getattr(self.codec, "plan_blobs", None)
        plans = blobs() if blobs is not None else {self.codec.plan_hash: self.codec.plan_bytes()}
        out: list[Output] = [*(Publish(f"plan/{h}", b, retain=True) for h, b in plans.items()),
                             self._model_output()]
        needs = getattr(self.codec, "needs", None)
        if needs:  # a family: which plan a device trains is decided by its SRAM (messages.PlanIndex)
            index = PlanIndex(tuple(needs), tuple(needs.values()))
            out.append(Publish("plan/index", index.to_json(), retain=True))
        m = self.machine
        if self.config.secure_aggregation is not None and m.state in _COLLECTING and self.secure is not None:
            return out + self._secure_resume(now)  # the same coordinator after a broker reconnect
        if self.config.secure_aggregation is not None and m.state in (*_COLLECTING, rnd.RoundState.COMMITTING):
            # NOTE: a masked round lives in memory only (keys, shares, masked inputs): abandon it, reveal nothing
            why = "coordinator restarted during a masked round: abandoned, nothing revealed"
            if m.state == rnd.RoundState.COMMITTING:
                return out + self._close(rnd.Abandon(m.round_id, why), now)
            return out + self._machine(rnd.SecureClosed((), why, now), now)
        if m.state in (rnd.RoundState.COMMITTING, rnd.RoundState.ABANDONED):
            pending = (rnd.Commit(m.round_id, tuple(sorted(m.accepted))) if m.state == rnd.RoundState.COMMITTING
                       else rnd.Abandon(m.round_id, "resumed after restart"))
            return out + self._close(pending, now)
        if m.state in (rnd.RoundState.TRAINING, rnd.RoundState.COLLECTING):
            waiting = tuple(d for d in m.selected if d not in m.accepted and d not in m.lost)
            out += self._tasks(rnd.Dispatch(m.round_id, waiting, m.deadline))
        elif m.state == rnd.RoundState.SELECTING:  # never persisted in this state; kept for completeness
            out += self._machine(self._eligible_event(now), now)
        return out

    def _eligible(self) -> list[str]:
        if getattr(self.codec, "assign", None) is None:
            return self.registry.eligible(self.min_sram, self.codec.plan_hash if self.config.require_plan else None)
        out = []
        for d in self.registry.eligible(self.min_sram):
            p = self.plan_of(d)
            if p is not None and (not self.config.require_plan or p in self.registry.devices[d].plan_hashes):
                out.append(d)
        return out

    def plan_of(self, device_id: str) -> str | None:
        """The plan hash ``device_id`` trains: the largest plan of the family that fits the SRAM in its hello
        (one plan: that plan if it fits); None when none fits or the device never said hello."""
        rec = self.registry.devices.get(device_id)
        if rec is None or rec.sram < self.min_sram:
            return None
        assign = getattr(self.codec, "assign", None)
        return self.codec.plan_hash if assign is None else assign(rec.sram)

    def _eligible_event(self, now: float) -> rnd.Eligible:
        ids = tuple(self._eligible())
        if getattr(self.codec, "assign", None) is None:
            return rnd.Eligible(ids, now)
        return rnd.Eligible(ids, now, tuple((d, p) for d in ids
                                                  if (p := self.plan_of(d)) is not None and p != self.codec.plan_hash))

    def _refuse_unfit(self, device_id: str) -> list[Output]:
        """A device whose SRAM is below the smallest plan: an ack it can log (it will never get a task) + Unfit."""
        rec = self.registry.devices[device_id]
        why = (f"no plan fits: this device reports {rec.sram} bytes of SRAM, the smallest plan of this fleet "
               f"needs {self.min_sram} bytes; it will not be asked to train")
        ack = Ack(0, "00", False, "no_plan_fits", ack_detail(why))
        return [Publish(f"dev/{device_id}/ack", ack.to_json()), Unfit(device_id, rec.sram, self.min_sram, why)]

    def _start(self, now: float) -> list[Output]:
        m = self.machine
        acc, dp = self.accountant, self.config.dp
        if acc is not None and dp is not None and acc.budget is not None:
            after = acc.preview(1.0, dp.noise_multiplier, self.skellam_round())  # NOTE: q = 1: public selection
            if after > acc.budget:
                return [RoundRefused(f"privacy budget spent: another round would reach epsilon {after:.3g} > "
                                     f"budget {acc.budget:.3g} (delta {dp.delta:g}) after {len(acc.rounds)} rounds")]
        hashes = getattr(self.codec, "member_hashes", None)
        bases = tuple(sorted(hashes(self.version, self.state).items())) if hashes is not None else ()
        m.handle(rnd.StartRound(m.round_id + 1, self.version, self.hash, now, bases))
        return self._machine(self._eligible_event(now), now)

    def _received(self, ev: Received, now: float) -> list[Output]:
        refused = self._refused(ev.kind, ev.device_id, now)
        if refused:
            return refused
        if ev.kind == "delta":
            return self._delta(ev, now)
        if ev.kind == "secagg":
            if self.config.secure_aggregation is None:
                return [Dropped(ev.device_id, ev.kind, "this fleet does not aggregate securely")]
            return self._secure_received(ev, now)
        if ev.kind not in ("hello", "status"):
            return [Dropped(ev.device_id, ev.kind, "devices publish only hello, status, delta and secagg")]
        try:
            ctl = self.registry.receive(ev.kind, ev.device_id, ev.payload, now)
        except MessageError as e:
            return [Dropped(ev.device_id, ev.kind, str(e))]
        msg = ctl.message
        if ctl.stale:  # NOTE: a late message of an older connection (the broker delivers queued wills late)
            return []
        if isinstance(msg, Hello):
            self.store.save_device(msg.device_id, ev.payload.decode())
            self.full_sent.pop(msg.device_id, None)  # a (re)started device may have lost what it was sent
            if self.plan_of(msg.device_id) is None:
                return self._refuse_unfit(msg.device_id)
            return self._machine(rnd.Rejoined(msg.device_id, now), now)  # ... incl. its task of the open round
        if msg.state == "offline":
            return self._machine(rnd.DeviceLost(msg.device_id, now), now) if ctl.lost else []
        if msg.state == "failed":  # cannot train that round: for the open round, a dropout (stop waiting)
            return [DeviceFailed(msg.device_id, msg.round_id or 0, msg.reason or ""),
                    *self._failed(msg.device_id, msg.round_id or 0, now)]
        assert msg.model_version is not None  # NOTE: Status refuses an online/busy/failed status without it
        return self._catch_up(msg.device_id, msg.model_version)

    def _refused(self, kind: str, device_id: str, now: float) -> list[Output]:
        """A ``Dropped`` when this message must not be read at all (rate limit, plain delta in a masked fleet)."""
        bucket = "delta" if kind == "delta" else "control"
        if not self.limits[bucket].allow(device_id, now):  # NOTE: before any decoding: a flood costs nothing
            lim = self.limits[bucket].limit
            return [Dropped(device_id, kind, f"rate limited: {bucket} messages above {lim.rate:g}/s "
                                             f"(burst {lim.burst:g}) from this device")]
        if kind == "delta" and self.config.secure_aggregation is not None:
            return [Dropped(device_id, kind, "this fleet aggregates securely: plain deltas are never read")]
        return []

    def _failed(self, device_id: str, round_id: int, now: float) -> list[Output]:
        return self._machine(rnd.DeviceLost(device_id, now), now) if round_id == self.machine.round_id else []

    def _machine(self, event: object, now: float) -> list[Output]:
        """Feed the round machine; persist its new state and turn its commands into outputs."""
        if (self.secure is not None and isinstance(event, (rnd.Tick, rnd.DeviceLost))
                and self.machine.state in _COLLECTING):
            return self._secure_event(event, now)
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

    def _close(self, cmd: rnd.Commit | rnd.Abandon, now: float) -> list[Output]:
        m = self.machine
        self.secure = None
        if isinstance(cmd, rnd.Abandon):
            m.handle(rnd.Closed(now))
            self.store.abandon_round(m.snapshot(), cmd.reason)
            self.round_deltas = self.secure_sum = None
            return [RoundClosed(cmd.round_id, False, self.version, tuple(sorted(m.accepted)), cmd.reason)]
        secure = self.config.secure_aggregation is not None
        new_state = self._secure_state() if secure else self.aggregate(cmd.round_id)
        self.secure_sum = None
        base, payload = self._encode_model(self.version, self.state, self.version + 1, new_state)
        new_hash = self.codec.update_hash(payload)
        spent, epsilon, meta = self._dp_spend(self.skellam_round())
        m.handle(rnd.Closed(now))
        self.store.commit_round(m.snapshot(), self.version + 1, new_hash, self._pack(new_state), meta)
        if spent is not None:  # committed: the copy is now the accountant of record
            self.accountant = spent
        self.version, self.hash, self.state = self.version + 1, new_hash, new_state
        self.model_base, self.model_payload = base, payload
        self.round_deltas = None
        return [Publish("model/current", payload, retain=True), *self._member_models(),
                RoundClosed(cmd.round_id, True, self.version, tuple(sorted(m.accepted)), epsilon=epsilon)]

    def _dp_spend(self, skellam: tuple[float, float, float] | None = None
                  ) -> tuple[RDPAccountant | None, float | None, dict[str, str]]:
        """With DP: a copy of the accountant with this commit spent, its epsilon, and the store meta that commits it
        (the copy becomes the accountant once the store has committed); without DP: ``None, None, {}``."""
        dp = self.config.dp
        if self.accountant is None or dp is None:
            return None, None, {}
        spent = RDPAccountant.from_json(self.accountant.to_json())
        spent.budget = None  # NOTE: checked when the round started; the noise is already in the model
        epsilon = spent.spend(1.0, dp.noise_multiplier, skellam).epsilon
        meta = {"dp_accountant": spent.to_json()}
        spent.budget = dp.epsilon_budget
        return spent, epsilon, meta

    def _member_models(self) -> list[Output]:
        """A plan family: each online device on a smaller plan gets the new version of its own plan (FULL, on
        ``dev/<id>/model``): ``model/current`` carries the largest plan's tensors only."""
        if getattr(self.codec, "assign", None) is None:
            return []
        out: list[Output] = []
        for d, rec in sorted(self.registry.devices.items()):
            plan = self.plan_of(d) if rec.online else None
            if plan is not None and plan != self.codec.plan_hash:
                out += self._member_model(d, plan, rec.model_version)
        return out


_COLLECTING = (rnd.RoundState.TRAINING, rnd.RoundState.COLLECTING)


def _np_dtype(t) -> type:
    return DTYPE_NUMPY[t.dtype]


def pack_state(shared: list, state: dict[int, np.ndarray]) -> bytes:
    """The stored form of a model version: the shared tensors' values, little-endian, in ``shared`` order."""
    return b"".join(np.ascontiguousarray(state[t.id]).astype(state[t.id].dtype.newbyteorder("<")).tobytes()
                    for t in shared)


def unpack_state(shared: list, blob: bytes) -> dict[int, np.ndarray]:
    """Inverse of :func:`pack_state`; raises ValueError when ``blob`` does not hold exactly these tensors."""
    out, pos = {}, 0
    for t in shared:
        dt = np.dtype(_np_dtype(t)).newbyteorder("<")
        n = t.numel * dt.itemsize
        out[t.id] = np.frombuffer(blob[pos:pos + n], dt).astype(_np_dtype(t)).reshape(t.shape)
        pos += n
    if pos != len(blob):
        raise ValueError(f"stored model has {len(blob)} bytes, the plan's shared tensors need {pos}")
    return out
