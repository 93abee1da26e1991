"""Per-device token buckets: bursts pass, floods are refused, refills follow the clock, memory is bounded."""

from __future__ import annotations

from fleet.ratelimit import Buckets, RateLimit


def test_burst_passes_flood_is_refused_and_the_bucket_refills():
    # Prepare
    b = Buckets(RateLimit(rate=1.0, burst=2.0))
    # Execute
    first = [b.allow("d1", 0.0) for _ in range(3)]
    later = [b.allow("d1", 1.0), b.allow("d1", 1.0)]
    # Assert: two at once, the third refused; one token per second after that; other devices unaffected
    assert first == [True, True, False]
    assert later == [True, False]
    assert b.allow("d2", 1.0)


def test_rate_zero_turns_the_limit_off_and_keys_are_bounded():
    # Prepare
    off = Buckets(RateLimit(rate=0.0, burst=0.0))
    small = Buckets(RateLimit(rate=1.0, burst=1.0), max_keys=2)
    # Execute
    allowed = all(off.allow("d", 0.0) for _ in range(1000))
    for key in ("a", "b", "c"):
        small.allow(key, 0.0)
    # Assert
    assert allowed
    assert len(small._state) == 2 and "a" not in small._state
