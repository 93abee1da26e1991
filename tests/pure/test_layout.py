"""The import contracts in pyproject.toml cover the whole tree: a new fleet module cannot slip past the leaf rule."""

from __future__ import annotations

import tomllib

from tests.conftest import ROOT


def test_simulator_leaf_contract_names_every_fleet_module_but_the_cli_and_the_simulator():
    # Prepare
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (leaf,) = [c for c in cfg["contracts"] if c["forbidden_modules"] == ["fleet.sim"]]
    tree = {p.stem if p.is_file() else p.name for p in (ROOT / "fleet").iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    # Assert
    assert {m.removeprefix("fleet.") for m in leaf["source_modules"] if m.startswith("fleet.")} == tree - {"cli", "sim"}
    assert "device_agent" in leaf["source_modules"]
