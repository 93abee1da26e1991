"""A fleet of Renode STM32F746 boards: all boards up, one round of 20 local training steps each + aggregation, for
several fleet sizes and process layouts (machines per Renode process).

Runs ``configs/fleet-100-renode.yaml`` (the fleet of ``benchmarks/fleet_qemu.py``: watch IMU scenario, ImuCNN plan,
one board per device, the plan provisioned in each board's flash store) through the real ``tinyfleet simulate``
path with ``backend: renode``. Needs Renode on PATH or ``$TINYFLEET_RENODE`` (exits 2 with the reason otherwise).
Per run: ``boot_seconds`` (Renode processes launched -> every board answers and holds the plan),
``round_seconds`` (StartRound -> every board holds the new model), ``peak_host_mem_mb`` (peak of the Renode
process groups' PSS + this process's, sampled every 0.25 s), ``renode_cpu_seconds``, ``processes`` x
``machines_per_process``. Last line: JSON ``{"runs": [...]}``.

    make -C firmware stm32f746
    .venv/bin/python benchmarks/fleet_renode.py --boards 10,100 --layouts 1,10,25 [--steps 20] [--quantum-us 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, emit
from benchmarks.fleet_qemu import MemSampler


def group_pids(pgids: list[int]) -> list[int]:
    """Every live process in the given process groups (a Renode launcher script and the Mono process it runs)."""
    want, out = set(pgids), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in want:  # field 5 of stat: pgrp
            out.append(int(d.name))
    return out


def run_one(config: Path, boards: int, per_process: int, steps: int, quantum_us: float | None) -> dict:
    import yaml

    from fleet.config import from_dict
    from fleet.sim import backends
    from fleet.sim.config import SimConfig
    from fleet.sim.runner import run_simulation

    data = yaml.safe_load(config.read_text())
    data.update(devices=boards, rounds=1, local_steps=steps, backend="renode", qemu_devices=None)
    renode = dict(data.get("renode") or {})
    renode["machines_per_process"] = per_process
    if quantum_us is not None:
        renode["quantum_us"] = quantum_us
    data["renode"] = renode
    cfg = from_dict(SimConfig, data, str(config))
    mem = MemSampler()
    fleets: list = []

    def seen(fleet) -> None:
        fleets.append(fleet)
        mem.pids = group_pids([p.pid for p in fleet.boards if p.pid])
        mem.sample()

    mem.start()
    backends.FLEET_OBSERVERS.append(seen)
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    try:
        res = run_simulation(cfg, progress=False)
    finally:
        mem.stop()
        backends.FLEET_OBSERVERS.remove(seen)
    out = {"boards": boards, "machines_per_process": per_process, "local_steps": steps, "quantum_us": quantum_us,
           "errors": res.errors[:3]}
    if not fleets or not res.round_seconds:
        out["round_status"] = "did not run"
        return out
    fleet = fleets[-1]
    out.update({
        "processes": len(fleet.boards),
        "boot_seconds": round(fleet.boot_seconds, 2),
        "round_seconds": round(res.round_seconds[0], 2),
        "round_status": res.round_status[0],
        "deltas_accepted": res.devices_per_round[0],
        "peak_host_mem_mb": round(mem.peak_kb / 1024, 1),
        "renode_mem_mb_at_peak": round(mem.boards_kb / 1024, 1),
        "renode_cpu_seconds": round(sum(mem.cpu.values()), 1),
        "accuracy_initial": round(res.accuracy_initial, 4),
        "accuracy_after": round(res.accuracy_per_round[0], 4),
        "wall_seconds": round(time.monotonic() - t0, 1),
        "load_avg_before": round(load_before, 2),
        "host_cores": os.cpu_count(),
    })
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boards", default="10,100", help="fleet sizes, comma-separated")
    ap.add_argument("--layouts", default="10", help="machines per Renode process, comma-separated")
    ap.add_argument("--steps", type=int, default=20, help="local training steps per board")
    ap.add_argument("--quantum-us", type=float, default=None, help="Renode global quantum (virtual microseconds)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "fleet-100-renode.yaml")
    args = ap.parse_args()

    from fleet.sim.renode import find_renode, renode_missing_reason

    if find_renode() is None:
        print(f"fleet_renode: {renode_missing_reason()}", file=sys.stderr)
        return 2
    runs = []
    for n in (int(v) for v in args.boards.split(",")):
        for k in (int(v) for v in args.layouts.split(",")):
            r = run_one(args.config, n, min(k, n), args.steps, args.quantum_us)
            print(r, file=sys.stderr, flush=True)
            runs.append(r)
    cols = ("boards", "machines_per_process", "processes", "boot_seconds", "round_seconds", "peak_host_mem_mb",
            "renode_cpu_seconds", "round_status")
    emit({"runs": runs}, [tuple(r.get(c, "-") for c in cols) for r in runs], cols)
    return 0 if all(r.get("round_status") == "committed" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
