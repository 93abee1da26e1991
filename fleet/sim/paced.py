"""A device behaviour (fleet/sim/behaviour.py) applied to live MQTT device agents, host devices and boards alike.

:class:`PacedAgent` is a :class:`~device_agent.mqtt.DeviceAgent` whose incoming messages reach its protocol when
the device's behaviour says so, on a simulated clock that runs ``time_scale`` wall seconds per simulated second
(one :class:`Pacer` thread for the fleet):
- every message arrives after the device's network delay, and the device handles its messages one at a time;
- a task is handled (the protocol trains and publishes its delta) once the device has spent ``local_steps x
  step_s`` of awake time on it: training pauses while the device sleeps;
- a task is lost mid-way with the device's dropout probability: the device never answers it;
- a device falls asleep on its duty cycle (it publishes an ``offline`` status; messages wait, as in a persistent
  MQTT session) and wakes (hello + ``online`` status, then its queued messages).
The behaviour clock starts when every device has said hello (:meth:`Pacer.start`). The protocol, the training and
the bytes are untouched: this module only decides when. It refuses to change what a device computes or sends.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable

import numpy as np

from device_agent.mqtt import DeviceAgent
from fleet.sim.behaviour import DeviceBehaviour


class Pacer:
    """The fleet's simulated clock and one thread that runs each scheduled action at its simulated time."""

    def __init__(self, time_scale: float, clock: Callable[[], float] = time.monotonic):
        self.scale, self.clock = float(time_scale), clock
        self.t0: float | None = None
        self._heap: list = []
        self._seq = 0
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="pacer", daemon=True)
        self.events: list[tuple[float, str, str]] = []  # (simulated s, device, sleep | wake | task | delta | dropout)
        self.errors: list[str] = []
        self.agents: list[PacedAgent] = []

    def start(self) -> None:
        """Simulated time 0 is now: every device's duty cycle starts (devices asleep at 0 go offline)."""
        with self._cv:
            self.t0 = self.clock()
        for a in self.agents:
            a.begin()
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def now(self) -> float:
        """Simulated seconds since :meth:`start` (0 before it)."""
        return 0.0 if self.t0 is None else (self.clock() - self.t0) / self.scale

    def at(self, t: float, action: Callable[[], None]) -> None:
        """Run ``action`` at simulated time ``t`` (actions due at the same time run in the order scheduled)."""
        with self._cv:
            self._seq += 1
            heapq.heappush(self._heap, (t, self._seq, action))
            self._cv.notify_all()

    def note(self, t: float, device: str, what: str) -> None:
        with self._cv:
            self.events.append((round(t, 3), device, what))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._heap or self._heap[0][0] > self.now()):
                    wait = (self._heap[0][0] - self.now()) * self.scale if self._heap else 1.0
                    self._cv.wait(min(max(wait, 0.001), 1.0))
                if self._stopped:
                    return
                _, _, action = heapq.heappop(self._heap)
            try:
                action()
            except Exception as e:  # noqa: BLE001  NOTE: one device's failure must not stop every other clock
                self.errors.append(f"{type(e).__name__}: {e}")


