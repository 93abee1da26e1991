"""Firmware test plumbing: one build of both QEMU ELFs per session, the golden plan vectors, a .tfv reader."""

from __future__ import annotations

import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, require_cmd

FIRMWARE = ROOT / "firmware"
PLAN_VECTORS = FIRMWARE / "tests" / "vectors" / "plans"


@pytest.fixture(scope="session")
def board_elfs(tmp_path_factory) -> dict[str, Path]:
    """``make qemu-an386 qemu-an500`` into a private build dir (other sessions may build in parallel)."""
    require_cmd("arm-none-eabi-gcc", "qemu-system-arm", "make")
    build = tmp_path_factory.mktemp("fw")
    r = subprocess.run(["make", "-s", "-j2", "-C", str(FIRMWARE), f"BUILD={build}", "qemu-an386", "qemu-an500"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"mps2-an386": build / "an386" / "tinyfleet.elf", "mps2-an500": build / "an500" / "tinyfleet.elf"}


def _pad4(n: int) -> int:
    return n + (-n % 4)


@dataclass
class PlanVector:
    """One .tfv file (layout: tests/firmware/gen_plan_vectors.py)."""

    steps: int
    lr_m: int
    lr_e: int
    plan: bytes
    samples: list[bytes]
    labels: list[int]
    state_hash: bytes
    state: bytes
    logits: bytes
    correct: list[int]
    optimizer: bytes = b""  # the recipe's optimizer region after the steps (b"" without a recipe)
    pending: int = 0

    @classmethod
    def read(cls, path: Path) -> PlanVector:
        b = path.read_bytes()
        magic, ver, steps, lr_m, lr_e, n, sb, plen = struct.unpack_from("<4sIIiiIII", b, 0)
        assert magic == b"TFTV" and ver == 2, f"{path}: not a TFTV v2 file"
        pos = 32
        plan = b[pos:pos + plen]
        pos += _pad4(plen)
        samples = [b[pos + i * sb: pos + (i + 1) * sb] for i in range(n)]
        pos += _pad4(n * sb)
        labels = list(np.frombuffer(b, "<i4", n, pos))
        pos += 4 * n
        h = b[pos:pos + 32]
        (slen,) = struct.unpack_from("<I", b, pos + 32)
        state = b[pos + 36: pos + 36 + slen]
        pos += 36 + _pad4(slen)
        (k,) = struct.unpack_from("<I", b, pos)
        logits = b[pos + 4: pos + 4 + k]
        pos += 4 + _pad4(k)
        correct = list(b[pos:pos + steps])
        pos += _pad4(steps)
        (olen,) = struct.unpack_from("<I", b, pos)
        opt = b[pos + 4:pos + 4 + olen]
        (pending,) = struct.unpack_from("<I", b, pos + 4 + _pad4(olen))
        return cls(steps, lr_m, lr_e, plan, samples, [int(v) for v in labels], h, state, logits, correct, opt,
                   pending)
