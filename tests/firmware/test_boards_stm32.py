"""The STM32 ports (firmware/boards/stm32): the STM32F405 image on QEMU netduinoplus2 answers over its USART1 and
trains every golden plan bit-exactly with the reference; the STM32F405 and STM32F746 (the paper's board) images
link with the part's memory map, checked section by section from the ELF."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from device_agent.board import BoardClient, QemuBoard, elf_load_ranges, elf_symbol
from device_agent.wire import frames
from tests.conftest import ROOT, require_cmd
from tests.firmware.conftest import PLAN_VECTORS, PlanVector

FIRMWARE = ROOT / "firmware"
VECTORS = sorted(PLAN_VECTORS.glob("*.tfv"))
KB = 1024
FLASH = (0x08000000, 0x08000000 + 1024 * KB)
SRAM_F4 = (0x20000000, 0x20000000 + 128 * KB)
CCM_F4 = (0x10000000, 0x10000000 + 64 * KB)
SRAM_F7 = (0x20000000, 0x20000000 + 320 * KB)
USART1_IRQ = 37


@pytest.fixture(scope="module")
def stm32_elfs(tmp_path_factory) -> dict[str, Path]:
    """``make stm32``: the QEMU netduinoplus2 image (store in SRAM), its flash-store twin, the F405 and F746 parts."""
    require_cmd("arm-none-eabi-gcc", "make")
    build = tmp_path_factory.mktemp("fw")
    r = subprocess.run(["make", "-s", "-j2", "-C", str(FIRMWARE), f"BUILD={build}", "stm32"], check=False,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"netduino": build / "netduino" / "tinyfleet.elf",
            "netduino-flashstore": build / "netduino" / "tinyfleet-flashstore.elf",
            "stm32f405": build / "netduino" / "tinyfleet-stm32f405.elf",
            "stm32f746": build / "stm32f746" / "tinyfleet.elf"}


def _sections(elf: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (address, size, type) of every ELF section."""
    data = elf.read_bytes()
    shoff, = struct.unpack_from("<I", data, 0x20)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x2E)
    sh = [struct.unpack_from("<IIIIIIIIII", data, shoff + i * shentsize) for i in range(shnum)]
    names = sh[shstrndx][4]
    out = {}
    for s in sh:
        name = data[names + s[0]:data.index(b"\0", names + s[0])].decode()
        out[name] = (s[3], s[5], s[1])
    return out


def _segments(elf: Path) -> list[tuple[int, int, int, int]]:
    """(vaddr, paddr, filesz, memsz) of every PT_LOAD segment."""
    data = elf.read_bytes()
    phoff, = struct.unpack_from("<I", data, 0x1C)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x2A)
    out = []
    for i in range(phnum):
        p_type, _, vaddr, paddr, filesz, memsz = struct.unpack_from("<IIIIII", data, phoff + i * phentsize)
        if p_type == 1:
            out.append((vaddr, paddr, filesz, memsz))
    return out


def _inside(lo: int, hi: int, region: tuple[int, int]) -> bool:
    return region[0] <= lo <= hi <= region[1]


def _vector(elf: Path, index: int) -> int:
    """Entry ``index`` of the vector table (the first bytes of .text, at the start of flash)."""
    data = elf.read_bytes()
    shoff, = struct.unpack_from("<I", data, 0x20)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x2E)
    for i in range(shnum):
        s = struct.unpack_from("<IIIIIIIIII", data, shoff + i * shentsize)
        if s[3] == FLASH[0] and s[1] == 1:  # SHT_PROGBITS at the flash start
            return struct.unpack_from("<I", data, s[4] + 4 * index)[0]
    raise AssertionError("no section at the start of flash")


