"""The ``simulate`` config: the fleet config (``fleet/schema.py``) plus how the simulator emulates its devices.

The YAML is one flat file that ``serve`` reads too (it skips these keys). Every field has a default, so a config
only states what differs; all problems are reported at once with their key paths. Data and checks only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fleet.config import Size
from fleet.schema import FleetConfig, load_fleet_config

BACKENDS = ("python", "ray", "qemu", "renode")
QEMU_MACHINES = ("mps2-an386", "mps2-an500", "netduinoplus2")
BASELINES = ("local", "centralized")  # local-only training per device; fp32 on pooled data (fleet/sim/baselines.py)


@dataclass
class QemuConfig:
    """Emulated boards for ``backend: qemu`` / ``qemu_devices`` (fleet/sim/backends.py)."""

    machine: str = "mps2-an500"  # mps2-an500 (Cortex-M7), mps2-an386 (Cortex-M4), netduinoplus2 (STM32F405)
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
class RenodeConfig:
    """Renode boards for ``backend: renode`` (fleet/sim/renode.py): STM32F746 machines, several per Renode process."""

    elf: str | None = None  # firmware ELF (default: firmware/build/stm32f746/tinyfleet.elf)
    machines_per_process: int = 10  # boards per Renode process (one process: ~0.5 GB and ~5 s to start)
    quantum_us: float | None = None  # Renode's global quantum in microseconds of virtual time (None: its default)
    timeout: float = 300.0  # seconds one board command may take
    boot_timeout: float = 300.0  # seconds for every process to start and its boards to answer

    def validate(self) -> list[str]:
        errs = []
        if self.elf is not None and not Path(self.elf).is_file():
            errs.append(f"elf: file not found: {self.elf}")
        if isinstance(self.machines_per_process, bool) or not isinstance(self.machines_per_process, int) or \
                self.machines_per_process < 1:
            errs.append(f"machines_per_process: must be an integer >= 1, got {self.machines_per_process!r}")
        if self.quantum_us is not None and not self.quantum_us > 0:
            errs.append(f"quantum_us: must be > 0 microseconds, got {self.quantum_us}")
        if self.timeout <= 0 or self.boot_timeout <= 0:
            errs.append("timeout, boot_timeout: must be > 0 seconds")
        return errs


@dataclass
class ContinualConfig:
    """Continual evaluation (fleet/sim/continual.py): each device's stream in time order, tested then trained."""

    prequential: bool = True  # measure prequential accuracy per round for global, local and every method
    buffer_capacity: int = 0  # samples a device keeps (0: its whole stream)
    policies: list[str] = field(default_factory=lambda: ["fifo", "reservoir"])  # buffer policies compared
    drift: bool = True  # also run the drift case: halfway, each stream switches to another user's data

    def validate(self) -> list[str]:
        errs = []
        if isinstance(self.buffer_capacity, bool) or not isinstance(self.buffer_capacity, int) or self.buffer_capacity < 0:
            errs.append(f"buffer_capacity: must be a number of samples >= 0 (0: all), got {self.buffer_capacity!r}")
        if not isinstance(self.policies, list) or not self.policies or any(
                p not in ("fifo", "reservoir") for p in self.policies):
            errs.append(f"policies: expected a non-empty list drawn from fifo, reservoir, got {self.policies!r}")
        return errs


