"""Training on an emulated Cortex-M (QEMU mps2-an500 = M7 or mps2-an386 = M4, -icount shift=0), measured: the paper's
three models at 128x128 with their ~100 KB sparse schemes (../shared/models/schemes.yaml rungs 99kb / 98kb / 99kb).

One command: ``python benchmarks/firmware_paper.py [--models mbv2-w0.35,...] [--steps 2]
[--board an500|an386|netduinoplus2]``.
Per model it compiles the plan, builds the firmware for the board (320 KB SRAM / 1 MB flash budget), loads the
plan over the UART into the
board's plan store (flash: the plan is used in place from there), pushes one random 128x128 sample, trains
``--steps`` N=1 steps and reads back:

- ``instructions_per_step``: SysTick ticks of the last TRAIN x 40 (-icount shift=0: virtual time = instructions,
  25 MHz SysTick -> 40 instructions per tick; timing starts on a tick edge, so it is exact);
- ``peak_sram_bytes``: statics (.data + .bss of the ELF, arm-none-eabi-size) + arena + trainable copies (the
  runtime's pool use) + painted-stack high-water;
- ``flash_bytes``: firmware (.text + .data, built without the on-board self-test vectors: ``SELFTEST=0``) + plan
  blob; ``macs_per_step``: forward + backward MACs counted from
  the plan's ops; ``bit_exact``: the board's state hash equals the Python Trainer's after the same steps.
A rung whose plan does not fit the board falls back to the next smaller rung (reported as ``rung``). Models
absent from ../shared/models are skipped. The last line is one JSON object.

``--board renode-stm32f746``: the paper's board on Renode (fleet/sim/renode.py; the plan written into the flash
store); ``instructions_per_step`` there is the DWT cycle count (our .repl: 216 MIPS at 216 MHz, 1 cycle per
instruction; Renode models no pipeline, cache or wait states).
``--board netduinoplus2`` (STM32F405, firmware/boards/stm32, the ``qemu-netduino-flashstore`` image): QEMU 7.2 maps
128 KB of the part's 192 KB (no CCM) and its flash is ROM to the guest, so the plan is written into the flash
store by QEMU's loader (as a factory flashes it) and so is the sample, at the sample slot the board reports
(PUSH_SAMPLE's write of the same bytes is then a no-op): the state hash still checks that the board trained on
exactly those bytes. Instructions = SysTick ticks x 1e9 / 168 MHz (-icount shift=0: 1 instruction = 1 ns).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import MODELS, ROOT, emit
from device_agent.board import BoardClient, QemuBoard, elf_symbol
from device_agent.bridge import pool_need
from device_agent.engine import ir
from device_agent.engine import patch as patching
from device_agent.engine.qmath import mant_exp
from device_agent.engine.trainer import Trainer
from fleet.compiler.compile import compile_fitting
from fleet.compiler.family import shrink
from fleet.compiler.memory import RUNTIME_ALLOWANCE_BYTES
from fleet.compiler.mit_import import import_mit
from fleet.compiler.quantize import new_classifier
from fleet.compiler.scheme import PAPER_SCHEMES, load_schemes

RUNGS = {"mbv2-w0.35": ["99kb", "73kb", "49kb"], "proxyless-w0.3": ["98kb", "74kb", "49kb"],
         "mcunet-5fps": ["99kb", "74kb", "49kb"]}
PAPER_KB = {"mbv2-w0.35": 141, "proxyless-w0.3": 135, "mcunet-5fps": 173}
PAPER_MCYCLES = {"mbv2-w0.35": 80.6, "proxyless-w0.3": 95.7, "mcunet-5fps": 118.0}
LR = 0.02


def macs(plan: ir.Plan) -> dict[str, int]:
    """Multiply-accumulates of one training step, from the op list (forward, backward input, weight update)."""
    T = plan.tensors
    out = {"forward": 0, "backward": 0}
    for op in plan.ops:
        if op.type == ir.OpType.CONV2D:
            co, cig, kh, kw = T[op.inputs[1]].shape
            y = T[op.outputs[0]].shape
            out["forward"] += co * cig * kh * kw * y[1] * y[2]
        elif op.type == ir.OpType.PWDW:
            x, y = T[op.inputs[0]].shape, T[op.outputs[0]].shape
            cm = T[op.inputs[1]].shape[0]
            _, _, kh, kw = T[op.inputs[3]].shape
            out["forward"] += cm * x[0] * x[1] * x[2] + y[0] * kh * kw * y[1] * y[2]
        elif op.type == ir.OpType.PATCH:  # tile by tile: every tile recomputes its halo
            out["forward"] += patching.macs(patching.layers_of(op, T), int(op.attrs["tiles_h"]),
                                            int(op.attrs["tiles_w"]))
        elif op.type == ir.OpType.CONV2D_BWD_INPUT:
            co, cig, kh, kw = T[op.inputs[1]].shape
            g = T[op.inputs[0]].shape
            out["backward"] += co * cig * kh * kw * g[1] * g[2]
        elif op.type == ir.OpType.CONV2D_UPDATE and int(op.attrs["update_weight"]) and int(op.attrs["k"]) > 0:
            co, cig, kh, kw = T[op.inputs[2]].shape
            g = T[op.inputs[0]].shape
            groups = int(op.attrs["groups"])
            k = int(op.attrs["k"])
            per_out = sum(1 for c in range(co) for j in range(cig) if (c // (co // groups)) * cig + j < k)
            out["backward"] += per_out * kh * kw * g[1] * g[2]
    out["total"] = out["forward"] + out["backward"]
    return out


BOARDS = ("an500", "an386", "netduinoplus2", "renode-stm32f746")  # QEMU mps2 M7 / M4, STM32F405; Renode STM32F746
# board -> (QEMU machine, make target, ELF under the build directory)
TARGETS = {"an500": ("mps2-an500", "qemu-an500", "an500/tinyfleet.elf"),
           "an386": ("mps2-an386", "qemu-an386", "an386/tinyfleet.elf"),
           "netduinoplus2": ("netduinoplus2", "qemu-netduino-flashstore", "netduino/tinyfleet-flashstore.elf"),
           "renode-stm32f746": ("renode-stm32f746", "stm32f746", "stm32f746/tinyfleet.elf")}


@contextlib.contextmanager
def board_client(machine: str, elf: Path, preload: list, icount: bool = False, timeout: float = 60.0):
    """A BoardClient on a fresh emulated board: QEMU, or Renode's STM32F746 (fleet/sim/renode.py)."""
    if machine == "renode-stm32f746":
        from fleet.sim.renode import RenodeProcess, connect_ready

        with tempfile.TemporaryDirectory() as tmp, RenodeProcess(elf, preload=preload, workdir=Path(tmp)) as proc:
            c = connect_ready(proc, proc.endpoints[0], timeout)
            try:
                yield c
            finally:
                c.close()
        return
    with QemuBoard(machine, elf=elf, icount=icount, preload=preload) as board, \
            BoardClient(board.endpoint, timeout=timeout) as c:
        yield c


