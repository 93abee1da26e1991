"""Device backends for ``tinyfleet simulate``: who runs a simulated device's local training.

- ``python``: the host engine (``device_agent.engine.trainer.Trainer``); devices live in ``workers`` processes
  (fleet/sim/workers.py; ``workers: 0``: on the runner's small thread pool).
- ``ray``: the same host devices in ``workers`` Ray actors (fleet/sim/ray_pool.py) on a local Ray instance, or
  on the cluster at ``ray_address``.
- ``qemu``: one emulated board per device (``qemu-system-arm``, mps2-an500 by default) running our firmware; the
  board holds the plan (LOAD_PLAN at boot) and the device agent drives it through
  :class:`device_agent.bridge.BoardTrainer` (the plan is provisioned in each board's flash image, PRELOAD_PLAN,
  else sent with LOAD_PLAN): the device's samples are stored on the board once, as its sensor
  stream (STORE_SAMPLES, ``DeviceSlot.on_samples``), and a round's steps are one TRAIN_LIST of stored slots.
  Board I/O blocks on a socket, so board devices get a pool with one worker per board: the boards train
  concurrently while the host thread waits (idle boards sleep in WFI and cost no CPU).
- ``renode``: one Renode STM32F746 machine per device, several per Renode process (fleet/sim/renode.py), driven
  exactly like the QEMU boards; Renode is found on PATH or as ``$TINYFLEET_RENODE``, else refused with that reason.

A fleet may mix backends (``qemu_devices: N`` in the config: the first N devices are boards, the rest use
``backend``). This module builds trainers and owns the boards' lifetime; it implements no protocol logic.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FIRMWARE_DIR = Path(__file__).resolve().parents[2] / "firmware"

from fleet.sim.config import BACKENDS, SimConfig
from fleet.sim.errors import SimulationError


@dataclass
class DeviceSlot:
    """One simulated device's trainer and the executor its agent handles messages on (None: the runner's pool)."""

    backend: str
    trainer: object
    executor: object | None = None
    host: object | None = None  # python devices in worker processes: the fleet/sim/workers.WorkerPool
    on_samples: Callable | None = None  # a board's sensor stream: (x, y) -> Future, called when samples arrive


@dataclass
class QemuFleet:
    """The boards of one run (for benchmarks and error messages)."""

    boards: list = field(default_factory=list)  # device_agent.board.QemuBoard
    clients: list = field(default_factory=list)  # device_agent.board.BoardClient
    elf: Path | None = None
    boot_seconds: float = 0.0  # QEMU launched, UART connected and the plan loaded on every board
    trainers: list = field(default_factory=list)  # LazyBoardTrainer, one per board
    booted_at: float = 0.0  # time.monotonic() when every board was up

    def pids(self) -> list[int]:
        return [b._proc.pid for b in self.boards if getattr(b, "_proc", None) is not None]


# Boards boot with the plan provisioned in their flash image (QEMU's generic loader at the plan store; the firmware
# runs the plan reader on it at boot) instead of LOAD_PLAN over the UART; benchmarks/fleet_qemu.py can turn it off.
PRELOAD_PLAN = True
# QEMU's CPU priority below the runner's (0: the same). Measured on the shared 2-core machine, 100 boards: +5 let
# tasks reach the boards sooner but the boards then lost CPU to other processes (round 34 s vs 11 s at 0).
BOARD_NICE = 0

# Observers called with each QemuFleet once all its boards are up (benchmarks/fleet_qemu.py reads timings, pids).
FLEET_OBSERVERS: list[Callable[[QemuFleet], None]] = []


class LazyBoardTrainer:
    """A :class:`~device_agent.bridge.BoardTrainer` that talks to the board only when it must.

    Host -> board bytes are the expensive direction in QEMU (its CMSDK UART takes one byte per main-loop turn:
    tens of microseconds of host CPU per byte), so:
    - the device's samples go to the board once, when its stream delivers them (``stream_samples``: STORE_SAMPLES
      into the board's sample store, in the background on ``executor``), not with every step;
    - ``load_trainable`` only records the state: the device protocol loads the round's base before training,
      again after it (to drop the trained values) and then the next model. The state goes to the board (one
      LOAD_UPDATE) right before the next step or read, and not at all when the board already holds exactly that
      state untrained.
    - ``train_step`` queues the step (the sample's identity, label + bytes); the queued steps run as one
      TRAIN_LIST of stored slots (the same samples in the same order: bit-identical to training them one by one)
      before the board's state is read, loaded or the learning rate changes.
    """

    MAX_QUEUED = 32  # steps queued before a TRAIN_LIST

    def __init__(self, board, executor=None):
        self.board = board
        self.plan = board.plan
        self.executor = executor
        self._pending: dict | None = None
        # the state the board holds untrained: after LOAD_PLAN, the plan's own values (the first model usually)
        self._held: dict | None = {t.id: np.asarray(t.data) for t in self.plan.trainable if not t.personal}
        self._queue: list[bytes] = []
        self._lr = 0.0
        self._streaming = None  # Future of the last stream_samples transfer
        self._lock = threading.Lock()  # one conversation with the board at a time
        self.uploads = 0
        self.stream_done_at = 0.0  # monotonic time the last stream_samples transfer ended

    def stream_samples(self, x, y) -> Future:
        """New samples from the device's sensor stream: stored on the board (in the background with an
        executor); every later board call waits for them. Returns the transfer's Future."""
        x, y = np.array(x, copy=True), np.array(y, copy=True)
        if self.executor is None:
            done: Future = Future()
            with self._lock:
                done.set_result(self.board.store_samples(x, y))
            self.stream_done_at = time.monotonic()
            return done
        prev = self._streaming

        def run():
            if prev is not None:
                prev.result()
            with self._lock:
                self.board.store_samples(x, y)
            self.stream_done_at = time.monotonic()

        self._streaming = self.executor.submit(run)
        return self._streaming

    def _wait_stream(self) -> None:
        if self._streaming is not None:
            f, self._streaming = self._streaming, None
            f.result()  # a failed transfer raises here, in the device's own call

    def load_trainable(self, state: dict) -> None:
        self._pending = {tid: np.array(v, copy=True) for tid, v in state.items()}

    def _flush(self) -> None:
        self._wait_stream()
        with self._lock:
            self._train_queued()
            if self._pending is None:
                return
            st, self._pending = self._pending, None
            if self._held is not None and st.keys() == self._held.keys() and all(
                    np.array_equal(np.ravel(st[k]), np.ravel(self._held[k])) for k in st):
                return
            self.board.load_trainable(st)
            self._held = st
            self.uploads += 1

    def _train_queued(self) -> None:
        if not self._queue:
            return
        steps, self._queue = self._queue, []
        r = self.board.train_steps(steps, self._lr)
        if r["steps_done"] != len(steps):
            raise RuntimeError(f"board trained {r['steps_done']} steps, {len(steps)} were queued")

    def train_step(self, x, y, lr):
        from device_agent.engine.trainer import StepStats

        if self._pending is not None or (self._queue and lr != self._lr) or len(self._queue) >= self.MAX_QUEUED:
            self._flush()
        x, y = np.asarray(x), np.asarray(y).reshape(-1)
        tin = self.board.input
        if x.shape[0] != 1 or y.shape != (1,) or x.shape[1:] != tuple(tin.shape):
            raise ValueError(f"a board trains one sample of shape {tuple(tin.shape)} per step (batch_size 1), "
                             f"got x {x.shape}, y {y.shape}")
        self._queue.append(self.board.sample_key(x[0], y[0]))
        self._held = None
        self._lr = lr
        return StepStats(float("nan"), 0, 1)

    @property
    def lock(self) -> threading.Lock:
        """Held during every conversation with the board (a masked round's commands take it too)."""
        return self._lock

    def personalizer(self, spec):
        """A :class:`~device_agent.bridge.BoardPersonalizer` on this board (its PERSONAL_SETUP after the stream)."""
        from device_agent.bridge import BoardPersonalizer

        self._wait_stream()
        with self._lock:
            return BoardPersonalizer(self.board, spec)

    def personal_board(self):
        """The board holding exactly the current model update, untrained (pending load and queued steps done), for
        its BoardPersonalizer."""
        self._flush()
        return self.board

    def trainable_state(self) -> dict:
        self._flush()
        with self._lock:
            return self.board.trainable_state()

    def state_hash(self) -> str:
        self._flush()
        with self._lock:
            return self.board.state_hash()

    @property
    def memory(self) -> dict[str, int]:
        """The board's own measurement (see :attr:`device_agent.bridge.BoardTrainer.memory`)."""
        with self._lock:
            return self.board.memory


