"""The coordinator's vocabulary: the events it handles, the outputs it returns, and its (derived) policy."""

from __future__ import annotations

from dataclasses import dataclass, field

from device_agent.wire.messages import Publish
from fleet import round as rnd
from fleet.coordinator.async_round import AsyncConfig
from fleet.ratelimit import RateLimit
from fleet.security.dp import DPConfig
from fleet.security.secagg_config import SecureAggregationConfig


@dataclass(frozen=True)
class Received:
    """A device message: ``kind`` is the last topic level (hello | status | delta), ``device_id`` the <id> level."""

    kind: str
    device_id: str
    payload: bytes


@dataclass(frozen=True)
class Claimed:
    """A delta an aggregation worker already read (:func:`fleet.coordinator.deltas.read_delta`): the coordinator
    judges it by ``header`` without decoding it again and stores ``payload``; the worker sums it once told it was
    accepted. ``header`` is None when the reader refused the payload (``reject``, ``detail`` say why)."""

    device_id: str
    payload: bytes
    content_hash: str
    header: object | None  # fleet.round.Upload
    reject: int = 0  # fleet.round.Reject value when header is None
    detail: str = ""


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
    nbytes: int = 0  # the delta's payload size
    content_hash: str = ""  # sha256 of the payload (hex): which bytes this verdict is about


@dataclass(frozen=True)
class Dropped:
    """Informational: a control message that was refused (state unchanged)."""

    device_id: str
    kind: str
    detail: str


@dataclass(frozen=True)
class DeviceFailed:
    """Informational: a device reported it cannot train ``round_id`` (a ``failed`` status); if that is the open
    round and it was selected, the round stops waiting for it."""

    device_id: str
    round_id: int
    reason: str


@dataclass(frozen=True)
class Unfit:
    """Informational: a device said hello with less SRAM than the smallest plan needs; it was told why (an ack
    ``no_plan_fits``) and is never selected while its hello says so."""

    device_id: str
    sram: int
    need: int
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


Output = Publish | Verdict | Dropped | DeviceFailed | RoundClosed | RoundRefused | Unfit


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
    control_limit: RateLimit = field(default_factory=lambda: RateLimit(20.0, 100.0))  # hello+status per device/s
    delta_limit: RateLimit = field(default_factory=lambda: RateLimit(10.0, 50.0))  # deltas per device/s (0: off)
    mode: str = "sync"  # sync: rounds (``round``) | async: buffered asynchronous aggregation (``asynchronous``)
    asynchronous: AsyncConfig = field(default_factory=AsyncConfig)
    max_versions: int = 0  # async: close the session once this many versions were published (0: never)
    secure_aggregation: SecureAggregationConfig | None = None  # masked uploads (fleet/security/secagg.py)

    def validate(self) -> list[str]:
        """What this module can check of the async policy (the fleet schema checks the rest); empty when valid."""
        if self.mode not in MODES:
            return [f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}"]
        return self.asynchronous.validate("asynchronous.") if self.mode == "async" else []


MODES = ("sync", "async")


def plan_sram(plan) -> int:
    """Bytes a board needs to train ``plan``: the arena plus the trainable tensors held in SRAM."""
    return int(plan.arena_bytes) + sum(t.nbytes for t in plan.trainable)
