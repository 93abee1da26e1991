"""How simulated devices behave in time: training speed, sleep/wake duty cycles, dropouts mid-task, network delay.

A :class:`BehaviourModel` (the distribution, seeded) draws one :class:`DeviceBehaviour` per device; each answers
pure questions about a simulated clock (is it awake at t, when does a job of w awake-seconds started at t finish).
Nothing here runs devices, sleeps or reads a wall clock: a simulator asks it (``benchmarks/async_rounds.py`` on a
discrete-event clock, ``tinyfleet simulate`` through ``fleet/sim/paced.py`` on a scaled wall clock).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Core clock of each board a config can name (configs/boards/*.yaml; QEMU machines by their model): a device's
# step time is its measured instructions per step over this. NOTE: QEMU's mps2 boards are FPGA images clocked at
# 25 MHz; a fleet that means "a Cortex-M7 at 216 MHz" names stm32f746 (QEMU emulates it with mps2-an500).
CLOCK_HZ = {"stm32f746": 216e6, "mps2-an500": 25e6, "mps2-an386": 25e6, "netduinoplus2": 168e6}


@dataclass(frozen=True)
class DeviceBehaviour:
    """One device: ``step_s`` seconds per local training step (awake time); awake ``duty`` of every ``period_s``
    from ``phase_s`` on (duty 1: always awake); each task lost mid-way with probability ``dropout``; every message
    takes ``delay_s`` to cross the network."""

    step_s: float
    period_s: float = 600.0
    duty: float = 1.0
    phase_s: float = 0.0
    dropout: float = 0.0
    delay_s: float = 0.1

    def awake(self, t: float) -> bool:
        return self.duty >= 1.0 or (t + self.phase_s) % self.period_s < self.duty * self.period_s

    def next_wake(self, t: float) -> float:
        """The first instant >= t at which the device is awake."""
        if self.awake(t):
            return t
        pos = (t + self.phase_s) % self.period_s
        return t + (self.period_s - pos)

    def next_sleep(self, t: float) -> float:
        """The first instant > t at which an awake device falls asleep (inf if it never sleeps)."""
        if self.duty >= 1.0:
            return math.inf
        pos = (t + self.phase_s) % self.period_s
        if pos >= self.duty * self.period_s:  # NOTE: a wake instant whose phase rounded to just below the period
            return self.next_wake(t) + self.duty * self.period_s  # (else this lies in the past: flips forever)
        return t + (self.duty * self.period_s - pos)

    def finish(self, t: float, work_s: float) -> float:
        """When ``work_s`` seconds of awake time started at ``t`` are done (work pauses while asleep)."""
        t = self.next_wake(t)
        while True:
            end = self.next_sleep(t)
            if t + work_s <= end:
                return t + work_s
            work_s -= end - t
            t = self.next_wake(end)


@dataclass(frozen=True)
class BehaviourModel:
    """The fleet's distribution: step time log-normal around ``step_s`` (sigma ``speed_sigma``), a fraction
    ``stragglers`` ``straggler_factor`` times slower, a fraction ``sleepers`` awake ``sleeper_duty`` of every
    ``period_s`` (random phase), per-task ``dropout``, delays uniform in ``delay_s``."""

    step_s: float = 0.5
    speed_sigma: float = 0.3
    stragglers: float = 0.2
    straggler_factor: float = 8.0
    sleepers: float = 0.3
    sleeper_duty: float = 0.5
    period_s: float = 600.0
    dropout: float = 0.05
    delay_s: tuple[float, float] = (0.05, 0.5)

    def draw(self, n: int, seed: int, base_step_s: list[float] | None = None) -> list[DeviceBehaviour]:
        """``n`` devices; ``base_step_s`` (per device, e.g. its board's instructions per step over its clock)
        replaces ``step_s`` as the centre of each device's speed. The same seed gives the same fleet."""
        rng = np.random.default_rng([seed, 15])
        base = np.full(n, self.step_s) if base_step_s is None else np.asarray(base_step_s, np.float64)
        if base.shape != (n,) or not (np.isfinite(base).all() and (base > 0).all()):
            raise ValueError(f"base_step_s: expected {n} step times > 0 seconds, got {base_step_s!r}")
        step = base * np.exp(rng.normal(0.0, self.speed_sigma, n))
        slow = rng.permutation(n) < round(self.stragglers * n)
        asleep = rng.permutation(n) < round(self.sleepers * n)
        phase = rng.uniform(0.0, self.period_s, n)
        delay = rng.uniform(*self.delay_s, n)
        return [DeviceBehaviour(float(step[i] * (self.straggler_factor if slow[i] else 1.0)), self.period_s,
                                self.sleeper_duty if asleep[i] else 1.0, float(phase[i]), self.dropout,
                                float(delay[i])) for i in range(n)]

    def summary(self, devices: list[DeviceBehaviour]) -> dict:
        steps = np.array([d.step_s for d in devices])
        return {"devices": len(devices), "step_s_median": round(float(np.median(steps)), 3),
                "step_s_max_over_min": round(float(steps.max() / steps.min()), 1),
                # NOTE: against the fast tail, not the median: with half the fleet straggling the median is one
                "stragglers": int(sum(d.step_s > np.percentile(steps, 10) * self.straggler_factor / 2
                                      for d in devices)),
                "sleepers": int(sum(d.duty < 1.0 for d in devices)), "duty_of_sleepers": self.sleeper_duty,
                "period_s": self.period_s, "dropout_per_task": self.dropout, "delay_s": list(self.delay_s)}


def awake_intervals(device: DeviceBehaviour, until: float) -> list[tuple[float, float]]:
    """The [start, end) intervals of ``[0, until)`` in which ``device`` is awake (who was awake when)."""
    out, t = [], device.next_wake(0.0)
    while t < until:
        end = min(device.next_sleep(t), until)
        out.append((t, end))
        t = device.next_wake(end + 1e-9) if end < until else until
    return out