def device_backends(cfg: SimConfig) -> list[str]:
    """The backend of each device, in device order."""
    if cfg.qemu_devices is not None:
        n = min(cfg.qemu_devices, cfg.devices)
        return ["qemu"] * n + [cfg.backend if cfg.backend != "qemu" else "python"] * (cfg.devices - n)
    return [cfg.backend] * cfg.devices


def build_devices(cfg: SimConfig, plan, stack: ExitStack, on_board: Callable[[int], None] | None = None) -> list[
        DeviceSlot]:
    """One :class:`DeviceSlot` per device; boards are stopped when ``stack`` closes."""
    from device_agent.engine.trainer import Trainer

    kinds = device_backends(cfg)
    unknown = sorted(set(kinds) - set(BACKENDS))
    if unknown:
        raise SimulationError(f"backend: unknown backend {unknown[0]!r} (expected one of {', '.join(BACKENDS)})")
    n_qemu, n_renode = kinds.count("qemu"), kinds.count("renode")
    if n_qemu and n_renode:
        raise SimulationError("backend: one emulator per run (qemu_devices with backend: renode is not supported)")
    if n_renode:
        from fleet.sim.renode import start_renode_fleet

        boards = start_renode_fleet(cfg, plan, n_renode, stack, on_board)
    else:
        boards = start_qemu_fleet(cfg, plan, n_qemu, stack, on_board) if n_qemu else []
    slots, it = [], iter(boards)
    executor = None
    n_boards = n_qemu + n_renode
    if n_boards:
        # NOTE: one worker per board: a worker mostly waits on its board's socket (GIL released)
        executor = ThreadPoolExecutor(max_workers=min(n_boards, 128), thread_name_prefix="boards")
        stack.callback(executor.shutdown, wait=False, cancel_futures=True)
        # NOTE: sample transfers get their own pool: a device call waiting for its transfer must not hold the
        # worker the transfer needs
        streams = ThreadPoolExecutor(max_workers=min(n_boards, 64), thread_name_prefix="streams")
        stack.callback(streams.shutdown, wait=False, cancel_futures=True)
        for b in boards:
            b.executor = streams
    for kind in kinds:
        if kind in ("qemu", "renode"):
            trainer = next(it)
            slots.append(DeviceSlot(kind, trainer, executor, on_samples=trainer.stream_samples))
        else:  # python or ray: the host engine (in this process, worker processes or Ray actors)
            slots.append(DeviceSlot("python", Trainer(plan)))
    return _python_workers(cfg, plan, slots, stack)


