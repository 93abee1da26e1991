"""The one fleet config schema (``configs/*.yaml``): what ``serve`` and ``simulate`` both read, validated once.

:class:`FleetConfig` holds the fleet (broker, rounds, policy, model, data set); the simulator's config
(``fleet/sim/config.py``) extends it with how devices are emulated. The coordinator's own policy objects
(:class:`fleet.coordinator.CoordinatorConfig`, :class:`fleet.round.RoundConfig`) are derived from a validated
config by :meth:`FleetConfig.coordinator_config` and are never validated again. Every bad value is one error
with its key path (``rounds: must be > 0, got -3``); this module holds data and checks only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from fleet.config import Size, from_dict, read_yaml
from fleet.coordinator.async_round import AsyncConfig
from fleet.security.dp import DPConfig
from fleet.security.secagg_config import SecureAggregationConfig

T = TypeVar("T")


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
    """Which offline data, and how it is cut into windows and spread over devices.

    Own data (the ``npz`` scenario, fleet/scenarios/npz.py): ``devices: dir/`` (one ``.npz`` per device, sorted by
    name) or ``files: [a.npz, ...]``, each with float ``x`` ``(N, *model.input_shape)`` and integer labels ``y``;
    ``proxy: file.npz`` is the coordinator's calibration/pretraining data. Paths are relative to the config file.
    """

    name: str = "watch"  # watch | shakespeare | heart | npz (implied by `devices` or `files`)
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
    # npz: own data, one file per device (x float, y int; optional x_test/y_test, else the last test_fraction)
    devices: str | None = None  # folder of .npz files, one per device (sorted by file name)
    files: list[str] | None = None
    proxy: str | None = None  # .npz (x, y): the coordinator's data (calibration, pretraining, scheme search)
    test_fraction: float = 0.3  # npz: each device's last samples held out for evaluation when it has no x_test

    def __post_init__(self) -> None:
        if (self.devices is not None or self.files is not None) and self.name == "watch":
            self.name = "npz"  # NOTE: `devices:`/`files:` say which scenario; `name: npz` may be left out

    def validate(self) -> list[str]:
        errs = []
        from fleet.scenarios import DATASETS

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
        return errs + self._npz_errors()

    def _npz_errors(self) -> list[str]:
        own = self.devices is not None or self.files is not None
        if self.name != "npz":
            return [f"{k}: only for own data (name: npz), got name {self.name!r}"
                    for k, v in (("devices", self.devices), ("files", self.files), ("proxy", self.proxy))
                    if v is not None]
        if not own:
            return ["name: npz needs `devices: DIR/` (one .npz per device) or `files: [a.npz, ...]`"]
        if self.devices is not None and self.files is not None:
            return ["devices: give either `devices: DIR/` or `files: [...]`, not both"]
        if not 0 <= self.test_fraction < 1:
            return [f"test_fraction: must be a fraction in [0, 1), got {self.test_fraction}"]
        return []


@dataclass
class ModelConfig:
    """The model to compile: a name the compiler pipeline knows (fleet/compiler/pipeline.py), a board, a scheme."""

    name: str = "imu_cnn"
    board: str = "stm32f746"  # configs/boards/<board>.yaml
    scheme: Any = "auto"  # "auto" (search under the budget), a named scheme, or a mapping layer -> settings
    pretrain_epochs: int = 5  # fp32 epochs on the proxy set before int8 conversion (0: random init; not with weights)
    # own model (instead of `name`): a torch nn.Module class built with no arguments, found in `root`
    torch: str | None = None  # "module:Class", e.g. model:DigitsCNN for model.py next to the config
    weights: str | None = None  # state dict file (torch.save(model.state_dict(), path)); relative to the config
    input_shape: list[int] | None = None  # per-sample input shape the model reads, e.g. [1, 8, 8]
    root: str | None = None  # folder `torch` is imported from (default: the config file's folder)

    def validate(self) -> list[str]:
        errs = []
        if not isinstance(self.scheme, (str, dict)):
            errs.append(f"scheme: expected 'auto', a scheme name or a mapping, got {self.scheme!r}")
        if self.pretrain_epochs < 0:
            errs.append(f"pretrain_epochs: must be >= 0, got {self.pretrain_epochs}")
        if self.torch is not None:
            mod, sep, cls = self.torch.partition(":")
            if not (sep and mod and cls):
                errs.append(f"torch: expected 'module:Class' (e.g. model:DigitsCNN for model.py), got {self.torch!r}")
            if self.input_shape is not None and (not self.input_shape or any(
                    isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.input_shape)):
                errs.append(f"input_shape: expected positive integers per sample, e.g. [1, 8, 8], "
                            f"got {self.input_shape!r}")
        else:
            errs += [f"{k}: only with an own model (model.torch: module:Class)" for k in ("weights", "input_shape")
                     if getattr(self, k) is not None]
        return errs

    def torch_shape(self) -> tuple[int, ...] | None:
        """The per-sample shape the own torch model reads (None: a built-in model)."""
        return tuple(self.input_shape) if self.torch is not None and self.input_shape else None


@dataclass
class EvaluationConfig:
    """Coordinator-side evaluation: ``serve`` scores every committed model version on this held-out set."""

    data: str = ""  # .npz with x (float, or int8 quantized like the plan's input) and y; relative to the config

    def validate(self) -> list[str]:
        return [] if self.data else ["data: required: an .npz with arrays x and y (e.g. data: test.npz)"]


@dataclass
class RateLimitsConfig:
    """Per-device limits on what devices publish; excess messages are refused before decoding (0: no limit)."""

    control_per_s: float = 20.0  # hello + status messages per second, sustained (a simulated round can take 0.3 s)
    control_burst: float = 100.0
    delta_per_s: float = 10.0
    delta_burst: float = 50.0

    def validate(self) -> list[str]:
        errs = [f"{k}: must be >= 0, got {getattr(self, k)}" for k in ("control_per_s", "delta_per_s")
                if not getattr(self, k) >= 0]
        return errs + [f"{k}: must be >= 1, got {getattr(self, k)}" for k in ("control_burst", "delta_burst")
                       if not getattr(self, k) >= 1]


PERSONAL_METHODS = ("ditto", "finetune", "head", "bias")  # device_agent/engine/personal.py METHODS (fallback order)


@dataclass
class PersonalizationConfig:
    """How each device builds its personal model (device_agent/engine/personal.py, docs/personalization.md)."""

    method: str | None = None  # ditto | finetune | head | bias; None: no personal model beyond `personal`
    steps: int = 20  # local steps on the device's buffer after each model update
    lr: float | None = None  # None: the fleet's lr
    ditto_lambda: float = 0.1  # Ditto's pull toward the global model per step (lr * lambda), in [0, 1]
    new_user_steps: int = 30  # simulate: steps a new user personalizes for after joining
    compare: list[str] = field(default_factory=lambda: list(PERSONAL_METHODS))  # simulate: methods measured
    device_sram: list[int] = field(default_factory=list)  # SRAM budget per device (bytes, cycled); []: the board's
    lr_grid: list[float] = field(default_factory=list)  # simulate: lr multipliers of the lr rule (tune_lr); []: none
    validation: str = "last"  # simulate: samples a device holds back for tune_lr / select: last | per_label | stored
    validation_gap: int = 0  # simulate: samples dropped before each held-back tail (overlapping windows)

    def validate(self) -> list[str]:
        errs = []
        if self.method is not None and self.method not in PERSONAL_METHODS:
            errs.append(f"method: expected one of {', '.join(PERSONAL_METHODS)}, got {self.method!r}")
        for key in ("steps", "new_user_steps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                errs.append(f"{key}: must be a number of steps >= 0, got {v!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            errs.append(f"lr: must be a finite number > 0 (or absent: the fleet's lr), got {self.lr!r}")
        if not (isinstance(self.ditto_lambda, (int, float)) and 0 <= self.ditto_lambda <= 1):
            errs.append(f"ditto_lambda: must be in [0, 1], got {self.ditto_lambda!r}")
        if not isinstance(self.compare, list) or any(m not in PERSONAL_METHODS for m in self.compare):
            errs.append(f"compare: expected a list drawn from {', '.join(PERSONAL_METHODS)}, got {self.compare!r}")
        if not isinstance(self.device_sram, list) or any(
                isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in self.device_sram):
            errs.append(f"device_sram: expected a list of SRAM budgets in bytes (> 0), got {self.device_sram!r}")
        if not isinstance(self.lr_grid, list) or any(
                isinstance(g, bool) or not isinstance(g, (int, float)) or not (g > 0 and math.isfinite(g))
                for g in self.lr_grid):
            errs.append(f"lr_grid: expected a list of lr multipliers > 0, got {self.lr_grid!r}")
        if self.validation not in ("last", "per_label", "stored"):  # fleet/sim/personalize.py VALIDATION_RULES
            errs.append(f"validation: expected one of last, per_label, stored, got {self.validation!r}")
        if isinstance(self.validation_gap, bool) or not isinstance(self.validation_gap, int) or self.validation_gap < 0:
            errs.append(f"validation_gap: must be a number of samples >= 0, got {self.validation_gap!r}")
        return errs

    @property
    def lam_q15(self) -> int:
        return round(self.ditto_lambda * 32768)


@dataclass
class FleetConfig:
    """One fleet: where the broker is, how many devices, how rounds run, what they train on."""

    # NOTE: keys only `tinyfleet simulate` reads (fleet/sim/config.py validates them); `serve` skips them, so
    # one YAML file serves both. tests/pure/test_config.py keeps this list equal to the simulator's extra fields.
    SIMULATOR_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"backend", "qemu_devices", "qemu", "renode", "workers", "ray_address", "baselines", "new_users", "continual",
         "device_groups", "behaviour"})

    # NOTE: a coordinator holds no device's data: `serve` checks (and later reads) only the proxy and evaluation
    # files of own data; the simulator, which plays the devices too, checks every device file
    READS_DEVICE_DATA: ClassVar[bool] = False

    name: str = "tinyfleet"  # fleet name: topics live under tinyfleet/<name>/
    broker: str = "embedded"  # "embedded" (simulate only: a mosquitto subprocess) or mqtt://[user:pass@]host:port
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
    personal: list[str] = field(default_factory=list)  # trainable tensors kept on each device, e.g. [classifier.bias]
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    aggregator: str = "fedavg"  # fedavg | clipped | median | trimmed (fleet/aggregate.py)
    clip: float = 0.0  # L2 clip (integer weight units) for the clipped aggregator
    trim: float = 0.1  # fraction trimmed at each end for the trimmed aggregator
    topk_permille: int = 0  # devices upload the top ceil(numel * k / 1000) per tensor (error feedback); 0 = all
    heartbeat_timeout: float = 0.0  # seconds of silence before a device counts as offline (0 = Last Will only)
    dp: DPConfig | None = None  # central differential privacy (clip + Gaussian noise + RDP accountant)
    secure_aggregation: SecureAggregationConfig | None = None  # masked uploads: the coordinator sees only the sum
    rate_limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    mode: str = "sync"  # sync | async: buffered asynchronous rounds (docs/protocol.md "Asynchronous mode")
    async_rounds: AsyncConfig = field(default_factory=AsyncConfig)  # read only when mode is async
    evaluation: EvaluationConfig | None = None  # serve: accuracy of every committed version on held-out data
    # mixed-memory fleet: one nested plan per SRAM budget (fleet/compiler/family.py); each device trains the largest
    # plan that fits the SRAM in its hello. Empty: one plan under the board's budget.
    plan_budgets: list[Size] = field(default_factory=list)
    # processes that read and sum deltas beside the coordinator, fed by an MQTT 5 shared subscription
    # (fleet/coordinator/pool.py); 0: the coordinator reads every delta itself
    aggregation_workers: int = 0

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
        if not (self.deadline > 0 and math.isfinite(self.deadline)):
            errs.append(f"deadline: must be > 0 seconds, got {self.deadline}")
        if not self.over_selection >= 1:
            errs.append(f"over_selection: must be >= 1, got {self.over_selection}")
        if not self.heartbeat_timeout >= 0:
            errs.append(f"heartbeat_timeout: must be >= 0 seconds (0: Last Will only), got {self.heartbeat_timeout}")
        errs += self._policy_errors()
        if self.model.torch is not None or self.dataset.name == "npz" or self.evaluation is not None:
            from fleet.scenarios.npz import own_data_errors  # NOTE: reads the files: own model and data only

            errs += own_data_errors(self, devices=self.READS_DEVICE_DATA)
        if not isinstance(self.personal, list) or not all(isinstance(n, str) and n for n in self.personal):
            errs.append(f"personal: expected a list of trainable tensor names (e.g. [classifier.bias]), "
                        f"got {self.personal!r}")
        return errs

    def _policy_errors(self) -> list[str]:
        from fleet.aggregate import AGGREGATORS

        errs = []
        if self.aggregator not in AGGREGATORS:
            errs.append(f"aggregator: expected one of {', '.join(AGGREGATORS)}, got {self.aggregator!r}")
        elif self.aggregator == "clipped" and not self.clip > 0:
            errs.append(f"clip: must be > 0 for the clipped aggregator, got {self.clip}")
        if not 0 <= self.trim < 0.5:
            errs.append(f"trim: must be a fraction in [0, 0.5), got {self.trim}")
        if isinstance(self.topk_permille, bool) or not 0 <= self.topk_permille <= 1000:
            errs.append(f"topk_permille: must be in 0..1000 (0 = every coordinate), got {self.topk_permille!r}")
        if self.mode not in ("sync", "async"):
            errs.append(f"mode: expected sync or async, got {self.mode!r}")
        elif self.mode == "async":  # NOTE: from_dict already ran AsyncConfig.validate on the async_rounds section
            k = self.async_rounds.buffer_size
            if isinstance(k, int) and not isinstance(k, bool) and k > self.devices:
                errs.append(f"async_rounds.buffer_size: must be <= devices ({self.devices}): a version takes one "
                            f"delta from each of K devices, got {k}")
        if self.dp is not None and self.aggregator != "fedavg":  # NOTE: DP's sensitivity is for the clipped sum
            errs.append(f"dp: replaces the aggregator with a clipped noisy mean; leave aggregator at fedavg, "
                        f"got {self.aggregator!r}")
        if self.secure_aggregation is not None:  # NOTE: masking needs the same support on every device, and sums only
            errs += self.secure_aggregation.combination_errors(
                self.dp is not None, self.mode, self.dp.noise_multiplier if self.dp is not None else 1.0)
            if self.topk_permille:
                errs.append(f"secure_aggregation: top-k uploads put each device's delta on its own support, which "
                            f"masks cannot cover; set topk_permille: 0, got {self.topk_permille}")
            if self.aggregator != "fedavg":
                errs.append(f"secure_aggregation: the coordinator sees only the sum, so only fedavg can aggregate, "
                            f"got aggregator {self.aggregator!r}")
        if self.plan_budgets:
            errs += self._family_errors()
        w = self.aggregation_workers
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            errs.append(f"aggregation_workers: must be an integer >= 0 (0: the coordinator reads every delta), got {w!r}")
        elif w and (self.mode != "sync" or self.aggregator != "fedavg" or self.dp is not None
                    or self.secure_aggregation is not None):
            # NOTE: workers hand over sums; robust aggregators and DP need every row, masked and async rounds
            # judge deltas with state a worker does not see
            errs.append("aggregation_workers: partial sums serve sync FedAvg rounds only (no dp, no "
                        "secure_aggregation, aggregator fedavg, mode sync); set aggregation_workers: 0")
        return errs

    def _family_errors(self) -> list[str]:
        b = self.plan_budgets
        errs = []
        if not isinstance(b, list) or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in b):
            return [f"plan_budgets: expected a list of SRAM sizes > 0 (e.g. [64KB, 128KB, 256KB]), got {b!r}"]
        if len(set(b)) != len(b):
            errs.append(f"plan_budgets: budgets must be distinct, got {b!r}")
        if self.mode != "sync":  # NOTE: the async machine judges every delta against one plan
            errs.append(f"plan_budgets: nested plans run in sync rounds only; set mode: sync, got {self.mode!r}")
        if self.secure_aggregation is not None:
            errs.append("plan_budgets: secure aggregation masks one support shared by every device; a family has "
                        "one per plan: drop secure_aggregation or plan_budgets")
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
        """The coordinator's policy for this fleet, derived (not validated again): ``serve`` and ``simulate``."""
        from fleet import round as rnd
        from fleet.coordinator import CoordinatorConfig
        from fleet.ratelimit import RateLimit

        r = self.rate_limits
        return CoordinatorConfig(round=rnd.RoundConfig(goal=self.goal_count, over_selection=self.over_selection,
                                                       quorum=self.quorum, deadline_s=self.deadline, seed=self.seed),
                                 lr=self.lr, local_steps=self.local_steps, batch_size=1, aggregator=self.aggregator,
                                 clip=self.clip, trim=self.trim, topk_permille=self.topk_permille,
                                 heartbeat_timeout=self.heartbeat_timeout, dp=self.dp,
                                 control_limit=RateLimit(r.control_per_s, r.control_burst),
                                 delta_limit=RateLimit(r.delta_per_s, r.delta_burst),
                                 mode=self.mode, asynchronous=self.async_rounds,
                                 max_versions=self.rounds if self.mode == "async" else 0,
                                 secure_aggregation=self.secure_aggregation)

    def tls_files(self) -> dict[str, object]:
        """Keyword arguments for :meth:`device_agent.mqtt.BrokerURL.parse`."""
        if self.tls is None:
            return {}
        t = self.tls
        return {"ca_file": t.ca_file, "cert_file": t.cert_file, "key_file": t.key_file, "tls_insecure": t.insecure}


