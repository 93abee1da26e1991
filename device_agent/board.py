"""Emulated TinyFleet boards: :class:`QemuBoard` starts one, and its only output is a TCP endpoint.

``QemuBoard`` runs ``qemu-system-arm`` (mps2-an386 = Cortex-M4, mps2-an500 = Cortex-M7) with the firmware ELF
and UART0 on a TCP server socket (``nodelay=on``: without it every reply waits ~40 ms for Nagle + delayed ACK).
QEMU starts the guest when the first client connects, so a board costs no CPU until it is used. The launcher
refuses to speak the protocol itself: :class:`BoardClient` is the thin TCP adapter over
``device_agent.wire.frames`` (encode, deframe, match by sequence number) that tests and the bridge use.
(Just over 400 lines: the launcher and its one client; the GET_DELTA bounds checks joined them in the hardening pass.)
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from device_agent.wire import frames, frames_personal
from device_agent.wire.errors import WireFormatError

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE_BUILD = ROOT / "firmware" / "build"
# QEMU machine -> firmware build directory; netduinoplus2 = STM32F405 (firmware/boards/stm32, plan store in SRAM)
MACHINES = {"mps2-an386": "an386", "mps2-an500": "an500", "netduinoplus2": "netduino"}
MAKE_TARGETS = {"mps2-an386": "qemu-an386", "mps2-an500": "qemu-an500", "netduinoplus2": "qemu-netduino"}
# QEMU 7.2's STM32 USART drops bytes that arrive before the firmware enables it (the CMSDK UART holds them): on
# these machines start() waits until the booted board answers a PING before handing out the endpoint.
PROBE_MACHINES = frozenset({"netduinoplus2"})

CMD_SELFTEST = frames.Command.SELFTEST
CMD_BOARD_INFO = frames.Command.BOARD_INFO


def firmware_elf(machine: str) -> Path:
    """The ELF ``make -C firmware qemu-<board>`` writes for a QEMU machine name."""
    if machine not in MACHINES:
        raise ValueError(f"unknown QEMU machine {machine!r}, expected one of {sorted(MACHINES)}")
    return FIRMWARE_BUILD / MACHINES[machine] / "tinyfleet.elf"


def firmware_target(machine: str) -> str:
    """The ``make -C firmware`` target that builds :func:`firmware_elf` for a QEMU machine name."""
    if machine not in MAKE_TARGETS:
        raise ValueError(f"unknown QEMU machine {machine!r}, expected one of {sorted(MAKE_TARGETS)}")
    return MAKE_TARGETS[machine]


def elf_symbol(elf: Path, name: str) -> int:
    """The value of symbol ``name`` in a 32-bit little-endian ELF (e.g. ``__store_start``, the plan store)."""
    data = Path(elf).read_bytes()
    if data[:6] != b"\x7fELF\x01\x01":
        raise ValueError(f"{elf}: not a 32-bit little-endian ELF")
    shoff, = struct.unpack_from("<I", data, 0x20)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x2E)
    sections = [struct.unpack_from("<IIIIIIIIII", data, shoff + i * shentsize) for i in range(shnum)]
    want = name.encode()
    for sh in sections:
        if sh[1] != 2:  # SHT_SYMTAB
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], 16):
            st_name, st_value = struct.unpack_from("<II", data, off)
            start = strtab[4] + st_name
            if data[start:data.index(b"\0", start)] == want:
                return st_value
    raise KeyError(f"{elf}: no symbol {name!r} (stripped ELF?)")


def elf_load_ranges(elf: Path) -> list[tuple[int, int]]:
    """``(start, end)`` physical ranges QEMU writes when it loads the ELF (PT_LOAD segments, zero fill included):
    a preload must not overlap them (QEMU refuses overlapping ROM regions)."""
    data = Path(elf).read_bytes()
    phoff, = struct.unpack_from("<I", data, 0x1C)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x2A)
    out = []
    for i in range(phnum):
        p_type, _, _, paddr, _, memsz = struct.unpack_from("<IIIIII", data, phoff + i * phentsize)
        if p_type == 1 and memsz:
            out.append((paddr, paddr + memsz))
    return out


def key_slot_preload(elf: Path, record: bytes, path: Path) -> tuple[Path, int]:
    """A ``QemuBoard.preload`` entry that provisions the board's key slot (docs/formats.md "Key slot"): ``record``
    (:func:`device_agent.wire.keyslot.key_slot_to_bytes`: the fleet's Ed25519 public key or an HMAC key) is written
    to ``path`` for QEMU's generic loader at the ELF symbol ``__key_slot``, as a factory would flash it. There is
    no UART command for it on purpose: whoever holds the link must not be able to replace the key."""
    if len(record) > 256:
        raise ValueError(f"key slot record of {len(record)} bytes, the slot holds 256")
    Path(path).write_bytes(record)
    return Path(path), elf_symbol(elf, "__key_slot")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class QemuBoard:
    """One emulated board. ``start()`` returns ``(host, port)`` once QEMU listens; ``stop()`` ends it.

    Parameters
    ----------
    elf : firmware ELF (default: the build for ``machine``).
    machine : ``mps2-an386`` (Cortex-M4) or ``mps2-an500`` (Cortex-M7).
    icount : run with ``-icount shift=0,align=off,sleep=on``: virtual time = instruction count, so the board's
        SysTick readings are deterministic (25 MHz: 1 tick = 40 instructions); ~2.3x slower.
    preload : ``(file, address)`` pairs QEMU's generic loader writes into the board's memory at reset, e.g. a
        plan blob at ``elf_symbol(elf, "__store_start")``: the firmware adopts a plan it finds there at boot (as a
        plan flashed with the firmware), so it need not cross the UART; :func:`key_slot_preload` provisions the
        signature policy (an Ed25519 fleet public key or an HMAC key; without it the board runs "unsigned only").
    nice : run QEMU this much below our own CPU priority (a fleet: the agents and coordinator that feed the boards
        come first).
    """

    machine: str = "mps2-an500"
    elf: Path | None = None
    icount: bool = False
    host: str = "127.0.0.1"
    qemu: str = "qemu-system-arm"
    start_timeout: float = 10.0
    preload: list = field(default_factory=list)
    nice: int = 0
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _endpoint: tuple[str, int] | None = field(default=None, init=False)
    _log: list[str] = field(default_factory=list, init=False, repr=False)

    def command(self, port: int) -> list[str]:
        elf = Path(self.elf) if self.elf else firmware_elf(self.machine)
        cmd = [self.qemu, "-M", self.machine, "-nodefaults", "-display", "none", "-monitor", "none",
               "-kernel", str(elf), "-serial", f"tcp:{self.host}:{port},server=on,wait=on,nodelay=on"]
        if self.icount:
            cmd += ["-icount", "shift=0,align=off,sleep=on"]
        for path, addr in self.preload:
            cmd += ["-device", f"loader,file={path},addr={addr:#x},force-raw=on"]
        return cmd

    @property
    def endpoint(self) -> tuple[str, int]:
        if self._endpoint is None:
            raise RuntimeError("board not started: call start() first")
        return self._endpoint

    def start(self) -> tuple[str, int]:
        """Launch QEMU and wait until its UART socket listens; returns the endpoint."""
        if self._proc is not None:
            return self.endpoint
        elf = Path(self.elf) if self.elf else firmware_elf(self.machine)
        if not elf.exists():
            raise FileNotFoundError(f"firmware {elf} not built: run `make -C firmware "
                                    f"{MAKE_TARGETS.get(self.machine, 'qemu-an500')}`")
        if shutil.which(self.qemu) is None:
            raise FileNotFoundError(f"`{self.qemu}` not on PATH: run `make setup` (Debian: qemu-system-arm)")
        for _ in range(5):  # NOTE: the free port may be taken between probing and QEMU binding it: retry
            port = _free_port(self.host)
            proc = subprocess.Popen(self.command(port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            if self.nice:  # NOTE: before the guest runs: QEMU waits for the UART client first
                try:
                    os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, 0) + self.nice)
                except OSError:
                    pass  # the board still runs, at our own priority
            try:
                listening = self._wait_listening(proc)
            except BaseException:
                self._kill(proc)  # NOTE: never leak a QEMU process, whatever interrupts the wait
                raise
            if listening:
                self._proc, self._endpoint = proc, (self.host, port)
                threading.Thread(target=self._drain, args=(proc,), daemon=True).start()
                if self.machine in PROBE_MACHINES:
                    try:
                        self._probe()
                    except BaseException:
                        self.stop()
                        raise
                return self._endpoint
            self._kill(proc)
            if not any("in use" in line for line in self._log):
                break
        raise RuntimeError(f"QEMU did not start ({' '.join(self.command(0))}):\n" + "".join(self._log[-20:]))

    def _probe(self) -> None:
        """Connect (the guest starts), PING until the board answers, disconnect: QEMU then listens for the client."""
        deadline = time.monotonic() + self.start_timeout
        with BoardClient(self.endpoint, timeout=0.1) as c:
            while True:
                try:
                    c.ping()
                    return
                except (TimeoutError, WireFormatError, BoardError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.machine}: the board did not answer PING within "
                                           f"{self.start_timeout} s") from None

    def _wait_listening(self, proc: subprocess.Popen) -> bool:
        """QEMU prints 'waiting for connection' on stderr once the server socket listens."""
        assert proc.stderr is not None
        fd = proc.stderr.fileno()
        deadline = time.monotonic() + self.start_timeout
        buf = b""
        while time.monotonic() < deadline and b"waiting for connection" not in buf:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:  # QEMU exited
                    break
                buf += chunk
        self._log.append(buf.decode(errors="replace"))
        return b"waiting for connection" in buf

    def _drain(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self._log.append(line.decode(errors="replace"))
            del self._log[:-200]

    @staticmethod
    def _kill(proc: subprocess.Popen, timeout: float = 5.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        """Terminate QEMU (SIGTERM, then SIGKILL after 5 s). Safe to call twice."""
        if self._proc is not None:
            self._kill(self._proc)
            self._proc = None
            self._endpoint = None

    def log(self) -> str:
        """QEMU's stderr so far (for error messages)."""
        return "".join(self._log)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _layout(direction: str, code: int):
    return frames.PAYLOADS[(direction, code)]


class BoardError(RuntimeError):
    """The board answered with a non-OK status (``status`` is a frames.Status value)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BoardClient:
    """Request/response over a board's UART stream (TCP here; the same frames go over a serial port)."""

    def __init__(self, endpoint: tuple[str, int], timeout: float = 30.0, connect_timeout: float = 10.0):
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock = socket.create_connection(endpoint, timeout=1.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.deframer = frames.Deframer()
        self.pending: list = []
        self.seq = 0

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> frames.Frame:
        """The next frame (or raise the WireFormatError the deframer produced for it)."""
        while not self.pending:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("board closed the UART connection")
            self.pending += self.deframer.feed(data)
        item = self.pending.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def request(self, cmd: int, payload: bytes = b"", retries: int = 2) -> frames.Frame:
        """Send one command; return the response frame with the same seq (status in ``code``).

        An ERR_CRC answer (the board could not read the request) is retried up to ``retries`` times, as
        docs/formats.md prescribes; the retry uses a new seq.
        """
        for attempt in range(retries + 1):
            seq = self.seq
            self.seq = (self.seq + 1) & 0xFFFF
            if self.seq == frames.SEQ_UNKNOWN:
                self.seq = 0
            self.send_raw(frames.encode_frame(frames.Frame(seq, cmd, payload)))
            while True:
                f = self.recv_frame()
                if f.seq == seq:
                    return f
                if f.seq == frames.SEQ_UNKNOWN and f.code == frames.Status.ERR_CRC:
                    break
                if f.seq == frames.SEQ_UNKNOWN:
                    raise BoardError(f.code, f"board reported status {f.code:#04x} outside a request "
                                             f"(ERR_INTERNAL = a fault, e.g. stack overflow): it has halted")
            if attempt == retries:
                raise BoardError(f.code, f"board could not read command {cmd:#04x} after {retries + 1} tries")
        raise AssertionError("unreachable")

    def call(self, cmd: int) -> dict[str, int]:
        """A command without request fields; returns the response fields. Raises BoardError on a bad status."""
        f = self.request(cmd)
        if f.code != frames.Status.OK:
            raise BoardError(f.code, f"command {cmd:#04x} failed with status {f.code:#04x}")
        st, names, _ = _layout("resp", cmd)
        if len(f.payload) != st.size:
            raise BoardError(f.code, f"command {cmd:#04x}: {len(f.payload)} payload bytes, expected {st.size}")
        return dict(zip(names, st.unpack(f.payload)))

    def ping(self) -> dict[str, int]:
        return self.call(frames.Command.PING)

    def stats(self) -> dict[str, int]:
        return self.call(frames.Command.GET_STATS)

    def board_info(self) -> dict[str, int]:
        return self.call(CMD_BOARD_INFO)

    def selftest(self) -> dict[str, int]:
        return self.call(CMD_SELFTEST)

    # ---- plan, samples, training (docs/formats.md "Commands") ----

    def _ok(self, cmd: int, payload: bytes, what: str) -> tuple[dict[str, int], bytes]:
        f = self.request(cmd, payload)
        if f.code != frames.Status.OK:
            try:
                fields, _ = frames.unpack("err", f.code, f.payload)
                detail = f" {fields}" if fields else ""
            except WireFormatError:  # an odd error payload still reports the status
                detail = f" (payload {f.payload.hex()})"
            raise BoardError(f.code, f"{what}: board answered {frames.Status(f.code).name}{detail}")
        return frames.unpack("resp", cmd, f.payload)

    def load_blob(self, cmd: int, blob: bytes, chunk: int = frames.MAX_PAYLOAD - 8) -> int:
        """LOAD_PLAN / LOAD_UPDATE in chunks; the board checks the whole blob after the last one."""
        got = 0
        for off in range(0, len(blob), chunk):
            fields, _ = self._ok(cmd, frames.pack("req", cmd, blob[off:off + chunk], offset=off, total=len(blob)),
                                 f"{frames.Command(cmd).name} at offset {off}")
            got = fields["received"]
        return got

    def load_plan(self, blob: bytes) -> int:
        return self.load_blob(frames.Command.LOAD_PLAN, blob)

    def load_update(self, blob: bytes) -> int:
        return self.load_blob(frames.Command.LOAD_UPDATE, blob)

    def push_sample(self, sample: bytes, label: int, chunk: int = frames.MAX_PAYLOAD - 12) -> dict[str, int]:
        """PUSH_SAMPLE: the input tensor's bytes (int8, or int32 token ids little-endian) and its label."""
        fields: dict[str, int] = {}
        for off in range(0, max(len(sample), 1), chunk):
            fields, _ = self._ok(frames.Command.PUSH_SAMPLE,
                                 frames.pack("req", frames.Command.PUSH_SAMPLE, sample[off:off + chunk], offset=off,
                                             total=len(sample), label=int(label)), "PUSH_SAMPLE")
        return fields

    def train(self, steps: int, lr_m: int, lr_e: int, round_id: int = 0) -> dict[str, int]:
        """TRAIN: ``steps`` N=1 steps over the newest min(steps, held) samples, oldest of them first."""
        return self._ok(frames.Command.TRAIN, frames.pack("req", frames.Command.TRAIN, steps=steps, lr_m=lr_m,
                                                          lr_e=lr_e, round_id=round_id), "TRAIN")[0]

    def store_samples(self, first_slot: int, samples: list[tuple[bytes, int]], input_nbytes: int,
                      chunk: int = frames.MAX_PAYLOAD - 12) -> dict[str, int]:
        """STORE_SAMPLES (protocol v2): ``samples`` (input bytes, label) into slots ``first_slot, first_slot + 1,
        ...`` of the board's sample store, many per frame. No samples: a query of ``sample_capacity``."""
        batch = frames.sample_records(samples, input_nbytes)
        fields: dict[str, int] = {}
        for off in range(0, max(len(batch), 1), chunk):
            fields, _ = self._ok(frames.Command.STORE_SAMPLES,
                                 frames.pack("req", frames.Command.STORE_SAMPLES, batch[off:off + chunk],
                                             first_slot=first_slot, offset=off, total=len(batch)),
                                 f"STORE_SAMPLES into slot {first_slot} at {off}")
        return fields

    def train_list(self, slots: list[int], lr_m: int, lr_e: int, round_id: int = 0) -> dict[str, int]:
        """TRAIN_LIST (protocol v2): one N = 1 step per stored slot, in order (several frames if the list is long)."""
        out = {"steps_done": 0, "samples_used": 0, "correct": 0, "update_counter": 0}
        for i in range(0, len(slots), frames.TRAIN_LIST_MAX):
            part = slots[i:i + frames.TRAIN_LIST_MAX]
            r = self._ok(frames.Command.TRAIN_LIST, frames.train_list_payload(part, lr_m, lr_e, round_id),
                         f"TRAIN_LIST of {len(part)} slots")[0]
            for k in ("steps_done", "samples_used", "correct"):
                out[k] += r[k]
            out["update_counter"] = r["update_counter"]
        return out

    def delta_records(self, topk_permille: int = 0, chunk: int = frames.MAX_PAYLOAD - 4,
                      max_total: int | None = None) -> bytes:
        """GET_DELTA: the whole records section (``new - base`` of the shared trainable tensors).

        ``max_total``: the most bytes the plan allows (``wire.delta.max_records_bytes``); a board announcing more,
        changing its total between chunks or sending past it is refused before the bytes are collected.
        """
        out, total = bytearray(), None
        while total is None or len(out) < total:
            fields, tail = self._ok(frames.Command.GET_DELTA, frames.pack(
                "req", frames.Command.GET_DELTA, offset=len(out), max_len=chunk, topk_permille=topk_permille),
                f"GET_DELTA at {len(out)}")
            if total is not None and fields["total"] != total:
                raise BoardError(frames.Status.ERR_INTERNAL, f"GET_DELTA total changed from {total} to "
                                                             f"{fields['total']} bytes between chunks")
            total = fields["total"]
            if max_total is not None and total > max_total:
                raise BoardError(frames.Status.ERR_INTERNAL, f"GET_DELTA announces {total} bytes, the plan allows at "
                                                             f"most {max_total}")
            if not tail and len(out) < total:
                raise BoardError(frames.Status.ERR_INTERNAL, "GET_DELTA returned no bytes before the end")
            if len(out) + len(tail) > total:
                raise BoardError(frames.Status.ERR_INTERNAL, f"GET_DELTA sent {len(out) + len(tail)} bytes, "
                                                             f"announced {total}")
            out += tail
        return bytes(out)

    def personal_setup(self, method: str, ids: list[int], lam_q15: int = 0) -> dict[str, int]:
        """PERSONAL_SETUP: keep a personal copy of tensors ``ids`` with ``method`` ("none": drop it); returns what
        the copy costs the board (``sram_bytes``, ``flash_bytes``) and the pool bytes left."""
        if method not in frames_personal.METHOD_CODES:
            raise ValueError(f"personalization method must be one of {', '.join(frames_personal.METHOD_CODES)}, "
                             f"got {method!r}")
        tail = frames_personal.list_payload(ids, frames_personal.list_max(frames_personal.SETUP, frames.MAX_PAYLOAD))
        return self._ok(frames_personal.SETUP, frames.pack(
            "req", frames_personal.SETUP, tail, method=frames_personal.METHOD_CODES[method], reserved=0,
            count=len(ids), lam_q15=lam_q15), f"PERSONAL_SETUP {method}")[0]

    def personalize(self, slots: list[int], lr_m: int, lr_e: int, restart: bool = False) -> dict[str, int]:
        """PERSONALIZE: one personal step per stored slot, in order (several frames if the list is long; only the
        first carries ``restart``)."""
        limit = frames_personal.list_max(frames_personal.PERSONALIZE, frames.MAX_PAYLOAD)
        out = {"steps_done": 0, "correct": 0, "personal_steps": 0}
        for i in range(0, len(slots), limit):
            part = slots[i:i + limit]
            r = self._ok(frames_personal.PERSONALIZE, frames.pack(
                "req", frames_personal.PERSONALIZE, frames_personal.list_payload(part, limit), lr_m=lr_m, lr_e=lr_e,
                flags=int(restart and i == 0), reserved=0, count=len(part)), f"PERSONALIZE of {len(part)} slots")[0]
            out["steps_done"] += r["steps_done"]
            out["correct"] += r["correct"]
            out["personal_steps"] = r["personal_steps"]
        return out

    def personal_hash(self) -> dict[str, int | bytes]:
        """PERSONAL_HASH: sha256 of the board's personal model (the copy itself never leaves the board)."""
        return self._ok(frames_personal.HASH, b"", "PERSONAL_HASH")[0]

    def state(self) -> dict[str, int | bytes]:
        """STATE_HASH: sha256 of the trainable tensors (== Trainer.state_hash) and counters."""
        return self._ok(frames.Command.STATE_HASH, b"", "STATE_HASH")[0]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
