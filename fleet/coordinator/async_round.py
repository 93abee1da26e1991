"""Asynchronous buffered rounds (FedBuff-style) as their own table-driven state machine: no I/O, clock or numpy.

States ``IDLE -> COLLECTING <-> COMMITTING``. While COLLECTING, every idle eligible device the coordinator offers
gets a task on the newest model (its own task id, carried in the wire's ``round_id`` field: one more than that
device's previous task, so each device sees increasing ids); a delta counts if it answers the device's open task, was trained from that task's model and is
at most ``max_staleness`` versions behind the current one. Every ``buffer_size`` accepted deltas (each device at
most once per buffer) make a :class:`~fleet.round.Commit`; the coordinator aggregates them with staleness
weights, persists the new version and answers :class:`Published`, which reopens the buffer on it. ``round_id``
here is the open buffer's number, which is the version it builds on (0 before :class:`OpenAsync`), so a loop that
counts rounds by ``round_id`` counts committed buffers. It refuses to decode, aggregate or persist; the sync
machine (:mod:`fleet.round`) is untouched by it: same events where they mean the same, same commands and codes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from fleet.round import (
    Accepted,
    Commit,
    DeltaArrived,
    DeviceLost,
    Duplicate,
    Eligible,
    IllegalTransition,
    Reject,
    Rejected,
    Rejoined,
    RoundState,
    Tick,
    Upload,
)

STALENESS_KINDS = ("constant", "polynomial", "hinge")


@dataclass
class AsyncConfig:
    """Async policy. ``staleness`` names the weight ``f(s)`` of a delta ``s`` versions behind:
    ``constant`` 1; ``polynomial`` ``(1 + s) ** -exponent`` (0.5: ``1/sqrt(1+s)``, FedBuff's); ``hinge`` 1 up to
    ``hinge`` versions, then ``1 / (1 + exponent * (s - hinge))``. ``concurrency``: tasks out at once (0: every
    idle eligible device trains). ``task_timeout_s``: a task not answered by then is dropped and its device
    offered a new one. ``server_lr`` in (0, 1] scales every buffer's step (FedBuff's server learning rate,
    folded into each delta's factor: ``server_lr * f(s)``)."""

    buffer_size: int = 10
    staleness: str = "polynomial"
    exponent: float = 0.5
    hinge: int = 4
    max_staleness: int = 8
    concurrency: int = 0
    task_timeout_s: float = 60.0
    server_lr: float = 1.0

    def validate(self, prefix: str = "") -> list[str]:
        """Every problem, with its key path under ``prefix``; empty when valid (``fleet.config.from_dict`` calls
        it with the section's path when the config is nested)."""
        errs = []
        if isinstance(self.buffer_size, bool) or not isinstance(self.buffer_size, int) or self.buffer_size < 1:
            errs.append(f"{prefix}buffer_size: must be an integer >= 1, got {self.buffer_size!r}")
        if self.staleness not in STALENESS_KINDS:
            errs.append(f"{prefix}staleness: expected one of {', '.join(STALENESS_KINDS)}, got {self.staleness!r}")
        if not (isinstance(self.exponent, (int, float)) and math.isfinite(self.exponent) and self.exponent >= 0):
            errs.append(f"{prefix}exponent: must be finite and >= 0, got {self.exponent!r}")
        for key in ("hinge", "max_staleness", "concurrency"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                errs.append(f"{prefix}{key}: must be an integer >= 0, got {v!r}")
        if not (isinstance(self.task_timeout_s, (int, float)) and math.isfinite(self.task_timeout_s)
                and self.task_timeout_s > 0):
            errs.append(f"{prefix}task_timeout_s: must be finite and > 0, got {self.task_timeout_s!r}")
        if not (isinstance(self.server_lr, (int, float)) and not isinstance(self.server_lr, bool)
                and 0 < self.server_lr <= 1):
            errs.append(f"{prefix}server_lr: must be in (0, 1], got {self.server_lr!r}")
        if isinstance(self.concurrency, int) and isinstance(self.buffer_size, int) \
                and 0 < self.concurrency < self.buffer_size:
            errs.append(f"{prefix}concurrency: must be 0 or >= buffer_size ({self.buffer_size}): fewer tasks out "
                        f"than the buffer needs would never commit, got {self.concurrency}")
        return errs

    def weight(self, s: int) -> float:
        """``f(s)`` in (0, 1], f(0) = 1, non-increasing."""
        if self.staleness == "constant":
            return 1.0
        if self.staleness == "polynomial":
            return float((1.0 + s) ** -self.exponent)
        return 1.0 if s <= self.hinge else 1.0 / (1.0 + self.exponent * (s - self.hinge))


# --- events and commands of async only (the rest are fleet.round's) -------------------------------------------


@dataclass(frozen=True)
class OpenAsync:
    """Start handing out tasks on ``version``."""

    version: int
    version_hash: str
    now: float


@dataclass(frozen=True)
class CloseAsync:
    """Stop: the run published all its versions. Open tasks end; accepted deltas stay in the buffer (a later
    :class:`OpenAsync` on the same version counts them)."""

    now: float


@dataclass(frozen=True)
class Published:
    """The coordinator persisted the buffer's new version: reopen the buffer on it."""

    version: int
    version_hash: str
    now: float


@dataclass(frozen=True)
class TaskFailed:
    """The device said (``failed`` status) it cannot train task ``round_id``."""

    device_id: str
    round_id: int
    now: float


@dataclass(frozen=True)
class Behind:
    """The device reported (``status``) holding ``held_version``: the coordinator sends it the newest version."""

    device_id: str
    held_version: int
    now: float


@dataclass(frozen=True)
class Assign:
    """Send these devices task ``round_id`` on model ``version`` (identity ``version_hash``)."""

    round_id: int
    device_ids: tuple[str, ...]
    deadline: float
    version: int
    version_hash: str


@dataclass(frozen=True)
class OpenTask:
    round_id: int
    version: int
    version_hash: str
    deadline: float


@dataclass(frozen=True)
class Buffered:
    """An accepted delta waiting in the buffer."""

    round_id: int  # the task it answered
    content_hash: str
    base_version: int


S = RoundState

# (state, event type) -> (handler, states it may lead to). The one place where async legality is decided.
ASYNC_TRANSITIONS: dict[tuple[RoundState, type], tuple[str, frozenset[RoundState]]] = {
    (S.IDLE, OpenAsync): ("_open", frozenset({S.COLLECTING})),
    (S.COLLECTING, Eligible): ("_offer", frozenset({S.COLLECTING})),
    (S.COLLECTING, DeltaArrived): ("_delta", frozenset({S.COLLECTING, S.COMMITTING})),
    (S.COLLECTING, Tick): ("_tick", frozenset({S.COLLECTING})),
    (S.COLLECTING, Rejoined): ("_rejoined", frozenset({S.COLLECTING})),
    (S.COLLECTING, TaskFailed): ("_failed", frozenset({S.COLLECTING})),
    (S.COLLECTING, Behind): ("_behind", frozenset({S.COLLECTING})),
    (S.COMMITTING, Published): ("_published", frozenset({S.COLLECTING})),
    (S.COLLECTING, CloseAsync): ("_close", frozenset({S.IDLE})),
    (S.IDLE, CloseAsync): ("_ignore", frozenset({S.IDLE})),
    # before the first OpenAsync nothing is handed out and nothing counts
    (S.IDLE, Eligible): ("_ignore", frozenset({S.IDLE})),
    (S.IDLE, Tick): ("_ignore", frozenset({S.IDLE})),
    (S.IDLE, Rejoined): ("_ignore", frozenset({S.IDLE})),
    (S.IDLE, TaskFailed): ("_ignore", frozenset({S.IDLE})),
    (S.IDLE, Behind): ("_ignore", frozenset({S.IDLE})),
    (S.IDLE, DeltaArrived): ("_delta_closed", frozenset({S.IDLE})),
    # COMMITTING lasts one coordinator step (or until the boot after a crash, or while DP refuses to publish)
    **{(S.COMMITTING, e): ("_ignore", frozenset({S.COMMITTING})) for e in (Eligible, Tick, Rejoined, TaskFailed,
                                                                              Behind)},
    (S.COMMITTING, DeltaArrived): ("_delta_closed", frozenset({S.COMMITTING})),
    # a device that goes offline keeps its task until the deadline: it may deliver after it reconnects
    **{(s, DeviceLost): ("_ignore", frozenset({s})) for s in (S.IDLE, S.COLLECTING, S.COMMITTING)},
}


@dataclass
class AsyncMachine:
    """The open buffer, the open task of each device, and per-device counters (replay protection)."""

    config: AsyncConfig
    plan_hash: str
    seed: int = 0
    state: RoundState = RoundState.IDLE
    round_id: int = 0  # the open buffer = the version it builds on; 0 before OpenAsync
    version_hash: str = ""
    task_seq: int = 0  # draws made to pick devices under the concurrency cap
    tasks: dict[str, OpenTask] = field(default_factory=dict)  # device -> its open task
    issued: dict[str, int] = field(default_factory=dict)  # device -> the last task id it was given (open or not)
    buffer: dict[str, Buffered] = field(default_factory=dict)  # device -> its delta in the open buffer
    counters: dict[str, int] = field(default_factory=dict)  # device -> last accepted counter

    @property
    def version(self) -> int:
        return self.round_id

    def handle(self, event: object) -> list[object]:
        row = ASYNC_TRANSITIONS.get((self.state, type(event)))
        if row is None:
            raise IllegalTransition(self.state, event)
        name, allowed = row
        out, nxt = getattr(self, name)(event)
        assert nxt in allowed, f"{name} led {self.state.value} -> {nxt.value}, not in the table"
        self.state = nxt
        return out

    def staleness(self, base_version: int) -> int:
        return self.round_id - base_version

    # --- handlers: (event) -> (commands, next state) ---------------------------------------------------------

    def _open(self, ev: OpenAsync):
        self.round_id, self.version_hash = ev.version, ev.version_hash
        return [], S.COLLECTING

    def _offer(self, ev: Eligible):
        """A task on the newest model for each offered device that has none and no delta in the buffer, up to
        ``concurrency`` open tasks among the offered (online, eligible) devices: a device that went offline keeps
        its task (it may deliver after it reconnects) but no longer holds a slot. Which devices, when capped: a
        deterministic draw from (seed, draw number).
        Task ids count per device (one more than the device's last), so they do not depend on how devices were
        grouped into offers: a restarted coordinator that hears the devices again in another order hands out the
        same ids."""
        offered = set(ev.device_ids)
        idle = sorted(offered - self.tasks.keys() - self.buffer.keys())
        cap = self.config.concurrency
        if cap:  # NOTE: the cap counts devices training now; an offline device's open task does not hold a slot
            free = cap - len(offered & self.tasks.keys())
            if free <= 0:
                return [], S.COLLECTING
            if len(idle) > free:
                self.task_seq += 1
                idle = sorted(random.Random(f"{self.seed}/async/{self.task_seq}").sample(idle, free))
        out: list[object] = []
        deadline = ev.now + self.config.task_timeout_s
        for d in idle:
            task = OpenTask(self.issued.get(d, 0) + 1, self.round_id, self.version_hash, deadline)
            self.tasks[d], self.issued[d] = task, task.round_id
            out.append(Assign(task.round_id, (d,), deadline, task.version, task.version_hash))
        return out, S.COLLECTING

    def judge(self, up: Upload, now: float) -> Reject | None | str:
        """The verdict on a delta without changing anything: a Reject, "duplicate" or None (it counts)."""
        held = self.buffer.get(up.device_id)
        if held is not None and held.round_id == up.round_id:
            return "duplicate" if held.content_hash == up.content_hash else Reject.ALREADY_CONTRIBUTED
        if up.plan_hash != self.plan_hash:
            return Reject.WRONG_PLAN
        task = self.tasks.get(up.device_id)
        if task is None or task.round_id != up.round_id:
            return Reject.WRONG_ROUND
        if up.counter <= self.counters.get(up.device_id, -1):
            return Reject.REPLAYED_COUNTER
        if up.base_hash != task.version_hash:
            return Reject.STALE_BASE
        if up.num_samples <= 0:
            return Reject.BAD_SAMPLES
        if now > task.deadline:
            return Reject.LATE
        if self.staleness(task.version) > self.config.max_staleness:
            return Reject.TOO_STALE
        return None

    def _delta(self, ev: DeltaArrived):
        up = ev.upload
        verdict = self.judge(up, ev.now)
        if verdict == "duplicate":
            return [Duplicate(up)], S.COLLECTING
        if verdict is not None:
            task = self.tasks.get(up.device_id)
            if task is not None and task.round_id == up.round_id:
                del self.tasks[up.device_id]  # its answer was refused: the task is over, the device idle again
            s = self.staleness(task.version) if task is not None else 0
            detail = (f"{s} versions behind, max {self.config.max_staleness}" if verdict == Reject.TOO_STALE
                      else "")
            return [Rejected(up, verdict, detail)], S.COLLECTING  # type: ignore[arg-type]
        task = self.tasks.pop(up.device_id)
        self.buffer[up.device_id] = Buffered(up.round_id, up.content_hash, task.version)
        self.counters[up.device_id] = up.counter
        out: list[object] = [Accepted(up)]
        if len(self.buffer) >= self.config.buffer_size:
            return [*out, self.commit()], S.COMMITTING
        return out, S.COLLECTING

    def _delta_closed(self, ev: DeltaArrived):
        up = ev.upload
        held = self.buffer.get(up.device_id)
        if held is not None and held.round_id == up.round_id and held.content_hash == up.content_hash:
            return [Duplicate(up)], self.state
        if self.state == S.IDLE:
            return [Rejected(up, Reject.WRONG_ROUND, "no asynchronous session is open")], self.state
        return [Rejected(up, Reject.ROUND_CLOSED, f"buffer on v{self.round_id} is being committed")], self.state

    def _tick(self, ev: Tick):
        """Drop tasks past their deadline: their devices can be offered new ones."""
        for d in [d for d, t in self.tasks.items() if ev.now > t.deadline]:
            del self.tasks[d]
        return [], S.COLLECTING

    def _rejoined(self, ev: Rejoined):
        """Re-send a device's open task (a restart may have lost it, or the delta it made: it answers a repeated
        task with the same bytes)."""
        t = self.tasks.get(ev.device_id)
        if t is None:
            return [], S.COLLECTING
        return [Assign(t.round_id, (ev.device_id,), t.deadline, t.version, t.version_hash)], S.COLLECTING

    def _failed(self, ev: TaskFailed):
        t = self.tasks.get(ev.device_id)
        if t is not None and t.round_id == ev.round_id:
            del self.tasks[ev.device_id]
        return [], S.COLLECTING

    def _behind(self, ev: Behind):
        """A device holding a version older than its task's cannot have trained it; it is about to receive the
        newest version, and a device drops a task for a version older than the one it holds. So a task on a
        version between the two is replaced by one on the newest version."""
        t = self.tasks.get(ev.device_id)
        if t is None or not ev.held_version < t.version < self.round_id:
            return [], S.COLLECTING
        del self.tasks[ev.device_id]
        return self._offer(Eligible((ev.device_id,), ev.now))

    def _published(self, ev: Published):
        if ev.version != self.round_id + 1:
            raise ValueError(f"buffer on v{self.round_id} committed as v{ev.version}, expected v{self.round_id + 1}")
        self.round_id, self.version_hash, self.buffer = ev.version, ev.version_hash, {}
        return [], S.COLLECTING

    def _close(self, ev: CloseAsync):
        self.tasks = {}
        return [], S.IDLE

    def _ignore(self, ev: object):
        return [], self.state

    def commit(self) -> Commit:
        return Commit(self.round_id, tuple(sorted(self.buffer)))

    # --- persistence (the coordinator stores these; the machine only unpacks them) ----------------------------

    def fingerprint(self) -> tuple:
        """Changes whenever the open tasks change (what the store keeps besides accepted deltas)."""
        return (self.state, self.round_id, self.task_seq, len(self.tasks), len(self.buffer), sum(self.issued.values()))

    def restore(self, *, opened: bool, version: int, version_hash: str, task_seq: int, tasks: dict[str, OpenTask],
                issued: dict[str, int], buffer: dict[str, Buffered], counters: dict[str, int]) -> None:
        self.round_id, self.version_hash = (version, version_hash) if opened else (0, "")
        self.task_seq, self.tasks, self.issued = task_seq, dict(tasks), dict(issued)
        self.buffer, self.counters = dict(buffer), dict(counters)
        if not opened:
            self.state = S.IDLE
        else:
            self.state = S.COMMITTING if len(self.buffer) >= self.config.buffer_size else S.COLLECTING
