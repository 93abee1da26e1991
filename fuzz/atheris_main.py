"""The atheris (libFuzzer for Python) entry point shared by ``fuzz_<target>.py``: instruments
``device_agent.wire`` for coverage, then fuzzes one function of :mod:`targets`. libFuzzer flags pass through
(``-runs=N``, ``-max_total_time=S``, ``-timeout=S``, corpus directories); see docs/formats.md "Robustness"."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))


def run(name: str) -> None:
    import atheris

    with atheris.instrument_imports(include=["device_agent.wire"]):
        from targets import TARGETS
    target = TARGETS[name]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
