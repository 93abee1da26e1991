"""Shared test plumbing: markers by folder, requirement checks (skip locally, fail in CI), model paths."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fleet.compiler.mit_import import default_models_dir

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
MODELS = default_models_dir()
IN_CI = os.environ.get("TINYFLEET_CI") == "1"
GROUPS = ("pure", "broker", "firmware", "e2e")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in GROUPS:
            item.add_marker(getattr(pytest.mark, parts[0]))


def require(ok: bool, why: str) -> None:
    """Skip with a reason locally; fail in CI, where `make setup` must have installed everything."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"CI requirement missing: {why}")
    pytest.skip(why)


def require_cmd(*names: str) -> None:
    for n in names:
        require(shutil.which(n) is not None or Path("/usr/sbin", n).exists(), f"`{n}` not installed (run `make setup`)")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """../shared/models/mit-han-lab; skips cleanly (even in CI) when the model files are absent."""
    if not (MODELS / "mbv2-w0.35.pkl").exists():
        pytest.skip(f"MIT int8 models not found at {MODELS}")
    return MODELS