@dataclass
class BehaviourConfig:
    """How simulated devices behave in time (fleet/sim/behaviour.py, applied by fleet/sim/paced.py to host devices
    and boards alike): speed from instructions per step over the board's clock, sleep/wake duty cycles, dropouts
    mid-task, network delay. Off unless ``enabled``; seeded by the run's ``seed``. Simulated seconds pass at
    ``time_scale`` wall seconds each; the coordinator runs on the same clock, so its ``deadline``,
    ``heartbeat_timeout`` and ``async_rounds.task_timeout_s`` are simulated seconds too."""

    enabled: bool = False
    time_scale: float = 1.0  # wall seconds per simulated second (0.1: the fleet's time runs 10x faster)
    # instructions one local step takes: "auto" measures it on one emulated board per machine (QEMU -icount);
    # a number skips the measurement (host devices on a machine without QEMU)
    instructions_per_step: str | int = "auto"
    clock_hz: dict[str, float] = field(default_factory=dict)  # board -> core clock, over fleet.sim.behaviour.CLOCK_HZ
    speed_sigma: float = 0.3  # log-normal spread of device speed around its board's
    stragglers: float = 0.2  # fraction of devices straggler_factor times slower
    straggler_factor: float = 8.0
    sleepers: float = 0.3  # fraction of devices awake only sleeper_duty of every period_s (random phase)
    sleeper_duty: float = 0.5
    period_s: float = 600.0  # simulated seconds
    dropout: float = 0.05  # probability a task is lost mid-way (the device never answers it)
    delay_s: list[float] = field(default_factory=lambda: [0.05, 0.5])  # one-way network delay, uniform [lo, hi]

    def validate(self) -> list[str]:
        errs = []
        if not self.time_scale > 0:
            errs.append(f"time_scale: must be > 0 wall seconds per simulated second, got {self.time_scale}")
        ips = self.instructions_per_step
        if ips != "auto" and (isinstance(ips, bool) or not isinstance(ips, int) or ips < 1):
            errs.append(f"instructions_per_step: expected auto or an integer >= 1, got {ips!r}")
        for board, hz in self.clock_hz.items():
            if isinstance(hz, bool) or not isinstance(hz, (int, float)) or not hz > 0:
                errs.append(f"clock_hz.{board}: must be > 0 Hz, got {hz!r}")
        num = {k: getattr(self, k) for k in ("speed_sigma", "straggler_factor", "period_s", "stragglers", "sleepers",
                                             "dropout", "sleeper_duty")}
        rules = {"speed_sigma": (lambda v: v >= 0, ">= 0"), "straggler_factor": (lambda v: v >= 1, ">= 1"),
                 "period_s": (lambda v: v > 0, "> 0 simulated seconds"),
                 "stragglers": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
                 "sleepers": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
                 "dropout": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
                 "sleeper_duty": (lambda v: 0 < v <= 1, "in (0, 1] (the awake fraction of each period)")}
        for key, v in num.items():
            ok, want = rules[key]
            if not ok(v):
                errs.append(f"{key}: must be {want}, got {v}")
        d = self.delay_s
        if len(d) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in d) \
                or not 0 <= d[0] <= d[1]:
            errs.append(f"delay_s: expected [lo, hi] seconds with 0 <= lo <= hi, got {d!r}")
        return errs

    def model(self):
        """The :class:`fleet.sim.behaviour.BehaviourModel` this config describes."""
        from fleet.sim.behaviour import BehaviourModel

        return BehaviourModel(speed_sigma=self.speed_sigma, stragglers=self.stragglers,
                              straggler_factor=self.straggler_factor, sleepers=self.sleepers,
                              sleeper_duty=self.sleeper_duty, period_s=self.period_s, dropout=self.dropout,
                              delay_s=(float(self.delay_s[0]), float(self.delay_s[1])))

    def clock(self, board: str) -> float:
        """``board``'s core clock in Hz (``clock_hz`` first, then fleet.sim.behaviour.CLOCK_HZ)."""
        from fleet.sim.behaviour import CLOCK_HZ

        if board in self.clock_hz:
            return float(self.clock_hz[board])
        if board not in CLOCK_HZ:
            raise KeyError(f"behaviour.clock_hz: no clock known for board {board!r}: add `{board}: <Hz>`")
        return CLOCK_HZ[board]


@dataclass
class DeviceGroup:
    """``count`` devices of one kind in a mixed-memory fleet (``device_groups``, in device order): a QEMU board
    (``backend: qemu`` + ``machine``; its SRAM is the board YAML's training budget) or host devices with ``sram``."""

    count: int = 1
    backend: str = "python"  # python | qemu
    machine: str | None = None  # qemu: mps2-an500 | mps2-an386 | netduinoplus2
    sram: Size | None = None  # bytes the device reports in its hello (python: required; qemu: the board's budget)
    elf: str | None = None  # qemu: firmware ELF (default: built for the machine, as qemu.elf)

    def validate(self) -> list[str]:
        errs = []
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            errs.append(f"count: must be an integer >= 1, got {self.count!r}")
        if self.backend not in ("python", "qemu"):
            errs.append(f"backend: expected python or qemu, got {self.backend!r}")
        elif self.backend == "qemu" and self.machine not in QEMU_MACHINES:
            errs.append(f"machine: expected one of {', '.join(QEMU_MACHINES)}, got {self.machine!r}")
        if self.elf is not None and not Path(self.elf).is_file():
            errs.append(f"elf: file not found: {self.elf}")
        if self.backend == "python" and (self.machine is not None or not self.sram):
            errs.append("python devices: give sram (bytes of SRAM, e.g. 64KB) and no machine")
        return errs


