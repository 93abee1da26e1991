"""The ``simulate`` / ``serve`` config tree (``configs/quickstart.yaml``): dataclasses loaded by fleet/config.py.

Every field has a default, so a config only states what differs; :func:`load_sim_config` reports all problems
at once with their key paths (``rounds: must be > 0, got -3``). This module holds data and checks only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.config import from_dict, load
from fleet.security.dp import DPConfig

DATASETS = ("watch", "shakespeare", "heart")  # loaders: fleet/sim/scenarios.py


@dataclass
class TlsConfig:
    """TLS files for ``mqtts://`` brokers (paths relative to the working directory)."""

    ca_file: str | None = None
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None
    insecure: bool = False  # skip the hostname check: self-signed dev certificates only

    def validate(self) -> list[str]:
        errs = []
        for name in ("ca_file", "cert_file", "key_file"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                errs.append(f"{name}: file not found: {p}")
        if (self.cert_file is None) != (self.key_file is None):
            errs.append("cert_file: a client certificate needs both cert_file and key_file")
        return errs


@dataclass
class DatasetConfig:
    """Which offline data, and how it is cut into windows and spread over devices."""

    name: str = "watch"
    window: int = 128  # samples per window (128 = 2.56 s at 50 Hz)
    stride: int = 64
    proxy_subjects: list[int] = field(default_factory=lambda: [1, 2])  # coordinator's data, no device
    max_train_per_device: int | None = None
    max_test_per_device: int | None = None  # evenly spaced test windows kept per device (evaluation cost)
    # shakespeare: window/stride in characters; users are (play, role)s with >= min_chars characters
    devices_per_user: int = 1
    proxy_users: int = 40  # roles with no device: the coordinator's proxy set
    min_chars: int = 4000
    max_proxy: int = 20000  # proxy windows kept (evenly sampled)
    # heart: fraction of each hospital's patients held out as the coordinator's proxy set (no device)
    proxy_fraction: float = 0.2

    def validate(self) -> list[str]:
        errs = []
        if self.name not in DATASETS:
            errs.append(f"name: unknown dataset {self.name!r} (expected one of {', '.join(DATASETS)})")
        if self.window < 8:
            errs.append(f"window: must be >= 8, got {self.window}")
        if self.stride <= 0:
            errs.append(f"stride: must be > 0, got {self.stride}")
        bad = [s for s in self.proxy_subjects if not 1 <= s <= 10]
        if bad and self.name == "watch":
            errs.append(f"proxy_subjects: subjects are 1..10, got {bad}")
        if len(set(self.proxy_subjects)) >= 10 and self.name == "watch":
            errs.append("proxy_subjects: at least one subject must be left for devices")
        if self.max_train_per_device is not None and self.max_train_per_device <= 0:
            errs.append(f"max_train_per_device: must be > 0, got {self.max_train_per_device}")
        if self.max_test_per_device is not None and self.max_test_per_device <= 0:
            errs.append(f"max_test_per_device: must be > 0, got {self.max_test_per_device}")
        for key in ("devices_per_user", "min_chars", "max_proxy"):
            if getattr(self, key) <= 0:
                errs.append(f"{key}: must be > 0, got {getattr(self, key)}")
        if self.proxy_users < 0:
            errs.append(f"proxy_users: must be >= 0, got {self.proxy_users}")
        if not 0 < self.proxy_fraction < 1:
            errs.append(f"proxy_fraction: must be a fraction in (0, 1), got {self.proxy_fraction}")
        return errs


@dataclass
class ModelConfig:
    """The model to compile: a factory in fleet/compiler/models.py, a board budget, a sparse scheme."""

    name: str = "imu_cnn"
    board: str = "stm32f746"  # configs/boards/<board>.yaml
    scheme: Any = "auto"  # "auto" (search under the budget), a named scheme, or a mapping layer -> settings
    pretrain_epochs: int = 5  # fp32 epochs on the proxy set before int8 conversion (0: random init)

    def validate(self) -> list[str]:
        errs = []
        if not isinstance(self.scheme, (str, dict)):
            errs.append(f"scheme: expected 'auto', a scheme name or a mapping, got {self.scheme!r}")
        if self.pretrain_epochs < 0:
            errs.append(f"pretrain_epochs: must be >= 0, got {self.pretrain_epochs}")
        return errs


BACKENDS = ("python", "qemu", "renode")
QEMU_MACHINES = ("mps2-an386", "mps2-an500")
BASELINES = ("local", "centralized")  # local-only training per device; fp32 on pooled data (fleet/sim/baselines.py)


@dataclass
class QemuConfig:
    """Emulated boards for ``backend: qemu`` / ``qemu_devices`` (fleet/sim/backends.py)."""

    machine: str = "mps2-an500"  # mps2-an500 (Cortex-M7) or mps2-an386 (Cortex-M4)
    elf: str | None = None  # firmware ELF (default: firmware/build/<an500|an386>/tinyfleet.elf)
    icount: bool = False  # deterministic virtual time (instruction count), ~2.3x slower
    timeout: float = 120.0  # seconds one board command may take (100 boards share 2 cores)

    def validate(self) -> list[str]:
        errs = []
        if self.machine not in QEMU_MACHINES:
            errs.append(f"machine: expected one of {', '.join(QEMU_MACHINES)}, got {self.machine!r}")
        if self.elf is not None and not Path(self.elf).is_file():
            errs.append(f"elf: file not found: {self.elf}")
        if self.timeout <= 0:
            errs.append(f"timeout: must be > 0 seconds, got {self.timeout}")
        return errs


@dataclass
class SimConfig:
    """One fleet: where the broker is, how many devices, how rounds run, what they train on."""

    name: str = "tinyfleet"  # fleet name: topics live under tinyfleet/<name>/
    broker: str = "embedded"  # "embedded" (mosquitto subprocess) or mqtt://[user:pass@]host:port / mqtts://
    tls: TlsConfig | None = None
    devices: int = 10
    rounds: int = 3
    local_steps: int = 20  # samples (batch 1) per device per round
    lr: float = 0.05
    goal: int | None = None  # deltas to collect before closing a round early (default: every selected device)
    quorum: float = 0.6  # fraction of the goal needed to commit; fewer -> the round is abandoned
    deadline: float = 60.0  # seconds a round waits for deltas
    over_selection: float = 1.0  # devices selected per round = ceil(goal * over_selection)
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    backend: str = "python"  # python (host engine) | qemu (one emulated board per device) | renode (not here)
    qemu_devices: int | None = None  # mixed fleet: the first N devices are QEMU boards, the rest use `backend`
    qemu: QemuConfig = field(default_factory=QemuConfig)
    workers: int | None = None  # processes for backend python devices (fleet/sim/workers.py); None: CPU count, 0: none
    personal: list[str] = field(default_factory=list)  # trainable tensors kept on each device, e.g. [classifier.bias]
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))  # measured in the same run; [] for none
    aggregator: str = "fedavg"  # fedavg | clipped | median | trimmed (fleet/aggregate.py)
    clip: float = 0.0  # L2 clip (integer weight units) for the clipped aggregator
    trim: float = 0.1  # fraction trimmed at each end for the trimmed aggregator
    dp: DPConfig | None = None  # central differential privacy (clip + Gaussian noise + RDP accountant)

    def validate(self) -> list[str]:
        errs = []
        if not self.name or "/" in self.name or "+" in self.name or "#" in self.name:
            errs.append(f"name: must be a non-empty MQTT topic level (no '/', '+', '#'), got {self.name!r}")
        if self.broker != "embedded" and not self.broker.startswith(("mqtt://", "mqtts://")):
            errs.append(f"broker: expected 'embedded' or mqtt://host:port / mqtts://host:port, got {self.broker!r}")
        if self.tls is not None and not self.broker.startswith("mqtts://"):
            errs.append("tls: given, but broker is not an mqtts:// URL")
        for key in ("devices", "rounds", "local_steps"):
            if getattr(self, key) <= 0:
                errs.append(f"{key}: must be > 0, got {getattr(self, key)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            errs.append(f"lr: must be a finite number > 0, got {self.lr}")
        if self.goal is not None and not 0 < self.goal <= self.devices:
            errs.append(f"goal: must be in 1..devices ({self.devices}), got {self.goal}")
        if not 0 < self.quorum <= 1:
            errs.append(f"quorum: must be a fraction in (0, 1], got {self.quorum}")
        if self.deadline <= 0:
            errs.append(f"deadline: must be > 0 seconds, got {self.deadline}")
        if self.over_selection < 1:
            errs.append(f"over_selection: must be >= 1, got {self.over_selection}")
        from fleet.aggregate import AGGREGATORS

        if self.aggregator not in AGGREGATORS:
            errs.append(f"aggregator: expected one of {', '.join(AGGREGATORS)}, got {self.aggregator!r}")
        elif self.aggregator == "clipped" and not self.clip > 0:
            errs.append(f"clip: must be > 0 for the clipped aggregator, got {self.clip}")
        if self.dp is not None and self.aggregator != "fedavg":
            errs.append(f"dp: replaces the aggregator with a clipped noisy mean; leave aggregator at fedavg, "
                        f"got {self.aggregator!r}")
        if self.backend not in BACKENDS:
            errs.append(f"backend: expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            errs.append(f"workers: must be a number of processes >= 0 (0: devices on the runner's threads), "
                        f"got {self.workers!r}")
        if self.qemu_devices is not None and not 0 <= self.qemu_devices <= self.devices:
            errs.append(f"qemu_devices: must be in 0..devices ({self.devices}), got {self.qemu_devices}")
        if not isinstance(self.personal, list) or not all(isinstance(n, str) and n for n in self.personal):
            errs.append(f"personal: expected a list of trainable tensor names (e.g. [classifier.bias]), "
                        f"got {self.personal!r}")
        bad = [b for b in self.baselines if b not in BASELINES] if isinstance(self.baselines, list) else [self.baselines]
        if bad:
            errs.append(f"baselines: expected a list drawn from {', '.join(BASELINES)}, got {bad}")
        return errs

    @property
    def goal_count(self) -> int:
        return self.goal if self.goal is not None else self.devices

    @property
    def quorum_count(self) -> int:
        return max(1, math.ceil(self.quorum * self.goal_count))

    @property
    def selected_count(self) -> int:
        return min(self.devices, math.ceil(self.goal_count * self.over_selection))

    def coordinator_config(self):
        """The coordinator's policy for this fleet (``simulate`` and ``serve`` build it the same way)."""
        from fleet import round as rnd
        from fleet.coordinator import CoordinatorConfig

        return CoordinatorConfig(round=rnd.RoundConfig(goal=self.goal_count, over_selection=self.over_selection,
                                                       quorum=self.quorum, deadline_s=self.deadline, seed=self.seed),
                                 lr=self.lr, local_steps=self.local_steps, batch_size=1, aggregator=self.aggregator,
                                 clip=self.clip, trim=self.trim, dp=self.dp)

    def tls_files(self) -> dict[str, object]:
        """Keyword arguments for :meth:`fleet.sim.broker.BrokerURL.parse`."""
        if self.tls is None:
            return {}
        t = self.tls
        return {"ca_file": t.ca_file, "cert_file": t.cert_file, "key_file": t.key_file, "tls_insecure": t.insecure}


def load_sim_config(path: str | Path, **overrides: Any) -> SimConfig:
    """Load a simulate config; ``overrides`` (e.g. ``devices=4`` from the CLI) are applied before validation."""
    if not overrides:
        return load(SimConfig, path)
    import yaml

    from fleet.config import ConfigError

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError([f"file not found: {path}"], str(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"YAML syntax: {e}"], str(path)) from None
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(SimConfig, data, str(path))