class PacedAgent(DeviceAgent):
    """A device agent that lives by ``behaviour`` on ``pacer``'s clock (``seed``: its dropout draws)."""

    def __init__(self, *args, behaviour: DeviceBehaviour, pacer: Pacer, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.behaviour, self.pacer = behaviour, pacer
        self.awake = True  # until the clock starts: the fleet connects and says hello first
        self._busy = 0.0  # simulated time the device is done with everything it has received
        self._rng = np.random.default_rng([seed, 27])
        self._lock = threading.Lock()
        pacer.agents.append(self)

    def begin(self) -> None:
        """Simulated time 0: asleep now, or schedule the first sleep."""
        b = self.behaviour
        if not b.awake(0.0):
            self._flip(0.0)
        elif b.next_sleep(0.0) < float("inf"):
            self.pacer.at(b.next_sleep(0.0), lambda: self._flip(b.next_sleep(0.0)))

    def _flip(self, t: float) -> None:
        from device_agent.protocol import Start

        b = self.behaviour
        if self.awake:  # falls asleep: says so (the broker queues what comes next)
            self.awake = False
            self.pacer.note(t, self.device_id, "sleep")
            with self._handle_lock:
                out = self.protocol.status("offline")
            self.endpoint.publish(self._topic(out.topic), out.payload, out.retain)
            wake = b.next_wake(t + 1e-6)
            self.pacer.at(wake, lambda: self._flip(wake))
            return
        self.awake = True
        self.pacer.note(t, self.device_id, "wake")
        DeviceAgent._post(self, Start(), None)  # hello + online status, before its queued messages
        sleep = b.next_sleep(t)
        if sleep < float("inf"):
            self.pacer.at(sleep, lambda: self._flip(sleep))

    def _post(self, event: object, ack: Callable[[], None] | None) -> None:
        from device_agent.protocol import Received, Start
        from device_agent.wire.messages import MessageError, Task, parse

        if self.pacer.t0 is None:  # before the clock starts: connecting, hello
            super()._post(event, ack)
            return
        if isinstance(event, Start):
            if self.awake:  # a reconnect while awake announces itself now; asleep: the wake will
                super()._post(event, ack)
            return
        if not isinstance(event, Received):
            super()._post(event, ack)
            return
        b = self.behaviour
        with self._lock:
            now = self.pacer.now()
            begin = b.next_wake(max(now + b.delay_s, self._busy))
            if event.kind != "task":
                self._busy = begin
                self.pacer.at(begin, lambda: DeviceAgent._post(self, event, ack))
                return
            try:
                steps = parse(event.payload, Task).local_steps
            except MessageError:
                steps = 0  # the protocol refuses it (and says why) when it gets it
            if self._rng.random() < b.dropout:  # lost mid-way: busy until then, never answered
                self._busy = b.finish(begin, self._rng.random() * steps * b.step_s)
                self.pacer.note(self._busy, self.device_id, "dropout")
                if ack is not None:
                    ack()
                return
            self._busy = b.finish(begin, steps * b.step_s)
            done = self._busy
        self.pacer.note(begin, self.device_id, "task")
        self.pacer.at(done, lambda: self._deliver(done, event, ack))

    def _deliver(self, t: float, event: object, ack) -> None:
        self.pacer.note(t, self.device_id, "delta")
        DeviceAgent._post(self, event, ack)


def draw_fleet(cfg, plan, kinds: list[tuple[str, str | None]]) -> tuple[list[DeviceBehaviour], dict]:
    """Each device's behaviour for a run of ``cfg`` (a SimConfig with ``behaviour.enabled``), from ``kinds`` =
    per device (backend, QEMU machine or None for a host device): its step time is its board's instructions per
    step (measured on one emulated board per machine, or ``behaviour.instructions_per_step``) over the clock of
    the board it emulates (a host device: ``model.board``; a QEMU board: the board YAML of its machine). Returns
    the behaviours and what they came from (for metrics.json)."""
    from fleet.compiler.pipeline import BOARDS
    from fleet.config import BoardConfig, load
    from fleet.sim.backends import measure_instructions_per_step
    from fleet.sim.errors import SimulationError

    bc = cfg.behaviour
    boards = [load(BoardConfig, p) for p in sorted(BOARDS.glob("*.yaml"))]
    by_name = {b.name: b for b in boards}
    by_machine = {b.qemu_machine: b.name for b in boards if b.qemu_machine}
    host_board = by_name.get(cfg.model.board)
    host_machine = (host_board.qemu_machine if host_board is not None else None) or cfg.qemu.machine
    measured: dict[str, int] = {}
    steps, rows = [], []
    for backend, machine in kinds:
        m = machine if backend == "qemu" and machine else host_machine
        board = by_machine.get(m, m) if backend == "qemu" else cfg.model.board
        if bc.instructions_per_step == "auto":
            if m not in measured:
                measured[m] = measure_instructions_per_step(cfg, plan, m)
            insns = measured[m]
        else:
            insns = int(bc.instructions_per_step)
        try:
            hz = bc.clock(board)
        except KeyError as e:
            raise SimulationError(str(e.args[0])) from None
        steps.append(insns / hz)
        rows.append({"board": board, "instructions_per_step": insns, "clock_hz": hz})
    model = bc.model()
    devices = model.draw(len(kinds), cfg.seed, steps)
    info = {"model": model.summary(devices) if devices else {}, "time_scale": bc.time_scale,
            "instructions_per_step": measured or bc.instructions_per_step,
            "devices": [{**r, "step_s": round(d.step_s, 6), "duty": d.duty, "period_s": d.period_s,
                         "phase_s": round(d.phase_s, 3), "dropout": d.dropout, "delay_s": round(d.delay_s, 4)}
                        for r, d in zip(rows, devices)]}
    return devices, info
