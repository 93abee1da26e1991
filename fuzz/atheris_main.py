"""The atheris (libFuzzer for Python) entry point shared by ``fuzz_<target>.py``: instruments
``device_agent.wire`` for coverage, then fuzzes one function of :mod:`targets`. libFuzzer flags pass through
(``-runs=N``, ``-max_total_time=S``, ``-timeout=S``, corpus directories); see docs/formats.md "Robustness"."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))


def repeat_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's mutations, and one in four times a slice of 1-8 bytes repeated up to ~2000 times.

    NOTE: nesting depth is invisible to coverage (json's scanner is C), and libFuzzer inserts at most 128
    repeated bytes per step, so deep nesting (``[`` x 1000, RecursionError) is out of its reach without this.
    """
    import random

    import atheris

    rng = random.Random(seed)
    if not data or rng.random() < 0.75:
        return atheris.Mutate(data, max_size)
    at = rng.randrange(len(data))
    piece = data[at: at + rng.randint(1, 8)]
    times = min(rng.choice((10, 100, 500, 1000, 2000)), max(1, (max_size - len(data)) // len(piece)))
    return (data[:at] + piece * times + data[at:])[:max_size]


def run(name: str) -> None:
    import atheris

    with atheris.instrument_imports(include=["device_agent.wire"]):
        from targets import TARGETS
    target = TARGETS[name]
    atheris.Setup(sys.argv, target, custom_mutator=repeat_mutator if name in REPEAT_TARGETS else None)
    atheris.Fuzz()


REPEAT_TARGETS = frozenset({"messages"})  # text formats whose depth matters
