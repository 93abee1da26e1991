"""One federated round as a table-driven state machine: events in, commands out, no I/O, no clock, no numpy.

Synchronous rounds: states ``IDLE -> SELECTING -> TRAINING -> COLLECTING -> (COMMITTING | ABANDONED) -> IDLE``; every legal
``(state, event)`` pair is a row of :data:`TRANSITIONS` naming its handler and the states it may lead to; any
other pair raises :class:`IllegalTransition`. The machine decides *who* trains, *which* deltas count and *when*
the round closes; it does not decode payloads, aggregate or persist (the coordinator does, from its commands).
Rejections carry a :class:`Reject` code, which the coordinator sends back to the device in an ``ack``.
Asynchronous buffered rounds (``mode: async``) are their own machine with their own table, in
:mod:`fleet.coordinator.async_round`; they share this module's events, commands and reject codes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from enum import Enum, IntEnum


class RoundState(str, Enum):
    IDLE = "idle"
    SELECTING = "selecting"  # waiting for the list of eligible devices
    TRAINING = "training"  # tasks out, no delta accepted yet
    COLLECTING = "collecting"  # at least one delta accepted, below the goal, before the deadline
    COMMITTING = "committing"  # the coordinator is aggregating and persisting the new version
    ABANDONED = "abandoned"  # closed below quorum: the model does not change


class Reject(IntEnum):
    """Why a delta did not count. Values are stable: they appear in acks and in the store."""

    MALFORMED = 1  # the wire reader refused the payload (its own WireError code goes in the detail)
    WRONG_ROUND = 2  # round id is not the open round's
    ROUND_CLOSED = 3  # right round, but it is no longer collecting
    WRONG_PLAN = 4  # plan hash differs from the round's plan
    STALE_BASE = 5  # trained from another model version than the round's base
    REPLAYED_COUNTER = 6  # counter not above the last one accepted from this device
    NOT_SELECTED = 7  # the device was not asked to train in this round
    ALREADY_CONTRIBUTED = 8  # a different delta from this device already counts in this round
    BAD_SAMPLES = 9  # sample count is zero
    LATE = 10  # arrived after the deadline
    WRONG_DEVICE = 11  # device id in the payload differs from the topic's
    TOO_STALE = 12  # async: trained from a version more than ``max_staleness`` versions behind the current one


# --- events -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartRound:
    round_id: int
    base_version: int
    base_hash: str
    now: float
    bases: tuple[tuple[str, str], ...] = ()  # mixed-memory fleet: (plan hash, base hash) of every smaller plan


@dataclass(frozen=True)
class Eligible:
    device_ids: tuple[str, ...]
    now: float
    plans: tuple[tuple[str, str], ...] = ()  # mixed-memory fleet: (device, plan hash) where not the round's plan


@dataclass(frozen=True)
class Upload:
    """The header of a decoded delta, all the machine needs to judge it (values stay with the coordinator)."""

    device_id: str
    round_id: int
    plan_hash: str
    base_hash: str
    counter: int
    num_samples: int
    content_hash: str  # hex digest of the whole payload: the dedup key with (round, device)


@dataclass(frozen=True)
class DeltaArrived:
    upload: Upload
    now: float


@dataclass(frozen=True)
class DeviceLost:
    device_id: str
    now: float


@dataclass(frozen=True)
class Rejoined:
    """A device said hello again (a restart may have lost its task, or the delta it made)."""

    device_id: str
    now: float


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class SecureClosed:
    """Secure aggregation settled the round (``fleet/coordinator/secagg_round.py``): ``device_ids`` are the
    devices whose masked inputs are in the sum (empty: the masked round aborted, ``reason`` says why)."""

    device_ids: tuple[str, ...]
    reason: str
    now: float


@dataclass(frozen=True)
class Closed:
    """The coordinator has persisted the commit (or the abandonment): back to IDLE."""

    now: float


# --- commands -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    round_id: int
    device_ids: tuple[str, ...]
    deadline: float


@dataclass(frozen=True)
class Accepted:
    upload: Upload


@dataclass(frozen=True)
class Duplicate:
    upload: Upload


@dataclass(frozen=True)
class Rejected:
    upload: Upload
    reason: Reject
    detail: str = ""


@dataclass(frozen=True)
class Commit:
    round_id: int
    device_ids: tuple[str, ...]  # accepted, sorted


@dataclass(frozen=True)
class Abandon:
    round_id: int
    reason: str


class IllegalTransition(RuntimeError):
    def __init__(self, state: RoundState, event: object):
        super().__init__(f"event {type(event).__name__} is not legal in state {state.value}")
        self.state, self.event = state, event


@dataclass
class RoundConfig:
    """Round policy (derived from the validated fleet config). ``quorum`` is a fraction of ``goal``;
    ``over_selection`` >= 1 asks extra devices."""

    goal: int = 10
    over_selection: float = 1.3
    quorum: float = 0.5
    deadline_s: float = 60.0
    seed: int = 0

    @property
    def min_accepted(self) -> int:
        return max(1, math.ceil(self.quorum * self.goal - 1e-9))


def select(eligible: tuple[str, ...], n: int, seed: int, round_id: int) -> tuple[str, ...]:
    """``n`` of ``eligible``, a deterministic function of (set of ids, seed, round id); sorted."""
    pool = sorted(set(eligible))
    rng = random.Random(f"{seed}/{round_id}")
    return tuple(sorted(rng.sample(pool, min(n, len(pool)))))


S = RoundState
_ACTIVE = (S.TRAINING, S.COLLECTING)
_CLOSED = (S.IDLE, S.SELECTING, S.COMMITTING, S.ABANDONED)

# (state, event type) -> (handler, states it may lead to). The one place where legality is decided.
TRANSITIONS: dict[tuple[RoundState, type], tuple[str, frozenset[RoundState]]] = {
    (S.IDLE, StartRound): ("_start", frozenset({S.SELECTING})),
    (S.SELECTING, Eligible): ("_select", frozenset({S.TRAINING, S.ABANDONED})),
    **{(s, DeltaArrived): ("_delta", frozenset({s, S.COLLECTING, S.COMMITTING, S.ABANDONED})) for s in _ACTIVE},
    **{(s, DeviceLost): ("_lost", frozenset({s, S.COMMITTING, S.ABANDONED})) for s in _ACTIVE},
    **{(s, Tick): ("_tick", frozenset({s, S.COMMITTING, S.ABANDONED})) for s in _ACTIVE},
    **{(s, Rejoined): ("_rejoined", frozenset({s})) for s in _ACTIVE},
    **{(s, SecureClosed): ("_secure_closed", frozenset({S.COMMITTING, S.ABANDONED})) for s in _ACTIVE},
    (S.COMMITTING, Closed): ("_closed", frozenset({S.IDLE})),
    (S.ABANDONED, Closed): ("_closed", frozenset({S.IDLE})),
    # harmless outside a collecting round: late deltas are answered, the rest is ignored
    **{(s, DeltaArrived): ("_delta_closed", frozenset({s})) for s in _CLOSED},
    **{(s, DeviceLost): ("_ignore", frozenset({s})) for s in _CLOSED},
    **{(s, Tick): ("_ignore", frozenset({s})) for s in _CLOSED},
    **{(s, Rejoined): ("_ignore", frozenset({s})) for s in _CLOSED},
}


@dataclass
class RoundMachine:
    """The open round (or the last one) plus per-device counters, which outlive rounds (replay protection)."""

    config: RoundConfig
    plan_hash: str
    state: RoundState = RoundState.IDLE
    round_id: int = 0
    base_version: int = 0
    base_hash: str = ""
    selected: tuple[str, ...] = ()
    deadline: float = 0.0
    accepted: dict[str, str] = field(default_factory=dict)  # device -> content hash
    lost: set[str] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=dict)  # device -> last accepted counter
    bases: dict[str, str] = field(default_factory=dict)  # smaller plan hash -> its hash of the base version
    assigned: dict[str, str] = field(default_factory=dict)  # selected device -> its plan when not ``plan_hash``
    _chosen: frozenset[str] = frozenset()  # set view of ``selected`` (membership is per delta: keep it O(1))

    def handle(self, event: object) -> list[object]:
        row = TRANSITIONS.get((self.state, type(event)))
        if row is None:
            raise IllegalTransition(self.state, event)
        name, allowed = row
        out, nxt = getattr(self, name)(event)
        assert nxt in allowed, f"{name} led {self.state.value} -> {nxt.value}, not in the table"
        self.state = nxt
        return out

    # --- handlers: (event) -> (commands, next state) ---------------------------------------------------------

    def _start(self, ev: StartRound):
        if ev.round_id <= self.round_id:
            raise ValueError(f"round ids must increase: {ev.round_id} after {self.round_id}")
        self.round_id, self.base_version, self.base_hash = ev.round_id, ev.base_version, ev.base_hash
        self.selected, self.deadline, self.accepted, self.lost = (), 0.0, {}, set()
        self._chosen = frozenset()
        self.bases, self.assigned = dict(ev.bases), {}
        return [], S.SELECTING

    def _select(self, ev: Eligible):
        want = math.ceil(self.config.goal * self.config.over_selection - 1e-9)
        self.selected = select(ev.device_ids, want, self.config.seed, self.round_id)
        self._chosen = frozenset(self.selected)
        self.assigned = {d: p for d, p in ev.plans if d in self._chosen and p != self.plan_hash}
        if len(self.selected) < self.config.min_accepted:
            why = f"{len(self.selected)} eligible device(s) < quorum {self.config.min_accepted}"
            return [Abandon(self.round_id, why)], S.ABANDONED
        self.deadline = ev.now + self.config.deadline_s
        return [Dispatch(self.round_id, self.selected, self.deadline)], S.TRAINING

    def judge(self, up: Upload, now: float) -> Reject | None | str:
        """The verdict on a delta in an active round without changing anything: a Reject, "duplicate" or None."""
        if up.round_id != self.round_id:
            return Reject.WRONG_ROUND
        if up.plan_hash != self.assigned.get(up.device_id, self.plan_hash):  # NOTE: mixed fleets: its own plan
            return Reject.WRONG_PLAN
        if self.accepted.get(up.device_id) == up.content_hash:
            return "duplicate"
        if up.device_id not in self._chosen:
            return Reject.NOT_SELECTED
        if up.device_id in self.accepted:
            return Reject.ALREADY_CONTRIBUTED
        if up.counter <= self.counters.get(up.device_id, -1):
            return Reject.REPLAYED_COUNTER
        if up.base_hash != (self.base_hash if up.plan_hash == self.plan_hash else self.bases.get(up.plan_hash)):
            return Reject.STALE_BASE
        if up.num_samples <= 0:
            return Reject.BAD_SAMPLES
        if now > self.deadline:
            return Reject.LATE
        return None

    def _delta(self, ev: DeltaArrived):
        up = ev.upload
        verdict = self.judge(up, ev.now)
        if verdict == "duplicate":
            return [Duplicate(up)], self.state
        if verdict is not None:
            return [Rejected(up, verdict)], self.state  # type: ignore[arg-type]
        self.accepted[up.device_id] = up.content_hash
        self.counters[up.device_id] = up.counter
        self.lost.discard(up.device_id)  # reported offline, then delivered after all
        out: list[object] = [Accepted(up)]
        if len(self.accepted) >= self.config.goal:
            return [*out, self._commit()], S.COMMITTING
        more, nxt = self._maybe_close()
        return out + more, (nxt if nxt is not None else S.COLLECTING)

    def _delta_closed(self, ev: DeltaArrived):
        up = ev.upload
        if up.round_id == self.round_id and self.accepted.get(up.device_id) == up.content_hash:
            return [Duplicate(up)], self.state
        reason = Reject.ROUND_CLOSED if up.round_id == self.round_id else Reject.WRONG_ROUND
        return [Rejected(up, reason)], self.state

    def _lost(self, ev: DeviceLost):
        if ev.device_id not in self._chosen or ev.device_id in self.accepted or ev.device_id in self.lost:
            return [], self.state
        self.lost.add(ev.device_id)
        out, nxt = self._maybe_close()
        return out, (nxt if nxt is not None else self.state)

    def _rejoined(self, ev: Rejoined):
        """Ask a selected device that has not contributed again: it answers with the same delta bytes if it had
        made one (dedup counts it once), or trains the task it lost."""
        if ev.device_id not in self._chosen or ev.device_id in self.accepted:
            return [], self.state
        return [Dispatch(self.round_id, (ev.device_id,), self.deadline)], self.state

    def _tick(self, ev: Tick):
        if ev.now <= self.deadline:
            return [], self.state
        return self._close("deadline passed")

    def _secure_closed(self, ev: SecureClosed):
        """A masked round counts the devices in the secure sum (no content hash: no delta was ever seen)."""
        self.accepted = {d: "secagg" for d in ev.device_ids if d in self._chosen}
        if not self.accepted:
            return [Abandon(self.round_id, ev.reason)], S.ABANDONED
        return self._close(ev.reason)

    def _closed(self, ev: Closed):
        return [], S.IDLE

    def _ignore(self, ev: object):
        return [], self.state

    # --- closing -------------------------------------------------------------------------------------------

    def _commit(self) -> Commit:
        return Commit(self.round_id, tuple(sorted(self.accepted)))

    def _maybe_close(self):
        """Close early once every selected device has either contributed or dropped out."""
        if len(self.accepted) + len(self.lost) >= len(self.selected):  # both are subsets of selected, disjoint
            return self._close("every selected device answered or dropped")
        return [], None

    def _close(self, why: str):
        if len(self.accepted) >= self.config.min_accepted:
            return [self._commit()], S.COMMITTING
        return [Abandon(self.round_id, f"{why}: {len(self.accepted)} accepted < quorum "
                                      f"{self.config.min_accepted}")], S.ABANDONED

    # --- persistence (the coordinator stores these fields; the machine only packs and unpacks them) ----------

    def fingerprint(self) -> tuple:
        """Cheap change detector for the persisted fields (``snapshot`` is O(selected))."""
        return (self.state, self.round_id, self.deadline, len(self.selected), len(self.lost))

    def snapshot(self) -> dict:
        return {"state": self.state.value, "round_id": self.round_id, "base_version": self.base_version,
                "base_hash": self.base_hash, "selected": list(self.selected), "deadline": self.deadline,
                "lost": sorted(self.lost), "bases": dict(self.bases), "plans": dict(self.assigned)}

    def restore(self, snap: dict, accepted: dict[str, str], counters: dict[str, int]) -> None:
        self.state = RoundState(snap["state"])
        self.round_id, self.base_version = int(snap["round_id"]), int(snap["base_version"])
        self.base_hash, self.deadline = str(snap["base_hash"]), float(snap["deadline"])
        self.accepted, self.counters = dict(accepted), dict(counters)
        self.selected, self.lost = tuple(snap["selected"]), set(snap["lost"]) - set(accepted)
        self._chosen = frozenset(self.selected)
        self.bases, self.assigned = dict(snap.get("bases", {})), dict(snap.get("plans", {}))