@pytest.mark.parametrize("part", ["stm32f405", "stm32f746"])
def test_memory_map_of_the_part(stm32_elfs, part: str) -> None:
    """Vectors at the flash start, code and .data's image in the 1 MB flash, statics + stack in the part's RAM (F405:
    CCM; F746: the 320 KB SRAM), the arena in SRAM, the plan store in flash up to the key slot, the USART1 vector."""
    elf = stm32_elfs[part]
    sec, sym = _sections(elf), lambda n: elf_symbol(elf, n)
    statics, arena_region = (CCM_F4, SRAM_F4) if part == "stm32f405" else (SRAM_F7, SRAM_F7)
    # Assert: sections
    text_at, text_n, _ = sec[".text"]
    assert text_at == FLASH[0] and _inside(text_at, text_at + text_n, FLASH)
    bss_at, bss_n, bss_type = sec[".bss"]
    assert bss_type == 8 and _inside(bss_at, bss_at + bss_n, statics)  # SHT_NOBITS
    if ".data" in sec and sec[".data"][1]:
        d_at, d_n, _ = sec[".data"]
        assert _inside(d_at, d_at + d_n, statics)
        assert _inside(sym("__data_load"), sym("__data_load") + d_n, FLASH)
    for _, paddr, filesz, _ in _segments(elf):  # every loaded byte: flash, or RAM without file contents
        assert _inside(paddr, paddr + filesz, FLASH) or filesz == 0, hex(paddr)
    # Assert: the stack at the top of its region, the guard below it, the arena and the plan store
    assert sym("__stack_top") == statics[1] and sym("__stack_top") - sym("__stack_limit") == 8 * KB
    assert sym("__guard_start") == sym("__stack_limit") - KB and sym("__guard_start") % KB == 0
    assert _inside(sym("__arena_start"), sym("__arena_end"), arena_region)
    assert sym("__arena_start") >= bss_at + bss_n or part == "stm32f405"
    assert sym("__arena_end") <= sym("__guard_start") or part == "stm32f405"
    assert sym("__store_start") >= sym("__flash_end") and sym("__store_end") == sym("__key_slot") == FLASH[1] - 256
    assert sym("__ram_size") == (192 if part == "stm32f405" else 320) * KB
    # Assert: the vector table: initial SP, reset handler (Thumb), USART1's interrupt
    assert _vector(elf, 0) == sym("__stack_top")
    assert _vector(elf, 1) == sym("tf_reset_handler") | 1 and _inside(_vector(elf, 1), _vector(elf, 1), FLASH)
    assert _vector(elf, 16 + USART1_IRQ) == sym("tf_usart_irq_handler") | 1


def test_f746_starts_the_dwt_cycle_counter(stm32_elfs) -> None:
    """The F746 image unlocks DWT (the CoreSight lock access key) and counts cycles with CYCCNT; the F405 image
    (SysTick ticks) does not touch it."""
    def words(elf: Path) -> str:
        return subprocess.run(["arm-none-eabi-objdump", "-d", str(elf)], check=True, capture_output=True,
                              text=True).stdout.lower()

    f7, f4 = words(stm32_elfs["stm32f746"]), words(stm32_elfs["stm32f405"])
    assert ".word\t0xc5acce55" in f7 and ".word\t0xe0001000" in f7
    assert ".word\t0xc5acce55" not in f4


@pytest.fixture(scope="module")
def netduino(stm32_elfs) -> Path:
    require_cmd("qemu-system-arm")
    return stm32_elfs["netduino"]


# NOTE (_BOOT_NOTE): QEMU 7.2's STM32 USART drops bytes that arrive before the firmware enables it, so
# QemuBoard.start() PINGs the booting board until it answers; a PING cut by that moment reaches the board as the
# tail of a frame and counts in frames_bad (0 or 1, by timing). The tests check that their own traffic adds none.


def test_netduino_round_trip(netduino) -> None:
    with QemuBoard("netduinoplus2", elf=netduino) as board, BoardClient(board.endpoint, timeout=30) as c:
        ping, info = c.ping(), c.board_info()
        test = c.selftest()
        info2 = c.board_info()
    assert ping["protocol_version"] == frames.PROTOCOL_VERSION and ping["sram_bytes"] == 128 * KB
    assert (info["cpuid"] >> 4) & 0xFFF == 0xC24 and info["tick_hz"] == 168_000_000  # Cortex-M4
    assert 0 < info["arena_bytes"] < 128 * KB and ping["blob_capacity"] == 48 * KB
    assert test["passed"] == test["cases"] > 50 and test["first_failed"] == -1
    assert info2["ticks"] > info["ticks"] and info2["frames_bad"] == info["frames_bad"]  # (see _BOOT_NOTE)


def test_netduino_plans_bit_exact(netduino) -> None:
    """Every golden plan: LOAD_PLAN over USART1, PUSH_SAMPLE, TRAIN; the state hash equals the reference's."""
    assert VECTORS, "no golden plan vectors: run tests/firmware/gen_plan_vectors.py"
    with QemuBoard("netduinoplus2", elf=netduino) as board, BoardClient(board.endpoint, timeout=60) as c:
        for path in VECTORS:
            v = PlanVector.read(path)
            # Execute
            c.load_plan(v.plan)
            for s, y in zip(v.samples, v.labels):
                c.push_sample(s, y)
            tr = c.train(v.steps, v.lr_m, v.lr_e, round_id=1)
            st = c.state()
            # Assert
            assert tr["steps_done"] == v.steps and tr["correct"] == sum(v.correct), path.name
            assert st["state_hash"] == v.state_hash, f"{path.name} on netduinoplus2: state differs from the reference"


