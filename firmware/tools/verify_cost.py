"""Instructions one Ed25519 verification costs on the emulated boards (the LOAD_PLAN of a signed plan).

``python firmware/tools/verify_cost.py [--board an500] [--elf PATH]`` runs the board twice under the QEMU counting
plugin (qemu_pcprof.c, as firmware/tools/profile.py): an unprovisioned board loading the imu test plan unsigned,
and a board with the fleet's Ed25519 key in its key slot loading the same plan signed. It prints the instructions
spent in tf_ed25519.c + tf_sha512.c (the verification proper, exact: the emulation is deterministic) and the
difference of the two whole runs (verification + the 64 signature bytes crossing the UART). A developer tool,
not a test.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.board import BoardClient, QemuBoard, key_slot_preload
from device_agent.wire.envelope import SigAlg, Signer, Verifier, open_blob, seal
from device_agent.wire.keyslot import key_slot_to_bytes
from device_agent.wire.plan import PLAN
from tests.firmware.conftest import PLAN_VECTORS, PlanVector


@dataclasses.dataclass
class ProfiledBoard(QemuBoard):  # as firmware/tools/profile.py
    plugin: str = ""
    out: str = ""

    def command(self, port: int) -> list[str]:
        return super().command(port) + ["-plugin", f"{self.plugin},out={self.out}"]


def run(board: str, elf: Path, plugin: Path, blob: bytes, preload: list, out: Path) -> dict[int, int]:
    b = ProfiledBoard(f"mps2-{board}", elf=elf, plugin=str(plugin), out=str(out), preload=preload)
    with b, BoardClient(b.endpoint, timeout=300) as c:
        c.load_plan(blob)
    return {int(a, 16): int(n) for a, n in (line.split() for line in out.read_text().splitlines())}


def source_of_symbols(elf: Path) -> list[tuple[int, str, str]]:
    """(start, name, source file) of every function symbol, sorted."""
    out = subprocess.run(["arm-none-eabi-nm", "-n", "-l", str(elf)], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tTW":
            rows.append((int(parts[0], 16) & ~1, parts[2], parts[3].rsplit("/", 1)[-1].split(":")[0] if len(parts) > 3 else ""))
    return sorted(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--board", default="an500", choices=("an500", "an386"))
    ap.add_argument("--elf", type=Path, help="a built tinyfleet.elf (default: build one)")
    args = ap.parse_args()
    v = PlanVector.read(PLAN_VECTORS / "imu.tfv")
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    signed = seal(PLAN, bytes(open_blob(PLAN, v.plan, Verifier.unsigned())), Signer.ed25519(key))
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp)
        elf = args.elf
        if elf is None:
            from benchmarks.firmware_paper import build_firmware
            elf, _, _ = build_firmware(build, args.board)
        plugin = build / "qemu_pcprof.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(plugin), str(Path(__file__).parent / "qemu_pcprof.c")],
                       check=True)
        slot = key_slot_preload(elf, key_slot_to_bytes(SigAlg.ED25519, key.public_key().public_bytes_raw()),
                                build / "slot.bin")
        plain = run(args.board, elf, plugin, v.plan, [], build / "plain.txt")
        sig = run(args.board, elf, plugin, signed, [slot], build / "signed.txt")
        syms = source_of_symbols(elf)
    starts = [s for s, _, _ in syms]
    by_fn: collections.Counter = collections.Counter()
    for a, n in sig.items():
        i = bisect.bisect_right(starts, a) - 1
        if i >= 0 and syms[i][2] in ("tf_ed25519.c", "tf_sha512.c"):
            by_fn[syms[i][1]] += n
    total = sum(by_fn.values())
    print(f"{args.board}: Ed25519 verify of a {len(signed)}-byte plan: {total:,} instructions in tf_ed25519.c + "
          f"tf_sha512.c; whole run signed - unsigned: {sum(sig.values()) - sum(plain.values()):,}")
    for name, n in by_fn.most_common(12):
        print(f"  {n:>12,}  {name}")


if __name__ == "__main__":
    main()