def build_firmware(build: Path, board: str = "an500") -> tuple[Path, int, int]:
    """The board's ELF; returns (elf, flash bytes = text + data, statics = data + bss)."""
    # NOTE: SELFTEST=0: the on-board kernel self-test vectors (~70 KB) would take flash from the plan store, and
    # MCUNet's 99kb rung needs all of it; the training code is the same in both builds.
    _, target, rel = TARGETS[board]
    r = subprocess.run(["make", "-s", "-j2", "-C", str(ROOT / "firmware"), f"BUILD={build}", target, "SELFTEST=0"],
                       check=False, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stdout + r.stderr)
    elf = build / rel
    text, data, bss = (int(v) for v in subprocess.run(["arm-none-eabi-size", str(elf)], capture_output=True,
                                                       text=True, check=True).stdout.splitlines()[1].split()[:3])
    return elf, text + data, data + bss


def _flashed(tmp: Path, name: str, data: bytes, at: int) -> tuple[Path, int]:
    """A QEMU loader entry writing ``data`` at ``at`` (flash that is ROM to the guest)."""
    path = tmp / name
    path.write_bytes(data)
    return path, at


def _fits(plan: ir.Plan, blob: bytes, pool: int, store: int) -> bool:
    """The plan's pool use fits the board's pool, and plan + one base-update slot + one sample fit its store
    (firmware/src/device/tf_device_store.c layout_after_plan)."""
    tin = plan.tensors[plan.input_id]
    upd = 16 + 44 + sum(12 + -(-t.nbytes // 4) * 4 for t in plan.trainable) + 68
    return pool_need(plan) <= pool and -(-len(blob) // 64) * 64 + -(-upd // 64) * 64 + tin.nbytes <= store


def choose_plan(model: str, graph: ir.Graph, pool: int, store: int, budget: int, shrink_ok: bool):
    """The largest paper rung that fits the board (``compile_fitting`` under ``budget``: patched only when the
    whole-stage plan exceeds it); with ``shrink_ok``, below the smallest rung the largest scheme of its shrink
    ladder (fleet/compiler/family.py: each step drops coordinates) that fits. Returns (rung, compiled, needs)."""
    ladder = load_schemes(PAPER_SCHEMES)[model]
    needs: dict[str, int] = {}
    for rung in RUNGS[model]:
        comp = compile_fitting(graph, ladder[rung], budget)
        if _fits(comp.plan, comp.blob, pool, store):
            return rung, comp, needs
        needs[rung] = pool_need(comp.plan)
        print(f"{model}: rung {rung} does not fit the board (pool {needs[rung]} > {pool} or store), falling back",
              file=sys.stderr)
    scheme, steps = ladder[RUNGS[model][-1]], 0
    while shrink_ok and (scheme := shrink(scheme)) is not None:
        steps += 1
        comp = compile_fitting(graph, scheme, budget)
        if _fits(comp.plan, comp.blob, pool, store):
            return f"{RUNGS[model][-1]}-shrunk{steps}", comp, needs
        needs[f"{RUNGS[model][-1]}-shrunk{steps}"] = pool_need(comp.plan)
    return None, None, needs


def is_patched(plan: ir.Plan) -> bool:
    return any(op.type == ir.OpType.PATCH for op in plan.ops)


def run_model(model: str, elf: Path, flash_fw: int, statics: int, steps: int, classes: int,
              board_name: str = "an500", both: bool = True) -> dict:
    graph = new_classifier(import_mit(MODELS / f"{model}.pkl"), classes)
    machine = TARGETS[board_name][0]
    with board_client(machine, elf, []) as c:
        info, ping = c.board_info(), c.ping()
    pool, store, tick_hz = info["arena_bytes"], ping["blob_capacity"], info["tick_hz"]
    # NOTE: the target is the whole board <= 256,000 bytes; a smaller board's pool sets its own budget
    budget = min(256_000, pool + RUNTIME_ALLOWANCE_BYTES)
    rung, comp, needs = choose_plan(model, graph, pool, store, budget, shrink_ok=board_name == "netduinoplus2")
    if comp is None:  # measured: what each rung needs against what the board has
        return {"board": machine, "rung": None, "fits": False, "sram_budget_bytes": ping["sram_bytes"],
                "pool_bytes": pool, "store_bytes": store, "statics_bytes": statics, "pool_need_bytes": needs,
                "paper_peak_kb": PAPER_KB[model], "paper_mcycles": PAPER_MCYCLES[model]}
    r = measure(model, comp.plan, comp.blob, elf, flash_fw, statics, steps, machine, pool, store, tick_hz, ping)
    r.update(rung=rung, budget_bytes=budget, pool_need_bytes=needs)
    if both:  # the same scheme with the other first-stage execution, where it exists and fits the board
        other = compile_fitting(graph, comp.plan.scheme, budget, patch=not is_patched(comp.plan))
        if is_patched(other.plan) != is_patched(comp.plan) and _fits(other.plan, other.blob, pool, store):
            r["other"] = measure(model, other.plan, other.blob, elf, flash_fw, statics, steps, machine, pool,
                                 store, tick_hz, ping)
        elif is_patched(other.plan) != is_patched(comp.plan):
            r["other"] = {"patched": is_patched(other.plan), "fits": False, "pool_need": pool_need(other.plan),
                          "peak_sram_bytes_planned": other.report.peak_sram_bytes}
    return r


def measure(model: str, plan: ir.Plan, blob: bytes, elf: Path, flash_fw: int, statics: int, steps: int,
            machine: str, pool: int, store: int, tick_hz: int, ping: dict) -> dict:
    """Load ``plan`` on a fresh board, train ``steps`` steps on one sample, read back time, memory, state hash."""
    board_name = next(b for b, t in TARGETS.items() if t[0] == machine)
    rom_store = board_name == "netduinoplus2"  # flash that is ROM to the guest: plan and sample through the loader
    flash_plan = rom_store or machine == "renode-stm32f746"  # Renode: the plan written like the fleet backend's
    tin = plan.tensors[plan.input_id]
    rng = np.random.default_rng(0)
    x = rng.integers(-100, 100, (1, *tin.shape)).astype(np.int8)
    y = np.array([3], np.int32)
    lr_m, lr_e = mant_exp(LR)
    with tempfile.TemporaryDirectory() as tmp:
        preload = []
        if flash_plan:  # the plan flashed with the image (then, ROM: the sample at the slot the board reports)
            at = elf_symbol(elf, "__store_start")
            preload = [_flashed(Path(tmp), "plan.ttp", blob, at)]
        if rom_store:
            with board_client(machine, elf, preload) as c:
                cap = c.store_samples(0, [], tin.nbytes)["sample_capacity"]
            slot0 = at + store - cap * -(-tin.nbytes // 4) * 4
            preload.append(_flashed(Path(tmp), "sample.bin", x.tobytes(), slot0))
        with board_client(machine, elf, preload, icount=True, timeout=1800) as c:
            if flash_plan:
                if c.stats()["plan_bytes"] != len(blob):
                    raise RuntimeError(f"{model}: the board did not adopt the flashed plan")
            else:
                c.load_plan(blob)
            c.push_sample(x.tobytes(), int(y[0]))
            for _ in range(steps):
                c.train(1, lr_m, lr_e)
            st, stats = c.state(), c.stats()
    ref = Trainer(plan)
    for _ in range(steps):
        ref.train_step(x, y, LR)
    m = macs(plan)
    trainable = sum(t.nbytes for t in plan.trainable)
    if machine == "renode-stm32f746":  # DWT CYCCNT; our .repl runs 216 MIPS at 216 MHz: 1 cycle = 1 instruction
        insns = st["train_ticks"]
    else:  # -icount shift=0: 1 instruction = 1 ns of virtual time
        insns = round(st["train_ticks"] * 1e9 / tick_hz)
    return {
        "board": machine, "fits": True, "patched": is_patched(plan), "scheme": plan.scheme.name,
        "n_bias_update": plan.scheme.n_bias_update, "weight_ratio": {str(k): v for k, v in plan.scheme.weight_ratio.items()},
        "sram_budget_bytes": ping["sram_bytes"], "peak_sram_bytes": statics + pool_need(plan) + stats["stack_high_water"],
        "arena_bytes": plan.arena_bytes, "trainable_bytes": trainable, "statics_bytes": statics,
        "stack_high_water": stats["stack_high_water"], "flash_bytes": flash_fw + len(blob), "plan_bytes": len(blob),
        "instructions_per_step": insns, "macs_per_step": m["total"], "macs_forward": m["forward"],
        "macs_backward": m["backward"], "instructions_per_mac": round(insns / m["total"], 3),
        "bit_exact": bytes(st["state_hash"]).hex() == ref.state_hash(),
        "paper_peak_kb": PAPER_KB[model], "paper_mcycles": PAPER_MCYCLES[model],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(RUNGS))
    ap.add_argument("--steps", type=int, default=2, help="training steps; the last one is timed")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--board", choices=BOARDS, default="an500", help="QEMU board: mps2 an500 (M7), an386 (M4), netduinoplus2 (STM32F405, M4); "
                    "renode-stm32f746: Renode (needs renode on PATH or $TINYFLEET_RENODE)")
    ap.add_argument("--fitting-only", action="store_true",
                    help="measure only the plan compile_fitting picks (default: also the same scheme with the other "
                         "first-stage execution, whole or patched, where it fits the board)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        elf, flash_fw, statics = build_firmware(Path(tmp), args.board)
        result, rows = {}, []
        for model in args.models.split(","):
            if not (MODELS / f"{model}.pkl").exists():
                print(f"skip {model}: {MODELS / f'{model}.pkl'} absent", file=sys.stderr)
                continue
            r = run_model(model, elf, flash_fw, statics, args.steps, args.classes, args.board, not args.fitting_only)
            result[model] = r
            if not r["fits"]:
                rows.append((model, "none fits", "-", "-", "-", str(r["paper_peak_kb"]), "-", "-", "-",
                             str(r["paper_mcycles"]), "-", "-",
                             f"needs {min(r['pool_need_bytes'].values()) / 1000:.0f} kB > {r['pool_bytes'] / 1000:.0f}"))
                continue
            for v in (r, r.get("other")):
                if v is None:
                    continue
                if not v["fits"]:
                    rows.append((model, r["rung"], "patched" if v["patched"] else "whole", "does not fit", "-",
                                 str(r["paper_peak_kb"]), "-", "-", "-", "-", "-", "-", "-"))
                    continue
                rows.append((model, r["rung"], "patched" if v["patched"] else "whole",
                             f"{v['peak_sram_bytes'] / 1000:.1f}", f"{v['arena_bytes'] / 1000:.1f}",
                             str(r["paper_peak_kb"]), f"{v['trainable_bytes'] / 1000:.1f}",
                             f"{v['flash_bytes'] / 1000:.0f}", f"{v['instructions_per_step'] / 1e6:.1f}",
                             str(r["paper_mcycles"]), f"{v['macs_per_step'] / 1e6:.1f}", str(v["instructions_per_mac"]),
                             str(v["bit_exact"])))
    emit(result, rows, ("model", "rung", "first stage", "peak SRAM KB", "arena KB", "paper KB", "trainable KB",
                        "flash KB", "M insns/step", "paper M cycles", "M MACs", "insns/MAC", "bit-exact"))


if __name__ == "__main__":
    main()