def test_netduino_stored_samples_bit_exact(netduino) -> None:
    """Protocol v2 (STORE_SAMPLES + TRAIN_LIST) on the F405 port."""
    for name in ("tiny", "text", "imu"):
        v = PlanVector.read(PLAN_VECTORS / f"{name}.tfv")
        nb, n = len(v.samples[0]), len(v.samples)
        with QemuBoard("netduinoplus2", elf=netduino) as board, BoardClient(board.endpoint, timeout=60) as c:
            c.load_plan(v.plan)
            c.store_samples(0, [(s, int(y)) for s, y in zip(v.samples, v.labels)], nb)
            tr = c.train_list([s % n for s in range(v.steps)], v.lr_m, v.lr_e, round_id=1)
            state = c.state()
        assert tr["steps_done"] == v.steps and state["state_hash"] == v.state_hash, name


def test_netduino_requests_sent_while_busy_all_get_answers(netduino) -> None:
    """USART1 flow control: a SELFTEST then four maximum-size frames at once (2 KB, twice the RX ring): the ring
    fills, the byte waits in DR with the interrupt masked, and all five answers come back in order."""
    with QemuBoard("netduinoplus2", elf=netduino) as board, BoardClient(board.endpoint, timeout=30) as c:
        before = c.board_info()
        burst = [frames.Frame(100 + i, frames.Command.PING, bytes(frames.MAX_PAYLOAD)) for i in range(4)]
        c.send_raw(frames.encode_frame(frames.Frame(99, frames.Command.SELFTEST))
                   + b"".join(frames.encode_frame(f) for f in burst))
        answers = [c.recv_frame() for _ in range(5)]
        info = c.board_info()
    assert [(a.seq, a.code) for a in answers] == [(99, frames.Status.OK)] + [
        (f.seq, frames.Status.ERR_BAD_PAYLOAD) for f in burst]
    assert info["frames_bad"] == before["frames_bad"]  # (see _BOOT_NOTE)


def test_netduino_flash_store_trains_a_plan_flashed_with_the_image(stm32_elfs, tmp_path: Path) -> None:
    """With the store in flash (ROM to the guest on QEMU) the plan and the samples are written by QEMU's loader, as a
    factory would flash them (the samples at the slots the board reports); the board adopts the plan at boot,
    PUSH_SAMPLE of the same bytes changes nothing, and training is bit-exact: the path of
    benchmarks/firmware_paper.py --board netduinoplus2. The whole SRAM minus statics and stack is arena."""
    require_cmd("qemu-system-arm")
    elf = stm32_elfs["netduino-flashstore"]
    v = PlanVector.read(PLAN_VECTORS / "imu.tfv")
    nb, n = len(v.samples[0]), len(v.samples)
    at = elf_symbol(elf, "__store_start")
    assert FLASH[0] < at and not any(lo < at + len(v.plan) and at < hi for lo, hi in elf_load_ranges(elf))
    (tmp_path / "plan.ttp").write_bytes(v.plan)
    preload = [(tmp_path / "plan.ttp", at)]
    with QemuBoard("netduinoplus2", elf=elf, preload=preload) as board, BoardClient(board.endpoint) as c:
        held = c.stats()["plan_bytes"]
        store = c.ping()["blob_capacity"]
        cap = c.store_samples(0, [], nb)["sample_capacity"]
    (tmp_path / "samples.bin").write_bytes(b"".join(s + bytes(-nb % 4) for s in v.samples))
    preload.append((tmp_path / "samples.bin", at + store - cap * (nb + -nb % 4)))
    with QemuBoard("netduinoplus2", elf=elf, preload=preload) as board, BoardClient(board.endpoint) as c:
        for s, y in zip(v.samples, v.labels):
            c.push_sample(s, y)
        tr = c.train(v.steps, v.lr_m, v.lr_e, round_id=1)
        state = c.state()
    with QemuBoard("netduinoplus2", elf=elf, preload=preload[:1]) as board, BoardClient(board.endpoint) as c:
        for s, y in zip(v.samples, v.labels):  # without the flashed samples: PUSH_SAMPLE cannot write the ROM
            c.push_sample(s, y)
        c.train(v.steps, v.lr_m, v.lr_e, round_id=1)
        unflashed = c.state()
    assert held == len(v.plan) and store > 700 * KB and cap >= n
    assert tr["steps_done"] == v.steps and state["state_hash"] == v.state_hash
    assert unflashed["state_hash"] != v.state_hash
    # the pool the statics leave of QEMU's 128 KiB (secure aggregation's device state took ~1 KB of it)
    assert elf_symbol(elf, "__arena_end") - elf_symbol(elf, "__arena_start") > 100_000