def _python_workers(cfg: SimConfig, plan, slots: list[DeviceSlot], stack: ExitStack) -> list[DeviceSlot]:
    """Move the python devices into ``cfg.workers`` processes, or Ray actors with ``backend: ray`` (None: one per
    CPU; 0: stay on the runner's threads).

    Device i of the python ones goes to worker i % N, with that worker's one handler thread as its executor."""
    import os

    from fleet.sim.workers import WorkerError, WorkerPool

    idx = [i for i, s in enumerate(slots) if s.backend == "python"]
    n = min((os.cpu_count() or 1) if cfg.workers is None else cfg.workers, len(idx))
    if n < 1:
        return slots
    if cfg.backend == "ray":
        from fleet.sim.ray_pool import RayPool

        try:
            pool: WorkerPool = RayPool(n, plan, cfg.ray_address)
        except WorkerError as e:
            raise SimulationError(str(e)) from None
    else:
        pool = WorkerPool(n, plan)
    stack.callback(pool.close)
    for k, i in enumerate(idx):
        pool.placement[i] = k % n
        slots[i] = DeviceSlot("python", None, executor=pool.executors[k % n], host=pool)
    return slots


def start_qemu_fleet(cfg: SimConfig, plan, n: int, stack: ExitStack,
                     on_board: Callable[[int], None] | None = None) -> list:
    """Launch ``n`` boards, connect to each UART, load ``plan``; returns their BoardTrainers."""
    from device_agent.board import (
        BoardClient,
        BoardError,
        QemuBoard,
        elf_load_ranges,
        elf_symbol,
        firmware_elf,
        firmware_target,
    )
    from device_agent.board_secagg import SealingBoardTrainer  # = BoardTrainer unless a masked round seals
    from device_agent.engine.trainer import Trainer
    from device_agent.wire.plan import plan_to_bytes

    q = cfg.qemu
    if shutil.which("qemu-system-arm") is None:
        raise SimulationError("backend qemu: `qemu-system-arm` not on PATH (Debian: apt-get install "
                              "qemu-system-arm; see ../shared/EMULATION.md)")
    src = Path(q.elf) if q.elf else firmware_elf(q.machine)
    target = firmware_target(q.machine)
    if not q.elf:  # the default ELF is ours: an incremental make keeps it current with the sources
        r = subprocess.run(["make", "-s", "-C", str(FIRMWARE_DIR), target], capture_output=True, text=True,
                           check=False)
        if r.returncode != 0:
            raise SimulationError(f"backend qemu: `make -C firmware {target}` failed:\n{r.stderr[-2000:]}")
    if not src.is_file():
        raise SimulationError(f"backend qemu: firmware {src} not built: run `make -C firmware {target}` "
                              "(or set qemu.elf)")
    # a private copy: a rebuild of firmware/build during the run must not change what later boards boot
    tmp = Path(tempfile.mkdtemp(prefix="tinyfleet-qemu-"))
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    elf = tmp / "tinyfleet.elf"
    shutil.copyfile(src, elf)
    fleet = QemuFleet(elf=elf)
    stack.callback(lambda: [c.close() for c in fleet.clients])
    stack.callback(lambda: [b.stop() for b in fleet.boards])  # runs before the clients close (LIFO): fine either way
    t0 = time.monotonic()
    blob, preload, initial = plan_to_bytes(plan), [], ""
    if PRELOAD_PLAN:  # the plan in each board's flash image (its plan store): no plan bytes cross the UART
        try:
            at = elf_symbol(elf, "__store_start")
            # an older ELF zero-fills the store start at load: QEMU would refuse the overlap
            if not any(lo < at + len(blob) and at < hi for lo, hi in elf_load_ranges(elf)):
                preload = [(tmp / "plan.ttp", at)]
                preload[0][0].write_bytes(blob)
                initial = Trainer(plan).state_hash()
        except (KeyError, ValueError):
            preload = []  # a stripped or foreign ELF: LOAD_PLAN over the UART
    boards = [QemuBoard(q.machine, elf=elf, icount=q.icount, start_timeout=30.0, preload=preload, nice=BOARD_NICE)
              for _ in range(n)]
    fleet.boards.extend(boards)

    def up(i: int):
        b = boards[i]
        b.start()
        client = BoardClient(b.endpoint, timeout=q.timeout)
        fleet.clients.append(client)
        if not client.ping().get("blob_capacity"):
            raise SimulationError(f"backend qemu: firmware {src} has no plan store (built before LOAD_PLAN existed): "
                                  f"rebuild it with `make -C firmware {target}` or set qemu.elf")
        try:
            # a provisioned board booted with the plan (the firmware checked it); else LOAD_PLAN
            held = bool(preload) and client.stats()["plan_bytes"] == len(blob) and \
                client.state()["state_hash"].hex() == initial
            trainer = LazyBoardTrainer(SealingBoardTrainer(client, plan, load_plan=not held))
        except BoardError as e:
            raise SimulationError(f"backend qemu: board {i} refused the plan: {e} (does the plan fit "
                                  f"{q.machine}'s 320 KB SRAM?)") from None
        if on_board is not None:
            on_board(i)
        return trainer

    with ThreadPoolExecutor(max_workers=min(n, 16), thread_name_prefix="boot") as pool:
        futures = [pool.submit(up, i) for i in range(n)]
        trainers = [f.result() for f in futures]
    fleet.booted_at = time.monotonic()
    fleet.boot_seconds = fleet.booted_at - t0
    fleet.trainers = trainers
    for obs in FLEET_OBSERVERS[:]:  # an observer may remove itself
        obs(fleet)
    return trainers


