"""The one fleet config schema: every bad value is one error with its key path, serve and simulate read one file."""

from __future__ import annotations

from dataclasses import fields

import pytest

from fleet.config import ConfigError
from fleet.schema import FleetConfig, load_fleet_config
from fleet.sim.config import SimConfig, load_sim_config
from tests.conftest import ROOT


def _write(tmp_path, text: str):
    p = tmp_path / "fleet.yaml"
    p.write_text(text)
    return p


def test_simulator_keys_are_exactly_the_simulators_extra_fields():
    # Prepare
    fleet = {f.name for f in fields(FleetConfig)}
    sim = {f.name for f in fields(SimConfig)}
    # Assert: serve skips exactly the keys the simulator adds, so one YAML serves both
    assert sim - fleet == FleetConfig.SIMULATOR_KEYS


@pytest.mark.parametrize("text, message", [
    ("trim: 0.7\naggregator: trimmed\n", "trim: must be a fraction in [0, 0.5), got 0.7"),
    ("topk_permille: 1001\n", "topk_permille: must be in 0..1000"),
    ("rounds: -3\n", "rounds: must be > 0, got -3"),
    ("deadline: 0\n", "deadline: must be > 0 seconds"),
    ("over_selection: 0.5\n", "over_selection: must be >= 1"),
    ("quorum: 0\n", "quorum: must be a fraction in (0, 1]"),
    ("heartbeat_timeout: -1\n", "heartbeat_timeout: must be >= 0"),
    ("dataset: {name: mnist}\n", "dataset.name: unknown dataset 'mnist'"),
    ("aggregator: clipped\n", "clip: must be > 0 for the clipped aggregator"),
    ("aggregation_workers: -1\n", "aggregation_workers: must be an integer >= 0"),
    ("aggregation_workers: 2\naggregator: median\n", "aggregation_workers: partial sums serve sync FedAvg rounds"),
])
def test_every_bad_value_is_one_error_with_its_key_path_for_serve_and_simulate(tmp_path, text, message):
    # Prepare
    path = _write(tmp_path, text)
    for load in (load_fleet_config, load_sim_config):
        # Execute
        with pytest.raises(ConfigError) as e:
            load(path)
        # Assert
        assert message in str(e.value)


def test_serve_reads_a_simulate_file_and_skips_only_the_simulator_keys(tmp_path):
    # Prepare
    path = _write(tmp_path, "backend: qemu\nworkers: 0\nrounds: 2\nbogus: 1\n")
    # Execute
    with pytest.raises(ConfigError) as e:
        load_fleet_config(path)
    # Assert: the simulator's keys pass, an unknown key does not
    assert "bogus: unknown key" in str(e.value) and "backend" not in str(e.value).split("(expected")[0]
    # Execute
    cfg = load_fleet_config(_write(tmp_path, "backend: qemu\nworkers: 0\nrounds: 2\ntopk_permille: 20\n"))
    # Assert: the derived coordinator policy carries the fleet's values
    assert type(cfg) is FleetConfig and cfg.rounds == 2
    assert cfg.coordinator_config().topk_permille == 20


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_for_serve_and_simulate(name):
    # Execute
    fleet = load_fleet_config(ROOT / "configs" / name)
    sim = load_sim_config(ROOT / "configs" / name)
    # Assert
    assert fleet.coordinator_config() == sim.coordinator_config()
