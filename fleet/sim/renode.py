"""Renode boards for ``backend: renode``: STM32F746 machines running our firmware, K per Renode process.

Renode is not part of the project (not vendored, not built here): it is found as ``$TINYFLEET_RENODE`` (the
``renode`` launcher, or a directory holding it) or ``renode`` on PATH, and refused with that reason otherwise.
The project brings its own platform description (``firmware/boards/renode-stm32f746/stm32f746-tinyfleet.repl``:
no ``ApplySVD`` download) and writes one monitor script per process: per machine the platform, USART1 on a TCP
server socket, the firmware ELF and (optionally) the plan written into the flash store, as the QEMU backend's
loader does. A board is ready when it answers PING on its socket; the bridge and protocol are the QEMU backend's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

FIRMWARE_DIR = Path(__file__).resolve().parents[2] / "firmware"
PLATFORM = FIRMWARE_DIR / "boards" / "renode-stm32f746" / "stm32f746-tinyfleet.repl"
RENODE_ENV = "TINYFLEET_RENODE"
MAKE_TARGET = "stm32f746"


def find_renode() -> str | None:
    """The Renode launcher: ``$TINYFLEET_RENODE`` (a file, or a directory with ``renode`` in it), else PATH."""
    env = os.environ.get(RENODE_ENV)
    if env:
        p = Path(env)
        if p.is_dir():
            p = p / "renode"
        return str(p) if p.is_file() and os.access(p, os.X_OK) else None
    return shutil.which("renode")


def renode_missing_reason() -> str:
    env = os.environ.get(RENODE_ENV)
    if env:
        return f"${RENODE_ENV}={env} is not an executable Renode launcher"
    return (f"renode not on PATH and ${RENODE_ENV} unset: install Renode (no Debian/PyPI package; docs/boards.md) "
            f"and put `renode` on PATH or set ${RENODE_ENV} to its launcher")


def firmware_elf() -> Path:
    """The ELF ``make -C firmware stm32f746`` writes."""
    return FIRMWARE_DIR / "build" / "stm32f746" / "tinyfleet.elf"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RenodeProcess:
    """One Renode process emulating ``machines`` STM32F746 boards; ``start()`` returns their UART endpoints.

    ``preload``: ``(file, address)`` pairs written into every machine's memory after the ELF (``sysbus LoadBinary``;
    e.g. a plan at ``__store_start``). ``quantum_us``: Renode's global quantum (how far one machine may run ahead
    of the others in virtual time; None: Renode's default). The process and its children are one process group,
    ended together by ``stop()``.
    """

    elf: Path
    machines: int = 1
    preload: list = field(default_factory=list)
    quantum_us: float | None = None
    renode: str | None = None
    host: str = "127.0.0.1"
    workdir: Path | None = None
    endpoints: list = field(default_factory=list, init=False)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _log: Path | None = field(default=None, init=False, repr=False)

    def script(self, ports: list[int]) -> str:
        """The monitor script that creates and starts the machines."""
        lines = ["logLevel 3"]  # errors only: the firmware touches RCC/GPIO/cache registers the model lacks
        if self.quantum_us is not None:
            lines.append(f'emulation SetGlobalQuantum "{self.quantum_us / 1e6:.9f}"')
        for i, port in enumerate(ports):
            lines += [f'mach create "tf{i}"',
                      f"machine LoadPlatformDescription @{PLATFORM}",
                      f'emulation CreateServerSocketTerminal {port} "uart{i}" false',
                      f"connector Connect sysbus.usart1 uart{i}",
                      f"sysbus LoadELF @{Path(self.elf).resolve()}"]
            lines += [f"sysbus LoadBinary @{Path(p).resolve()} {addr:#x}" for p, addr in self.preload]
            lines += ["sysbus.cpu VectorTableOffset 0x08000000", "mach clear"]
        lines.append("start")
        return "\n".join(lines) + "\n"

    def start(self) -> list[tuple[str, int]]:
        if self._proc is not None:
            return self.endpoints
        renode = self.renode or find_renode()
        if renode is None:
            raise FileNotFoundError(renode_missing_reason())
        work = Path(self.workdir or ".")
        work.mkdir(parents=True, exist_ok=True)
        ports = [_free_port(self.host) for _ in range(self.machines)]
        monitor = _free_port(self.host)
        tag = f"{os.getpid()}-{ports[0]}"
        script = work / f"boards-{tag}.resc"
        script.write_text(self.script(ports))
        self._log = work / f"renode-{tag}.log"
        # NOTE: a private config file: Renode would otherwise create and lock ~/.config/renode/config per process
        cmd = [renode, "--disable-xwt", "--plain", "--port", str(monitor), "--config", str(work / f"config-{tag}"),
               str(script)]
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=work)
        self.endpoints = [(self.host, p) for p in ports]
        return self.endpoints

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """The process's console output so far (for error messages)."""
        try:
            return self._log.read_text(errors="replace")[-4000:] if self._log else ""
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 5 s. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def connect_ready(proc: RenodeProcess, endpoint: tuple[str, int], timeout: float, boot_timeout: float = 120.0):
    """A :class:`~device_agent.board.BoardClient` on ``endpoint`` once the board answers PING (Renode listens
    before the machine runs; a byte that arrives before the firmware set up USART1 may be lost)."""
    from device_agent.board import BoardClient, BoardError
    from device_agent.wire.errors import WireFormatError

    deadline = time.monotonic() + boot_timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"Renode exited:\n{proc.log()}")
        try:
            client = BoardClient(endpoint, timeout=0.5, connect_timeout=1.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Renode did not open {endpoint} within {boot_timeout} s:\n{proc.log()}") from None
    while True:
        try:
            client.ping()
            client.sock.settimeout(timeout)
            return client
        except (TimeoutError, WireFormatError, BoardError):
            if time.monotonic() > deadline or not proc.alive():
                client.close()
                raise RuntimeError(f"board at {endpoint} did not answer PING within {boot_timeout} s:\n"
                                   f"{proc.log()}") from None


def start_renode_fleet(cfg, plan, n: int, stack, on_board=None) -> list:
    """Launch ``n`` Renode boards (``cfg.renode.machines_per_process`` per process), connect to each USART1 and
    check the plan provisioned in its flash store (else LOAD_PLAN); returns their LazyBoardTrainers."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from device_agent.board import BoardError, elf_load_ranges, elf_symbol
    from device_agent.bridge import BoardTrainer
    from device_agent.engine.trainer import Trainer
    from device_agent.wire.plan import plan_to_bytes
    from fleet.sim import backends
    from fleet.sim.errors import SimulationError

    r = cfg.renode
    renode = find_renode()
    if renode is None:
        raise SimulationError(f"backend renode: {renode_missing_reason()}")
    src = Path(r.elf) if r.elf else firmware_elf()
    if not r.elf:  # the default ELF is ours: an incremental make keeps it current with the sources
        mk = subprocess.run(["make", "-s", "-C", str(FIRMWARE_DIR), MAKE_TARGET], capture_output=True, text=True,
                            check=False)
        if mk.returncode != 0:
            raise SimulationError(f"backend renode: `make -C firmware {MAKE_TARGET}` failed:\n{mk.stderr[-2000:]}")
    if not src.is_file():
        raise SimulationError(f"backend renode: firmware {src} not built: run `make -C firmware {MAKE_TARGET}`")
    tmp = Path(tempfile.mkdtemp(prefix="tinyfleet-renode-"))
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    elf = tmp / "tinyfleet.elf"
    shutil.copyfile(src, elf)
    fleet = backends.QemuFleet(elf=elf)
    stack.callback(lambda: [c.close() for c in fleet.clients])
    stack.callback(lambda: [p.stop() for p in fleet.boards])
    t0 = time.monotonic()
    blob, preload, initial = plan_to_bytes(plan), [], ""
    if backends.PRELOAD_PLAN:
        at = elf_symbol(elf, "__store_start")
        if not any(lo < at + len(blob) and at < hi for lo, hi in elf_load_ranges(elf)):
            (tmp / "plan.ttp").write_bytes(blob)
            preload, initial = [(tmp / "plan.ttp", at)], Trainer(plan).state_hash()
    k = r.machines_per_process
    procs = [RenodeProcess(elf, machines=min(k, n - i), preload=preload, quantum_us=r.quantum_us, renode=renode,
                           workdir=tmp) for i in range(0, n, k)]
    fleet.boards.extend(procs)
    endpoints = [(p, ep) for p in procs for ep in p.start()]
    deadline = time.monotonic() + r.boot_timeout  # NOTE: one deadline for the whole fleet, not per board

    def up(i: int):
        proc, ep = endpoints[i]
        try:
            client = connect_ready(proc, ep, r.timeout, max(1.0, deadline - time.monotonic()))
        except RuntimeError as e:
            raise SimulationError(f"backend renode: board {i}: {e}") from None
        fleet.clients.append(client)
        try:
            held = bool(preload) and client.stats()["plan_bytes"] == len(blob) and \
                client.state()["state_hash"].hex() == initial
            trainer = backends.LazyBoardTrainer(BoardTrainer(client, plan, load_plan=not held))
        except BoardError as e:
            raise SimulationError(f"backend renode: board {i} refused the plan: {e}") from None
        if on_board is not None:
            on_board(i)
        return trainer

    pool = ThreadPoolExecutor(max_workers=min(n, 16), thread_name_prefix="renode-boot")
    try:
        trainers = [f.result() for f in [pool.submit(up, i) for i in range(n)]]
    finally:  # a board that failed ends the boot: the others are not waited for
        pool.shutdown(wait=True, cancel_futures=True)
    fleet.booted_at = time.monotonic()
    fleet.boot_seconds = fleet.booted_at - t0
    fleet.trainers = trainers
    for obs in backends.FLEET_OBSERVERS[:]:
        obs(fleet)
    return trainers
