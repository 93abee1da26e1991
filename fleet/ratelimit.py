"""Per-device rate limits for what devices publish (token buckets, pure: the caller passes the clock).

A device that floods its topics (hello/status or deltas) gets its excess messages refused before anything is
decoded, so one misbehaving or malicious device cannot starve the others of the coordinator's time. It refuses
to grow without bound: past ``max_keys`` tracked devices the longest-idle one is forgotten (a full bucket).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    """``rate`` messages per second sustained, ``burst`` at once; ``rate == 0`` turns the limit off."""

    rate: float
    burst: float


class Buckets:
    """Token buckets keyed by (device, kind). ``allow(key, now)`` takes one token if there is one.

    Example (hand-checkable): ``RateLimit(rate=1, burst=2)``: at t=0 two messages pass and the third is refused;
    at t=1 one more passes (one token refilled).
    """

    def __init__(self, limit: RateLimit, max_keys: int = 100_000):
        self.limit, self.max_keys = limit, max_keys
        self._state: OrderedDict[object, tuple[float, float]] = OrderedDict()  # key -> (tokens, last time)

    def allow(self, key: object, now: float) -> bool:
        if self.limit.rate <= 0:
            return True
        tokens, last = self._state.pop(key, (self.limit.burst, now))
        tokens = min(self.limit.burst, tokens + max(0.0, now - last) * self.limit.rate)
        ok = tokens >= 1.0
        self._state[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self._state) > self.max_keys:
            self._state.popitem(last=False)
        return ok