def group_srams(cfg: SimConfig) -> list[tuple[str, str, int]]:
    """Per device of a mixed-memory fleet (``device_groups``): (backend, board name, SRAM in its hello). A QEMU
    board reports its board YAML's training budget (configs/boards/: the YAML named after the machine, or the one
    whose ``qemu_machine`` it is); a host device reports its group's ``sram``."""
    from fleet.compiler.pipeline import BOARDS
    from fleet.config import BoardConfig, load

    boards = {b.qemu_machine or b.name: b for b in (load(BoardConfig, p) for p in sorted(BOARDS.glob("*.yaml")))}
    boards.update({b.name: b for b in list(boards.values())})
    out: list[tuple[str, str, int]] = []
    for g in cfg.device_groups:
        if g.backend == "qemu":
            b = boards.get(g.machine or "")
            if b is None:
                raise SimulationError(f"device_groups: no board YAML in {BOARDS} for machine {g.machine!r}")
            out += [("qemu", str(g.machine), int(g.sram or b.training_budget))] * g.count
        else:
            out += [("python", f"host-{int(g.sram) // 1000}k", int(g.sram or 0))] * g.count
    return out


def build_mixed_devices(cfg: SimConfig, kinds: list[tuple[str, str, int]], plans: list, stack: ExitStack) -> list[
        DeviceSlot]:
    """One :class:`DeviceSlot` per device of a mixed-memory fleet: device i trains ``plans[i]``; boards of one
    machine and plan boot together (python devices stay on the runner's threads: one worker pool holds one plan)."""
    from dataclasses import replace

    from device_agent.engine.trainer import Trainer

    slots: list[DeviceSlot | None] = [None] * len(kinds)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (backend, board, _) in enumerate(kinds):
        if backend == "qemu":
            groups.setdefault((board, id(plans[i])), []).append(i)
        else:
            slots[i] = DeviceSlot("python", Trainer(plans[i]))
    n_boards = sum(len(v) for v in groups.values())
    elfs = {g.machine: g.elf for g in cfg.device_groups if g.elf is not None}
    if n_boards:
        executor = ThreadPoolExecutor(max_workers=min(n_boards, 128), thread_name_prefix="boards")
        stack.callback(executor.shutdown, wait=False, cancel_futures=True)
        streams = ThreadPoolExecutor(max_workers=min(n_boards, 64), thread_name_prefix="streams")
        stack.callback(streams.shutdown, wait=False, cancel_futures=True)
        for (machine, _), idx in groups.items():
            sub = replace(cfg, qemu=replace(cfg.qemu, machine=machine, elf=elfs.get(machine)))
            for i, trainer in zip(idx, start_qemu_fleet(sub, plans[idx[0]], len(idx), stack)):
                trainer.executor = streams
                slots[i] = DeviceSlot("qemu", trainer, executor, on_samples=trainer.stream_samples)
    return [s for s in slots if s is not None]


