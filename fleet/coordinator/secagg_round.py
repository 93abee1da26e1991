"""Masked (secure-aggregation) sync rounds: the stages as their own table-driven machine, and the coordinator's glue.

A masked round is a sync round (:mod:`fleet.round`: select, dispatch, deadline, quorum) whose collection is this
machine instead of plain deltas. Stages ``ADVERTISE -> SHARE -> MASKED -> UNMASK -> DONE`` (or ``ABORTED``); each
waits for the devices it expects (the selected ones, then the roster, U2, U3) until all answered or were lost, or
its deadline passed (ADVERTISE: the round's deadline, or as soon as ``goal`` devices advertised; the others:
``stage_timeout`` later), then closes through :class:`fleet.security.secagg.SecAggServer`. Closing relays keys and
encrypted shares (the coordinator never holds a pairwise secret) and, at the end, the sum of the masked inputs of
U3 with every mask removed: the one vector the coordinator learns. Fewer than ``threshold`` devices at any stage
abort the round, and the model stays as it was.

:class:`SecureRounds` is the coordinator mixin: tasks go out inside ``OPEN`` frames on ``dev/<id>/secagg_relay``,
``dev/<id>/secagg`` frames feed the machine, ticks and lost devices reach it instead of the sync machine's
deadline, and the sum becomes the new model (FedAvg from the masked ``num, den``, bit for bit the plain one; with
``dp:``, the devices' distributed Skellam noise and the accountant's Skellam round). Nothing of a masked round is
stored: a coordinator that restarts mid-round abandons it (nothing is revealed, the devices' keys die with the
round); the same coordinator booting again after a broker reconnect re-sends the open stage. It refuses plain
deltas in a masked fleet and messages naming another device than their topic; it does no I/O.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.wire.errors import WireFormatError
from device_agent.wire.messages import Publish
from device_agent.wire.secagg import (
    MAX_GROUP,
    AdvertiseKeys,
    MaskedInput,
    Noise,
    SecAggError,
    ShareKeys,
    UnmaskResponse,
    session_label,
)
from device_agent.wire.secagg_frames import Message, Open, secagg_from_bytes, secagg_to_bytes
from fleet import aggregate as agg
from fleet import round as rnd
from fleet.coordinator.events import Dropped, Output, Received
from fleet.coordinator.parts import CoordinatorParts
from fleet.security.secagg import SecAggAborted, SecAggServer, plan_groups, split_dense_sums, to_signed

if TYPE_CHECKING:
    from fleet.security.dp import DPConfig
    from fleet.security.secagg_config import SecureAggregationConfig


class Stage(str, Enum):
    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED = "masked"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


# --- events and commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrived:
    device_id: str
    msg: object
    digest: str  # sha256 of the payload: an identical redelivery is ignored
    now: float


@dataclass(frozen=True)
class Gone:
    device_id: str
    now: float


@dataclass(frozen=True)
class Clock:
    now: float


@dataclass(frozen=True)
class Relay:
    device_id: str
    msg: Message


@dataclass(frozen=True)
class Refused:
    device_id: str
    detail: str


@dataclass(frozen=True)
class Summed:
    total: np.ndarray | tuple  # (length,) uint, the masks removed; a tuple of them, one per group, for groups
    device_ids: tuple[str, ...]  # U3: whose inputs are in it


@dataclass(frozen=True)
class Aborted:
    reason: str


_OPEN = (Stage.ADVERTISE, Stage.SHARE, Stage.MASKED, Stage.UNMASK)
_ENDED = (Stage.DONE, Stage.ABORTED)
_ANY = frozenset(Stage)
# (stage, event type) -> handler. Handlers may close any number of stages (a stage whose devices are all lost).
TRANSITIONS: dict[tuple[Stage, type], str] = {
    **{(s, Arrived): "_arrived" for s in _OPEN},
    **{(s, Gone): "_gone" for s in _OPEN},
    **{(s, Clock): "_clock" for s in _OPEN},
    **{(s, Arrived): "_late" for s in _ENDED},
    **{(s, Gone): "_ignore" for s in _ENDED},
    **{(s, Clock): "_ignore" for s in _ENDED},
}
_EXPECTS = {Stage.ADVERTISE: AdvertiseKeys, Stage.SHARE: ShareKeys, Stage.MASKED: MaskedInput,
            Stage.UNMASK: UnmaskResponse}


class SecureRound:
    """One masked round's stages. ``groups``: who got the task, split into secure-aggregation groups (each at most
    ``MAX_GROUP`` devices, :func:`fleet.security.secagg.plan_groups`) with their Shamir ``thresholds``; every group
    runs the protocol on its own server, the stages in lockstep. A group that falls below its threshold leaves the
    round (its devices' inputs are not in the sum); the round aborts when no group is left. ``deadline``: the round's
    (ADVERTISE) deadline."""

    def __init__(self, round_id: int, session: bytes, groups: list[list[str]], thresholds: list[int], goal: int,
                 length: int, bits: int, deadline: float, stage_timeout: float, noise: Noise | None = None):
        self.round_id, self.goal, self.stage_timeout = round_id, goal, stage_timeout
        self.servers = [SecAggServer(round_id, session, t, length, bits, noise=noise)
                        for _, t in zip(groups, thresholds, strict=True)]
        self.group_of = {d: i for i, g in enumerate(groups) for d in g}
        self.live = set(range(len(groups)))  # groups still in the round
        self.stage = Stage.ADVERTISE
        self.expected, self.deadline = set(self.group_of), deadline
        self.lost: set[str] = set()
        self.seen: set[tuple[str, str]] = set()
        self.relayed: dict[str, Message] = {}  # device -> the last stage message sent to it
        self.left: list[str] = []  # why groups left the round

    @property
    def server(self) -> SecAggServer:
        """The one group's server (rounds of at most ``MAX_GROUP`` devices)."""
        return self.servers[0]

    def handle(self, event: object) -> list[object]:
        name = TRANSITIONS.get((self.stage, type(event)))
        if name is None:
            raise rnd.IllegalTransition(self.stage, event)  # type: ignore[arg-type]
        return getattr(self, name)(event)

    # --- handlers -------------------------------------------------------------------------------------------

    def _arrived(self, ev: Arrived) -> list[object]:
        if (ev.device_id, ev.digest) in self.seen:
            return []  # QoS 1 redelivery, or an advertisement re-sent for a repeated task
        if not isinstance(ev.msg, _EXPECTS[self.stage]) or ev.device_id not in self.expected:
            return [Refused(ev.device_id, f"{type(ev.msg).__name__} not expected from {ev.device_id} in stage "
                                          f"{self.stage.value}")]
        try:
            self.servers[self.group_of[ev.device_id]].receive(ev.msg)
        except SecAggError as e:
            return [Refused(ev.device_id, str(e))]
        self.seen.add((ev.device_id, ev.digest))
        return self._advance(ev.now)

    def _gone(self, ev: Gone) -> list[object]:
        self.lost.add(ev.device_id)
        return self._advance(ev.now)

    def _clock(self, ev: Clock) -> list[object]:
        return self._advance(ev.now)

    def _late(self, ev: Arrived) -> list[object]:
        return [Refused(ev.device_id, f"masked round {self.round_id} is {self.stage.value}")]

    def _ignore(self, ev: object) -> list[object]:
        return []

    # --- closing stages -------------------------------------------------------------------------------------

    def resend(self) -> list[Relay]:
        """The open stage's messages again, for the devices that have not answered (after a broker restart)."""
        if self.stage not in _OPEN:
            return []
        waiting = self.expected - self._answered() - self.lost
        return [Relay(d, self.relayed[d]) for d in sorted(waiting) if d in self.relayed]

    def _answered(self) -> set[str]:
        out: set[str] = set()
        for i in self.live:
            s = self.servers[i]
            held: dict[Stage, dict[str, Any]] = {Stage.ADVERTISE: s.keys, Stage.SHARE: s.shares,
                                                 Stage.MASKED: s.masked, Stage.UNMASK: s.answers}
            out |= set(held[self.stage])
        return out

    def _advance(self, now: float) -> list[object]:
        out: list[object] = []
        while self.stage in _OPEN:
            have = self._answered()
            waiting = self.expected - have - self.lost
            enough = self.stage == Stage.ADVERTISE and len(have) >= self.goal
            if waiting and not enough and now <= self.deadline:
                return out
            closed = self._close_stage()
            self.relayed.update((c.device_id, c.msg) for c in closed if isinstance(c, Relay))
            out += closed
            if self.stage == Stage.ABORTED:
                return out
            self.deadline = now + self.stage_timeout
        return out

    def _close_stage(self) -> list[object]:
        """Close the stage on every live group; a group below its threshold (or whose shares do not reconstruct)
        leaves the round."""
        out: list[object] = []
        expected: set[str] = set()
        totals, summed = [], []
        for i in sorted(self.live):
            s = self.servers[i]
            try:
                if self.stage == Stage.ADVERTISE:
                    roster = s.roster()
                    ids = [k.device_id for k in roster.keys]
                    out += [Relay(d, roster) for d in ids]
                elif self.stage == Stage.SHARE:
                    routed = s.route_shares()
                    ids = sorted(routed)
                    out += [Relay(d, routed[d]) for d in ids]
                elif self.stage == Stage.MASKED:
                    request = s.unmask_request()
                    ids = list(request.survivors)
                    out += [Relay(d, request) for d in ids]
                else:
                    totals.append(s.result())
                    summed += sorted(s.masked)
                    ids = []
                expected |= set(ids)
            except (SecAggAborted, SecAggError) as e:  # NOTE: SecAggError: shares that do not reconstruct
                self.live.discard(i)
                self.left.append(str(e))
        if not self.live:
            self.stage = Stage.ABORTED
            return [Aborted("; ".join(self.left))]
        if self.stage == Stage.UNMASK:
            self.stage = Stage.DONE
            return [Summed(totals[0] if len(totals) == 1 and len(self.servers) == 1 else tuple(totals),
                           tuple(sorted(summed)))]
        self.stage = {Stage.ADVERTISE: Stage.SHARE, Stage.SHARE: Stage.MASKED, Stage.MASKED: Stage.UNMASK}[self.stage]
        self.expected = expected
        return sorted(out, key=lambda r: r.device_id)  # type: ignore[attr-defined]


def secure_threshold(fraction: float, selected: int, min_accepted: int) -> int:
    """Shamir threshold of a round: the config's fraction of the selected devices, above half of them (so two
    disjoint halves can never both unmask) and at least the round's quorum."""
    return max(math.ceil(fraction * selected - 1e-9), selected // 2 + 1, min_accepted)


class SecureRounds(CoordinatorParts):
    """Mixin of :class:`fleet.coordinator.Coordinator` for fleets with ``secure_aggregation``."""

    secure: SecureRound | None = None
    secure_sum: np.ndarray | tuple | None = None  # one unmasked sum, or one per group
    secure_group_size = MAX_GROUP  # devices per secure-aggregation group: more selected devices run in groups

    def _masking(self) -> tuple[SecureAggregationConfig, DPConfig | None]:
        """The fleet's ``secure_aggregation`` and ``dp`` configs (this mixin only runs in fleets that mask)."""
        if self.config.secure_aggregation is None:
            raise RuntimeError("a masked round in a fleet without secure_aggregation")
        return self.config.secure_aggregation, self.config.dp

    def _secure_tasks(self, d: rnd.Dispatch, task: bytes) -> list[Output]:
        """The round's tasks inside OPEN frames (a device then never sends this round's delta in clear)."""
        (sa, _), m = self._masking(), self.machine
        if self.secure is None or self.secure.round_id != d.round_id:
            groups = plan_groups(list(m.selected), self.secure_group_size)
            quorum = self.config.round.min_accepted if len(groups) == 1 else 0  # groups: the round's quorum decides
            self.secure, self.secure_sum = SecureRound(
                d.round_id, session_label(bytes.fromhex(self.codec.plan_hash)), groups,
                [secure_threshold(sa.threshold, len(g), quorum) for g in groups],
                self.config.round.goal, self.size + 1, sa.bits, d.deadline, sa.stage_timeout,
                self._secure_noise()), None
        frame = secagg_to_bytes(d.round_id, Open(task))
        return [Publish(f"dev/{dev}/secagg_relay", frame) for dev in d.device_ids]

    def _secure_noise(self) -> Noise | None:
        """With ``dp:``: the distributed Skellam noise every member adds (its total ``mu`` matches the Gaussian
        variance ``(noise_multiplier * l2)^2`` of the lattice sum's L2 sensitivity ``l2``)."""
        dp = self.config.dp
        if dp is None:
            return None
        mu = self.skellam_terms()[2]
        return Noise(dp.clip, self._masking()[0].resolution, mu, dp.units == "real")

    def skellam_round(self) -> tuple[float, float, float] | None:
        """What the accountant spends for a round: ``(mu, l1, l2)`` of distributed Skellam noise, or None (the
        round is central DP's Gaussian, or has no DP)."""
        if self.config.secure_aggregation is None or self.config.dp is None:
            return None
        l1, l2, mu = self.skellam_terms()
        return mu, l1, l2

    def skellam_terms(self) -> tuple[float, float, float]:
        """``(l1, l2, mu)`` of a masked DP round: the lattice delta's norm is at most ``resolution + sqrt(D) / 2``
        after rounding (l2), ``l1 <= sqrt(D) l2``, and ``mu = (noise_multiplier l2)^2 / 2``."""
        sa, dp = self._masking()
        if dp is None:
            raise RuntimeError("Skellam noise terms of a masked round without dp")
        l2 = sa.resolution + math.sqrt(self.size) / 2
        return math.sqrt(self.size) * l2, l2, (dp.noise_multiplier * l2) ** 2 / 2

    def _secure_resume(self, now: float) -> list[Output]:
        """Boot with the masked round alive (a broker reconnect, not a restart): re-send what may have been lost;
        devices answer a repeated stage message with the reply they already made."""
        sr, m = self.secure, self.machine
        assert sr is not None
        if sr.stage == Stage.ADVERTISE:
            waiting = tuple(d for d in m.selected if d not in sr.server.keys and d not in sr.lost)
            return self._tasks(rnd.Dispatch(m.round_id, waiting, m.deadline))
        return [Publish(f"dev/{r.device_id}/secagg_relay", secagg_to_bytes(sr.round_id, r.msg)) for r in sr.resend()]

    def _secure_received(self, ev: Received, now: float) -> list[Output]:
        sr = self.secure
        if sr is None:
            return [Dropped(ev.device_id, ev.kind, "no masked round is open")]
        try:
            round_id, msg = secagg_from_bytes(ev.payload)
        except WireFormatError as e:
            return [Dropped(ev.device_id, ev.kind, str(e))]
        if round_id != sr.round_id:
            return [Dropped(ev.device_id, ev.kind, f"round {round_id}, the open masked round is {sr.round_id}")]
        if getattr(msg, "device_id", None) != ev.device_id:
            return [Dropped(ev.device_id, ev.kind, "the message names another device than its topic")]
        return self._secure_feed(Arrived(ev.device_id, msg, hashlib.sha256(ev.payload).hexdigest(), now), now)

    def _secure_event(self, event: object, now: float) -> list[Output]:
        """A sync-machine Tick or DeviceLost while a masked round is open: the stages decide, not the deadline."""
        ev = Clock(now) if isinstance(event, rnd.Tick) else Gone(event.device_id, now)  # type: ignore[attr-defined]
        return self._secure_feed(ev, now)

    def _secure_feed(self, event: object, now: float) -> list[Output]:
        sr = self.secure
        assert sr is not None
        out: list[Output] = []
        for cmd in sr.handle(event):
            if isinstance(cmd, Relay):
                out.append(Publish(f"dev/{cmd.device_id}/secagg_relay", secagg_to_bytes(sr.round_id, cmd.msg)))
            elif isinstance(cmd, Refused):
                out.append(Dropped(cmd.device_id, "secagg", cmd.detail))
            elif isinstance(cmd, Summed):
                self.secure_sum = cmd.total
                out += self._machine(rnd.SecureClosed(cmd.device_ids, f"masked sum of {len(cmd.device_ids)} "
                                                                      "devices", now), now)
            elif isinstance(cmd, Aborted):
                out += self._machine(rnd.SecureClosed((), cmd.reason, now), now)
        return out

    def state_from_sum(self, total: np.ndarray) -> dict[int, np.ndarray]:
        """The model a masked round's unmasked sum ``total`` makes of the current state (what committing it stores):
        for an independent check of a run (``fleet/sim/faults.py`` recomputes the sum from the broker's traffic)."""
        kept = self.secure_sum
        self.secure_sum = np.asarray(total)
        try:
            return self._secure_state()
        finally:
            self.secure_sum = kept

    def _secure_state(self) -> dict[int, np.ndarray]:
        """The model after the masked round: FedAvg from the unmasked ``num, den`` (as ``RunningSums`` would; every
        device covers the whole support, so the denominator is the last entry, the sum of the weights); with DP,
        the noisy sum of clipped deltas over the round's goal, as central DP's ``dp_mean`` divides."""
        if self.secure_sum is None:
            raise RuntimeError("no masked sum to commit (a restarted coordinator abandons its masked round)")
        sa, dp = self._masking()
        parts = self.secure_sum if isinstance(self.secure_sum, tuple) else (self.secure_sum,)  # one sum per group
        if dp is None:
            sums = [split_dense_sums(p, sa.bits) for p in parts]
            delta = agg.to_int_delta(agg.mean_from_sums(np.sum([n for n, _ in sums], axis=0),
                                                        np.sum([d for _, d in sums], axis=0)))
        else:  # the noisy lattice sum -> real units over the public denominator (the goal) -> integer units
            lattice = np.sum([to_signed(p, sa.bits)[:-1] for p in parts], axis=0).astype(np.float64)
            real = lattice * (dp.clip / sa.resolution) / self.config.round.goal
            units = self.dp_units if self.dp_units is not None else 1.0
            delta = agg.to_int_delta(agg.Mean(real / units, np.ones(real.size, bool)))
        out, pos = {}, 0
        for t in self.shared:
            out[t.id] = agg.apply_int_delta(self.state[t.id], delta[pos:pos + t.numel])
            pos += t.numel
        return out
