"""A value of the wrong type is one error: the checks that would only see its placeholder (0 for a bad integer) and
report consequences of it stay quiet; independent problems are still all reported."""

from __future__ import annotations

import pytest

from fleet.config import ConfigError
from fleet.schema import load_fleet_config
from fleet.sim.config import load_sim_config


def _errors(tmp_path, load, text: str) -> list[str]:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path)
    return e.value.errors


@pytest.mark.parametrize("load", [load_fleet_config, load_sim_config])
@pytest.mark.parametrize("value", ["ten", "2.5", "true", "[4]"])
def test_a_non_integer_devices_is_one_error(tmp_path, load, value):
    # Execute
    errors = _errors(tmp_path, load, f"devices: {value}\n")
    # Assert: not also "devices: must be > 0, got 0" nor a new_users error about a fleet of 0 devices
    assert len(errors) == 1, errors
    assert errors[0].startswith("devices: expected an integer, got")


def test_every_wrong_type_is_reported_and_other_objects_are_still_checked(tmp_path):
    # Execute: two wrong types at the top, a bad value in a section whose own values are well typed
    errors = _errors(tmp_path, load_sim_config, "devices: ten\nrounds: many\nqemu: {timeout: -1}\n")
    # Assert
    assert sorted(errors) == ["devices: expected an integer, got 'ten'", "qemu.timeout: must be > 0 seconds, got -1.0",
                              "rounds: expected an integer, got 'many'"]


def test_a_wrong_type_in_a_section_is_one_error_there_too(tmp_path):
    # Execute: the section's own check would repeat it ("must be an integer >= 1, got 0")
    errors = _errors(tmp_path, load_sim_config, "renode: {machines_per_process: lots}\n")
    # Assert
    assert errors == ["renode.machines_per_process: expected an integer, got 'lots'"]


def test_semantic_errors_are_still_all_collected_when_every_type_is_right(tmp_path):
    # Execute
    errors = _errors(tmp_path, load_sim_config, "devices: 0\nrounds: -3\n")
    # Assert
    assert "devices: must be > 0, got 0" in errors and "rounds: must be > 0, got -3" in errors