def measure_instructions_per_step(cfg: SimConfig, plan, machine: str) -> int:
    """Instructions one local training step of ``plan`` takes on ``machine``, measured on one fresh emulated board
    (``-icount shift=0``: 1 instruction = 1 ns of virtual time; SysTick ticks of the last TRAIN x 1e9 / tick_hz),
    for the behaviour model's per-board speed (fleet/sim/paced.py)."""
    from device_agent.board import BoardClient, BoardError, QemuBoard, firmware_elf, firmware_target
    from device_agent.engine.qmath import mant_exp
    from device_agent.wire.plan import plan_to_bytes

    if shutil.which("qemu-system-arm") is None:
        raise SimulationError("behaviour.instructions_per_step: auto measures one emulated board, but "
                              "`qemu-system-arm` is not on PATH: install it or give the number")
    own = cfg.qemu.elf is not None and cfg.qemu.machine == machine
    elf = Path(cfg.qemu.elf) if own else firmware_elf(machine)
    if not own:
        target = firmware_target(machine)
        r = subprocess.run(["make", "-s", "-C", str(FIRMWARE_DIR), target], capture_output=True, text=True, check=False)
        if r.returncode != 0 or not elf.is_file():
            raise SimulationError(f"behaviour.instructions_per_step: `make -C firmware {target}` failed:\n"
                                  f"{r.stderr[-2000:]}")
    t = plan.tensors[plan.input_id]
    x = np.zeros(t.shape, np.int8)  # one sample (the plan's input has no batch axis)
    lr_m, lr_e = mant_exp(0.01)
    try:
        with QemuBoard(machine, elf=elf, icount=True, start_timeout=30.0) as board, \
                BoardClient(board.endpoint, timeout=max(cfg.qemu.timeout, 300.0)) as c:
            c.load_plan(plan_to_bytes(plan))
            c.push_sample(x.tobytes(), 0)
            c.train(1, lr_m, lr_e)
            ticks, tick_hz = c.state()["train_ticks"], c.board_info()["tick_hz"]
    except (BoardError, OSError, TimeoutError) as e:
        raise SimulationError(f"behaviour.instructions_per_step: measuring on {machine} failed: {e} "
                              "(give the number instead of auto)") from None
    if not ticks:
        raise SimulationError(f"behaviour.instructions_per_step: {machine} reported 0 ticks for a step")
    return round(int(ticks) * 1e9 / int(tick_hz))