@dataclass
class SimConfig(FleetConfig):
    """A fleet as ``tinyfleet simulate`` runs it: which backend each device uses, and the in-run baselines."""

    READS_DEVICE_DATA: ClassVar[bool] = True  # the simulator plays the devices: their files are checked at load

    backend: str = "python"  # python (host engine) | ray (host engine in Ray actors) | qemu | renode (boards)
    qemu_devices: int | None = None  # mixed fleet: the first N devices are QEMU boards, the rest use `backend`
    qemu: QemuConfig = field(default_factory=QemuConfig)
    renode: RenodeConfig = field(default_factory=RenodeConfig)
    workers: int | None = None  # processes for backend python devices (fleet/sim/workers.py); None: CPU count, 0: none
    ray_address: str | None = None  # backend ray: an existing Ray cluster; None: a local Ray instance for the run
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))  # measured in the same run; [] for none
    # users held out of training (a count: the last N devices of the scenario; or a list of device indices):
    # they join after the run, get the global model and personalize (fleet/sim/newusers.py)
    new_users: int | list[int] = 0
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    # mixed-memory fleet (with plan_budgets): device kinds in device order; their counts add up to `devices`
    device_groups: list[DeviceGroup] = field(default_factory=list)
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)  # device speed, sleep, dropouts, delay

    def validate(self) -> list[str]:
        errs = super().validate()
        if self.backend not in BACKENDS:
            errs.append(f"backend: expected one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            errs.append(f"workers: must be a number of processes >= 0 (0: devices on the runner's threads), "
                        f"got {self.workers!r}")
        if self.backend == "ray" and self.workers == 0:
            errs.append("workers: backend ray needs at least 1 Ray actor, got 0")
        if self.ray_address is not None and (self.backend != "ray" or not isinstance(self.ray_address, str)):
            errs.append(f"ray_address: a Ray cluster address for backend ray, got {self.ray_address!r} with "
                        f"backend {self.backend}")
        if self.qemu_devices is not None and not 0 <= self.qemu_devices <= self.devices:
            errs.append(f"qemu_devices: must be in 0..devices ({self.devices}), got {self.qemu_devices}")
        errs += self._new_user_errors()
        if self.device_groups:
            n = sum(g.count for g in self.device_groups if isinstance(g.count, int))
            if n != self.devices:
                errs.append(f"device_groups: counts add up to {n}, but devices is {self.devices}")
            if not self.plan_budgets:
                errs.append("device_groups: a mixed-memory fleet needs plan_budgets (one nested plan per budget)")
            if self.qemu_devices is not None or self.new_users:
                errs.append("device_groups: leave qemu_devices and new_users unset (groups say what each device is)")
        bad = [b for b in self.baselines if b not in BASELINES] if isinstance(self.baselines, list) else [self.baselines]
        if bad:
            errs.append(f"baselines: expected a list drawn from {', '.join(BASELINES)}, got {bad}")
        return errs


    def _new_user_errors(self) -> list[str]:
        nu = self.new_users
        if isinstance(nu, bool) or not isinstance(nu, (int, list)):
            return [f"new_users: expected a count or a list of device indices, got {nu!r}"]
        idx = self.new_user_indices() if isinstance(nu, list) else []
        if isinstance(nu, int) and not 0 <= nu < self.devices:
            return [f"new_users: must leave at least one fleet device: 0..{self.devices - 1}, got {nu}"]
        if isinstance(nu, list) and (any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.devices
                                         for i in nu) or len(set(idx)) != len(nu) or len(nu) >= self.devices):
            return [(f"new_users: expected distinct device indices in 0..{self.devices - 1}, fewer than devices, "
                     f"got {nu!r}")]
        held = len(idx) if isinstance(nu, list) else nu
        if self.goal is not None and self.goal > self.devices - held:
            return [f"goal: {self.goal} is more than the {self.devices} devices minus the {held} new users"]
        return []

    def new_user_indices(self) -> list[int]:
        """Scenario device indices held out as new users (ascending)."""
        nu = self.new_users
        if isinstance(nu, list):
            return sorted(nu)
        return list(range(self.devices - nu, self.devices)) if nu else []


def load_sim_config(path: str | Path, **overrides: Any) -> SimConfig:
    """Load a simulate config; ``overrides`` (e.g. ``devices=4`` from the CLI) are applied before validation."""
    return load_fleet_config(path, SimConfig, **overrides)
