"""Secure aggregation's crypto on emulated Cortex-M boards: instructions, flash and stack of X25519 and the masks.

Builds firmware/secagg.mk's ELFs (mps2-an386 = Cortex-M4, mps2-an500 = Cortex-M7), runs each under QEMU
``-icount shift=0`` (virtual time = instructions: SysTick at 25 MHz, 1 tick = 40 instructions), and reads the one
result line each board prints: every golden vector checked (``ok``), then ticks of one X25519 agreement, one HKDF
mask key, one mask over the tiny plan's 1,400 words, a whole masked input with 4 peers, and, as the baseline
measured in the same run, the Ed25519 check a board already does for every model update. Flash: text + data of
the crypto objects (X25519, ChaCha20, HKDF + masks, SHA-256) linked alone; stack: the painted-stack high-water of
the whole run. The on-board cost of a round with n peers is ~ (n + 1) masks + n X25519 + 2 X25519 key pairs.

    python benchmarks/secagg_cost.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit

INSNS_PER_TICK = 40  # -icount shift=0: 1 ns of virtual time per instruction; SysTick at 25 MHz
BOARDS = {"an386": "cortex-m4", "an500": "cortex-m7"}


def build(build_dir: Path) -> None:
    """``make -f secagg.mk qemu`` into ``build_dir`` (ELFs at ``build_dir/secagg/<board>/secagg.elf``)."""
    r = subprocess.run(["make", "-s", "-j2", "-C", str(ROOT / "firmware"), "-f", "secagg.mk", f"BUILD={build_dir}", "qemu"],
                       check=False, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stdout + r.stderr)


def run_board(elf: Path, machine: str, timeout: float = 120.0) -> dict[str, int]:
    """Run ``elf`` on QEMU ``machine`` with -icount shift=0 until its result line; the line's fields as ints."""
    cmd = ["qemu-system-arm", "-M", machine, "-nodefaults", "-display", "none", "-monitor", "none", "-kernel",
           str(elf), "-serial", "stdio", "-icount", "shift=0,align=off,sleep=on"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            text=True)
    try:
        end = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:  # NOTE: the board sleeps after its line: QEMU is stopped, not waited for
            if line.startswith("SECAGG") and line.rstrip().endswith("DONE"):
                return {k: int(v) for k, v in (f.split("=") for f in line.split()[1:-1])}
            if time.monotonic() > end:
                break
        raise RuntimeError(f"{machine}: no result line within {timeout:g} s")
    finally:
        proc.kill()
        proc.wait()


def flash_bytes(obj: Path) -> int:
    text, data, _ = (int(v) for v in subprocess.run(["arm-none-eabi-size", str(obj)], capture_output=True, text=True,
                                                     check=True).stdout.splitlines()[1].split()[:3])
    return text + data


def main() -> None:
    result, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        for board, cpu in BOARDS.items():
            r = run_board(Path(tmp) / "secagg" / board / "secagg.elf", f"mps2-{board}")
            if not (r["ok"] and r["ed25519_ok"]):
                raise SystemExit(f"{board}: golden vectors do not match: {r}")
            ins = {k[:-6]: v * INSNS_PER_TICK for k, v in r.items() if k.endswith("_ticks")}
            res = {"cpu": cpu, "bit_exact": True, "x25519_insns": ins["x25519"], "hkdf_key_insns": ins["hkdf"],
                   "mask_insns_per_word": round(ins["mask"] / r["mask_words"], 1),
                   "masked_input_insns": ins["input"], "masked_input_peers": r["input_peers"],
                   "masked_input_words": r["mask_words"], "ed25519_verify_insns": ins["ed25519_verify"],
                   "x25519_vs_ed25519_verify": round(ins["x25519"] / ins["ed25519_verify"], 3),
                   "flash_bytes": flash_bytes(Path(tmp) / "secagg" / board / "crypto.o"),
                   "stack_bytes": r["stack_used"]}
            result[board] = res
            rows.append((board, cpu, f"{res['x25519_insns'] / 1e6:.2f}", f"{res['ed25519_verify_insns'] / 1e6:.2f}",
                         str(res["x25519_vs_ed25519_verify"]), str(res["hkdf_key_insns"]),
                         str(res["mask_insns_per_word"]), f"{res['masked_input_insns'] / 1e6:.1f}",
                         str(res["flash_bytes"]), str(res["stack_bytes"])))
    emit(result, rows, ("board", "cpu", "M insns X25519", "M insns Ed25519 verify (baseline)", "ratio",
                        "insns HKDF key", "insns/word mask", "M insns masked input (1400 words, 4 peers)",
                        "flash bytes", "stack bytes"))


if __name__ == "__main__":
    main()
