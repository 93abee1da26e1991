"""A fleet of emulated boards: all boards up, one round of 20 local training steps each + aggregation.

Runs ``configs/fleet-100-qemu.yaml`` (watch IMU scenario, ImuCNN plan, one QEMU mps2-an500 per device, our
firmware holding the plan) through the real ``tinyfleet simulate`` path: embedded Mosquitto, coordinator, one
device agent per board. Last line: JSON with ``boards``, ``round_seconds`` (StartRound -> every board holds the
new model), ``boot_seconds`` (QEMU launched, UART connected, plan loaded, on every board), ``peak_host_mem_mb``
(peak of: sum of the QEMU processes' PSS + this process's PSS, sampled every 0.25 s), ``samples_sent`` (samples
that crossed the UART, all boards), ``stream_seconds`` (boards up -> every board holds its device's samples),
``load_avg_before/after`` (1-minute load average: the machine is shared).

The plan is provisioned in each board's flash image (QEMU's generic loader; the firmware checks it at boot), the
device's samples reach its board once, as its sensor stream (STORE_SAMPLES), during setup, and a round's steps
are one TRAIN_LIST of stored slots. ``--push-per-step --plan-over-uart`` measures the v1 path instead (LOAD_PLAN
at boot, PUSH_SAMPLE + TRAIN 1 for every step, nothing stored up front) for a back-to-back comparison.

    make -C firmware qemu-an500
    .venv/bin/python benchmarks/fleet_qemu.py --boards 100 [--elf path/to/tinyfleet.elf] [--steps 20]
        [--push-per-step] [--plan-over-uart]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, emit


def pss_kb(pid: int) -> int:
    """Proportional set size of ``pid`` (RSS where smaps_rollup is unavailable); 0 once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        try:
            text = Path(f"/proc/{pid}/status").read_text().replace("VmRSS:", "Pss:")
        except OSError:
            return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` so far (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MemSampler:
    """Peak of (sum of the boards' PSS + own PSS), and the boards' CPU time, in a background thread."""

    def __init__(self, period: float = 0.25):
        self.pids: list[int] = []
        self.peak_kb = 0
        self.boards_kb = 0  # at the peak
        self.period = period
        self.cpu: dict[int, float] = {}  # board pid -> CPU seconds last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> MemSampler:
        self._thread.start()
        return self

    def sample(self) -> None:
        for p in list(self.pids):
            c = cpu_seconds(p)
            if c is not None:
                self.cpu[p] = c
        boards = sum(pss_kb(p) for p in list(self.pids))
        total = boards + pss_kb(os.getpid())
        if total > self.peak_kb:
            self.peak_kb, self.boards_kb = total, boards

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boards", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20, help="local training steps per board")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "fleet-100-qemu.yaml")
    ap.add_argument("--elf", help="firmware ELF (default: the config's, else firmware/build/an500)")
    ap.add_argument("--icount", action="store_true", help="deterministic virtual time (~2.3x slower)")
    ap.add_argument("--push-per-step", action="store_true",
                    help="protocol v1 path: push every step's sample (PUSH_SAMPLE + TRAIN 1), no sample store")
    ap.add_argument("--board-nice", type=int, default=None,
                    help="QEMU's CPU priority below this process (default: fleet/sim/backends.BOARD_NICE)")
    ap.add_argument("--plan-over-uart", action="store_true",
                    help="send the plan with LOAD_PLAN at boot instead of provisioning it in the flash image")
    args = ap.parse_args()

    import yaml

    from fleet.config import from_dict
    from fleet.sim import backends
    from fleet.sim.config import SimConfig
    from fleet.sim.runner import run_simulation

    data = yaml.safe_load(args.config.read_text())
    data.update(devices=args.boards, rounds=1, local_steps=args.steps, backend="qemu", qemu_devices=None)
    qemu = dict(data.get("qemu") or {})
    if args.elf:
        qemu["elf"] = args.elf
    if args.icount:
        qemu["icount"] = True
    data["qemu"] = qemu
    cfg = from_dict(SimConfig, data, str(args.config))

    mem = MemSampler().start()
    fleets: list = []

    def seen(fleet) -> None:
        fleets.append(fleet)
        if args.push_per_step:
            for t in fleet.trainers:
                t.board.stored = False
        mem.pids = fleet.pids()
        mem.sample()

    backends.FLEET_OBSERVERS.append(seen)
    backends.PRELOAD_PLAN = not args.plan_over_uart
    if args.board_nice is not None:
        backends.BOARD_NICE = args.board_nice
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    try:
        res = run_simulation(cfg, progress=False)
    finally:
        mem.stop()
        backends.FLEET_OBSERVERS.remove(seen)
    wall = time.monotonic() - t0
    own = os.times()
    if not fleets or not res.round_seconds:
        print(f"fleet_qemu: the round did not run: {res.errors or res.to_dict()}", file=sys.stderr)
        return 1
    fleet = fleets[-1]
    streams = [t.stream_done_at for t in fleet.trainers if t.stream_done_at]
    out = {
        "boards": len(fleet.boards),
        "local_steps": args.steps,
        "round_seconds": round(res.round_seconds[0], 3),
        "boot_seconds": round(fleet.boot_seconds, 3),
        "peak_host_mem_mb": round(mem.peak_kb / 1024, 1),
        "boards_mem_mb_at_peak": round(mem.boards_kb / 1024, 1),
        "round_status": res.round_status[0],
        "deltas_accepted": res.devices_per_round[0],
        "accuracy_initial": round(res.accuracy_initial, 4),
        "accuracy_after": round(res.accuracy_per_round[0], 4),
        "setup_seconds": round(res.setup_seconds, 3),
        "wall_seconds": round(wall, 3),
        "qemu_cpu_seconds": round(sum(mem.cpu.values()), 1),  # all boards, boot + round (sampled: a lower bound)
        "python_cpu_seconds": round(own.user + own.system, 1),  # this process: data, pretraining, agents, broker I/O
        "host_cores": os.cpu_count(),
        "path": "push-per-step (v1)" if args.push_per_step else "stored samples (v2)",
        "plan": "LOAD_PLAN over the UART" if args.plan_over_uart else "provisioned in the flash image",
        "board_nice": backends.BOARD_NICE,
        "samples_sent": sum(t.board.samples_sent for t in fleet.trainers),
        "stream_seconds": round(max(streams) - fleet.booted_at, 3) if streams else 0.0,
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "errors": res.errors[:5],
    }
    rows = [(k, v) for k, v in out.items() if k != "errors"]
    emit(out, rows, ("metric", "value"))
    return 0 if res.round_status[0] == "committed" else 1


if __name__ == "__main__":
    sys.exit(main())