def load_fleet_config(path: str | Path, cls: type[T] = FleetConfig, **overrides: Any) -> T:  # type: ignore[assignment]
    """Load ``path`` into ``cls`` (FleetConfig or a subclass); ``overrides`` (e.g. ``rounds=4`` from a CLI flag)
    are applied before validation. For plain :class:`FleetConfig` the simulator's keys are skipped, not refused.
    """
    data = read_yaml(path)
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
        if cls is FleetConfig:
            data = {k: v for k, v in data.items() if k not in FleetConfig.SIMULATOR_KEYS}
        _relative_to(data, Path(path).resolve().parent)
    return from_dict(cls, data, str(path))


# section -> keys holding a path, resolved against the config file's folder (a list: every item)
PATH_KEYS = {"model": ("weights",), "dataset": ("devices", "files", "proxy"), "evaluation": ("data",)}


def _relative_to(data: dict, base: Path) -> None:
    """Make the config's relative paths relative to its own folder, and ``model.root`` default to that folder."""
    def fix(v: Any) -> Any:
        return str(base / v) if isinstance(v, str) and not Path(v).is_absolute() else v

    for section, keys in PATH_KEYS.items():
        sec = data.get(section)
        if not isinstance(sec, dict):
            continue
        for k in keys:
            if k in sec:
                sec[k] = [fix(v) for v in sec[k]] if isinstance(sec[k], list) else fix(sec[k])
    model = data.get("model")
    if isinstance(model, dict) and "torch" in model:
        model["root"] = fix(model.get("root", "."))
