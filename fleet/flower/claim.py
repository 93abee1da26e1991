"""Who serves a fleet through Flower, and where its numbering stands: two retained messages, pure (no I/O).

- ``flower/lock`` — the ServerApp run that serves the fleet now: its unique MQTT client id, Flower run id and an
  expiry it refreshes (:data:`LOCK_TTL_S`). Empty (deleted) when no run holds it: a run deletes it when it ends,
  and its Last Will deletes it when it dies. A lock past its expiry is free (a broker that lost the will).
- ``flower/state`` — the last round id a Flower run handed out and the model version it published, so the next
  run continues both (devices ignore tasks for older rounds and models that are not newer than theirs).

:func:`winner` decides a race of two ServerApps starting together: every subscriber of ``flower/lock`` sees
the same order of publications, so "the first lock published while the lock was free" names one run for all.
This module refuses malformed payloads with :class:`ValueError`; it never guesses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

LOCK_TOPIC, STATE_TOPIC = "flower/lock", "flower/state"
LOCK_TTL_S = 30.0  # a holder refreshes its lock every third of this


class FleetBusy(RuntimeError):
    """Another ServerApp run serves this fleet (the message says which one and until when)."""


@dataclass(frozen=True)
class Lock:
    holder: str  # the holder's MQTT client id (unique per ServerApp run)
    run_id: int  # its Flower run id
    since: float  # wall clock (s)
    expires: float  # wall clock (s): refreshed every LOCK_TTL_S / 3 while the run lives

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> Lock | None:
        """None for an empty payload (no holder); ValueError for anything else that is not a lock."""
        if not payload:
            return None
        d = _object(payload, "flower/lock")
        try:
            return cls(str(d["holder"]), int(d["run_id"]), float(d["since"]), float(d["expires"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"flower/lock: expected holder, run_id, since, expires; got {sorted(d)}") from None

    def live(self, now: float) -> bool:
        return self.expires > now

    def busy_message(self, fleet: str, now: float) -> str:
        return (f"fleet {fleet!r} is already served by Flower run {self.run_id} (MQTT client {self.holder}, "
                f"its lock expires in {self.expires - now:.0f} s unless renewed): wait for that run to end or stop "
                f"it; a lock left by a lost broker clears itself at expiry, or now with "
                f"`mosquitto_pub -r -n -t tinyfleet/{fleet}/{LOCK_TOPIC}`")


@dataclass(frozen=True)
class State:
    last_round: int  # the last round id handed out (0: none)
    version: int  # the last model version published (0: none)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> State | None:
        if not payload:
            return None
        d = _object(payload, "flower/state")
        try:
            s = cls(int(d["last_round"]), int(d["version"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"flower/state: expected last_round and version, got {sorted(d)}") from None
        if s.last_round < 0 or s.version < 0:
            raise ValueError(f"flower/state: negative round or version: {s}")
        return s


def _object(payload: bytes, what: str) -> dict:
    try:
        d = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        d = None
    if isinstance(d, dict):
        return d
    raise ValueError(f"{what}: expected a JSON object, got {payload[:40]!r}")


def winner(retained: Lock | None, claims: list[Lock | None], now: float) -> Lock | None:
    """The run that holds the fleet: the retained lock if it is live, else the first live claim published after
    it (``claims`` in the order the broker delivered them to any one subscriber). None: nobody."""
    if retained is not None and retained.live(now):
        return retained
    return next((c for c in claims if c is not None and c.live(now)), None)
