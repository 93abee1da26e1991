"""Secure aggregation's crypto on emulated Cortex-M boards: instructions, flash and stack of X25519 and the masks.

Builds firmware/secagg.mk's ELFs (mps2-an386 = Cortex-M4, mps2-an500 = Cortex-M7), runs each under QEMU
``-icount shift=0`` (virtual time = instructions: SysTick at 25 MHz, 1 tick = 40 instructions), and reads the one
result line each board prints: every golden vector checked (``ok``), then ticks of one X25519 agreement, one HKDF
mask key, one mask over the tiny plan's 1,400 words, a whole masked input with 4 peers, and, as the baseline
measured in the same run, the Ed25519 check a board already does for every model update. Flash: text + data of
the crypto objects (X25519, ChaCha20, HKDF + masks, SHA-256) linked alone; stack: the painted-stack high-water of
the whole run. The on-board cost of a round with n peers is ~ (n + 1) masks + n X25519 + 2 X25519 key pairs.

Host devices (``--host-devices 10,50``): one plain FedAvg round and one masked round of n host devices (the engine
trainer on the tiny plan, real device protocols and coordinator, an in-memory link in place of the broker), same
devices and seeds: payload bytes each device sends and receives (unicast; the retained model is the same in both),
the coordinator's CPU time per round, and the mean device CPU time per round, masked over plain in the same run;
``bit_exact``: both rounds committed the same model.

Rounds with QEMU boards (``--round-boards 10+10``: 10 boards, half M4 half M7 under ``-icount shift=0``, and 10
host devices): the same plain and masked rounds with the boards training on the board and, masked, doing the whole
device side of the protocol themselves (device_agent/board_secagg.py); bytes, round wall time (the in-memory link
serves devices one after another, so it is the sum of their work) and each board's instructions per protocol step
(its STATS counters: ticks x 40).

    python benchmarks/secagg_cost.py [--host-devices 10,50] [--no-boards] [--round-boards B+H]
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


def host_round(n: int, secure: bool, boards: dict | None = None, plan=None) -> dict:
    """One round of ``n`` in-memory devices; bytes, CPU seconds, the round's wall time and the committed model.

    ``boards``: device id -> :class:`device_agent.board.BoardClient` of the devices that are QEMU boards (they train
    on the board, N = 1 steps, and in a masked round mask on the board: device_agent/board_secagg.py); ``plan``: the
    compiled plan every device runs (boards need its arena layout)."""
    from collections import deque

    from device_agent import protocol as dp
    from device_agent.buffer import SampleBuffer
    from device_agent.engine.trainer import Trainer
    from device_agent.wire.envelope import Verifier
    from device_agent.wire.messages import Publish
    from fleet import coordinator as co
    from fleet.round import RoundConfig
    from fleet.security.secagg_config import SecureAggregationConfig
    from fleet.store import Store
    from tests.fixtures.tiny import tiny_dataset, tiny_plan

    boards = boards or {}
    plan, now = plan or tiny_plan(), [0.0]
    cfg = co.CoordinatorConfig(round=RoundConfig(goal=n, over_selection=1.0, quorum=0.5, deadline_s=600.0), lr=0.2,
                               local_steps=8, batch_size=1 if boards else 8,
                               secure_aggregation=SecureAggregationConfig(stage_timeout=600.0) if secure else None)
    coord = co.Coordinator(plan, Store(), cfg, lambda: now[0], co.WireCodec(plan))
    devs = {}
    for i in range(n):
        x, y = tiny_dataset(48, seed=i)
        buf = SampleBuffer(64, x.shape[1:])
        buf.add(x, y)
        did = f"d{i:03d}"
        ident, codec = dp.Identity(did, "host", 1 << 20, 1 << 20), dp.WireDeviceCodec(plan, Verifier.unsigned())
        if did in boards:
            from device_agent.board_secagg import BoardDeviceProtocol, SealingBoardTrainer, board_masked_round

            trainer = SealingBoardTrainer(boards[did], plan)
            devs[did] = BoardDeviceProtocol(ident, plan, trainer, codec, buf, seed=i,
                                            masked_round=board_masked_round(boards[did]))
        else:
            devs[did] = dp.DeviceProtocol(ident, plan, Trainer(plan), codec, buf, seed=i)
    up = dict.fromkeys(devs, 0)
    down = dict.fromkeys(devs, 0)
    cpu = {"coordinator": 0.0, "devices": 0.0}
    q: deque = deque()
    closed: list = []

    def to_coord(event) -> None:
        t = time.process_time()
        outs = coord.handle(event)
        cpu["coordinator"] += time.process_time() - t
        for o in outs:
            if isinstance(o, co.RoundClosed):
                closed.append(o)
            if not isinstance(o, Publish):
                continue
            parts = o.topic.split("/")
            if parts[0] == "dev":
                down[parts[1]] += len(o.payload)
                q.append((parts[1], dp.Received(parts[2], o.payload)))
            elif parts[0] == "model":
                q.extend((d, dp.Received("model", o.payload)) for d in devs)

    def to_dev(did: str, event) -> None:
        t = time.process_time()
        outs = devs[did].handle(event)
        cpu["devices"] += time.process_time() - t
        for o in outs:
            if isinstance(o, Publish):
                kind = o.topic.rsplit("/", 1)[1]
                if kind in ("delta", "secagg"):
                    up[did] += len(o.payload)
                q.append((None, co.Received(kind, did, o.payload)))

    def pump() -> None:
        while q:
            did, ev = q.popleft()
            to_coord(ev) if did is None else to_dev(did, ev)

    to_coord(co.Boot())
    for d in devs:
        to_dev(d, dp.Start())
    pump()
    up, down = dict.fromkeys(devs, 0), dict.fromkeys(devs, 0)  # the round only, not the first model download
    cpu = {"coordinator": 0.0, "devices": 0.0}
    t0 = time.perf_counter()
    to_coord(co.StartRound())
    pump()
    wall = time.perf_counter() - t0
    assert closed and closed[-1].committed, closed
    state = b"".join(coord.state[k].tobytes() for k in sorted(coord.state))
    return {"up": sum(up.values()) / n, "down": sum(down.values()) / n, "coordinator_s": cpu["coordinator"],
            "device_s": cpu["devices"] / n, "state": state, "round_s": wall}


def host_overhead(sizes: list[int]) -> tuple[dict, list[tuple]]:
    result, rows = {}, []
    for n in sizes:
        plain, masked = host_round(n, False), host_round(n, True)
        r = {"devices": n, "bit_exact": plain["state"] == masked["state"],
             "up_bytes_per_device": {"plain": round(plain["up"]), "masked": round(masked["up"])},
             "down_bytes_per_device": {"plain": round(plain["down"]), "masked": round(masked["down"])},
             "coordinator_cpu_s": {"plain": round(plain["coordinator_s"], 3),
                                   "masked": round(masked["coordinator_s"], 3)},
             "device_cpu_s": {"plain": round(plain["device_s"], 4), "masked": round(masked["device_s"], 4)},
             "round_s": {"plain": round(plain["round_s"], 3), "masked": round(masked["round_s"], 3)}}
        for k in ("up_bytes_per_device", "down_bytes_per_device", "coordinator_cpu_s", "device_cpu_s", "round_s"):
            r[k]["ratio"] = round(r[k]["masked"] / max(r[k]["plain"], 1e-9), 2)
        result[f"host_{n}"] = r
        up = r["up_bytes_per_device"]
        rows.append((f"host x{n}", r["bit_exact"], f"{up['plain']} -> {up['masked']} (x{up['ratio']})",
                     f"{r['down_bytes_per_device']['plain']} -> {r['down_bytes_per_device']['masked']}",
                     f"{r['coordinator_cpu_s']['plain']} -> {r['coordinator_cpu_s']['masked']} s",
                     f"{r['device_cpu_s']['plain']} -> {r['device_cpu_s']['masked']} s",
                     f"{r['round_s']['plain']} -> {r['round_s']['masked']} s (x{r['round_s']['ratio']})"))
    return result, rows


STEPS = ("seal", "begin", "roster", "roster_add", "share_keys", "get_share", "put_share", "mask", "get_masked",
         "unmask", "get_reveal")


def board_overhead(n_boards: int, n_hosts: int) -> dict:
    """A plain and a masked round of ``n_boards`` QEMU boards (half mps2-an386 = M4, half mps2-an500 = M7, under
    ``-icount shift=0``) and ``n_hosts`` host devices, in-memory link, same devices and seeds: bytes, the round's
    wall time (devices served one after the other: the sum of their work), and the instructions each board spent
    in each protocol step (its STATS ticks x 40), mean per board and per call for the per-peer steps."""
    import copy
    from contextlib import ExitStack

    from device_agent.board import QemuBoard
    from device_agent.board_secagg import step_ticks
    from device_agent.bridge import connect
    from fleet.compiler.planner import plan_arena
    from tests.fixtures.tiny import tiny_plan

    plan = copy.deepcopy(tiny_plan())
    plan_arena(plan)
    n = n_boards + n_hosts
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        r = subprocess.run(["make", "-s", "-j2", "-C", str(ROOT / "firmware"), f"BUILD={tmp}", "qemu-an386",
                            "qemu-an500"], check=False, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stdout + r.stderr)
        clients, machine = {}, {}
        for i in range(n_boards):
            m = ("mps2-an386", "mps2-an500")[i % 2]
            b = stack.enter_context(QemuBoard(m, elf=Path(tmp) / m.removeprefix("mps2-") / "tinyfleet.elf",
                                              icount=True, nice=10))
            did = f"d{i * n // max(n_boards, 1):03d}"  # boards spread over the sorted ids
            clients[did] = stack.enter_context(connect(f"tcp://{b.endpoint[0]}:{b.endpoint[1]}", timeout=600))
            machine[did] = m
        plain = host_round(n, False, clients, plan)
        before = {d: step_ticks(c) for d, c in clients.items()}
        masked = host_round(n, True, clients, plan)
        after = {d: step_ticks(c) for d, c in clients.items()}
        stack = max(c.board_info()["stack_high_water"] for c in clients.values())
    out = {"boards": n_boards, "hosts": n_hosts, "bit_exact": plain["state"] == masked["state"],
           "up_bytes_per_device": {"plain": round(plain["up"]), "masked": round(masked["up"])},
           "down_bytes_per_device": {"plain": round(plain["down"]), "masked": round(masked["down"])},
           "round_s": {"plain": round(plain["round_s"], 2), "masked": round(masked["round_s"], 2)},
           "board_stack_high_water": stack}
    for k in ("up_bytes_per_device", "down_bytes_per_device", "round_s"):
        out[k]["ratio"] = round(out[k]["masked"] / max(out[k]["plain"], 1e-9), 2)
    for m, cpu in (("mps2-an386", "cortex-m4"), ("mps2-an500", "cortex-m7")):
        ds = [d for d in clients if machine[d] == m]
        if not ds:
            continue
        ins = {s: sum(after[d][f"{s}_ticks"] - before[d][f"{s}_ticks"] for d in ds) * INSNS_PER_TICK / len(ds)
               for s in STEPS}
        steps = {s: round(v) for s, v in ins.items()}
        steps["get_share_per_peer"] = round(ins["get_share"] / (n - 1))
        steps["put_share_per_peer"] = round(ins["put_share"] / (n - 1))
        steps["total"] = round(sum(ins.values()))
        out[cpu] = steps
    return out


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host-devices", default="10,50", help="comma-separated fleet sizes for the host part ('' none)")
    ap.add_argument("--no-boards", action="store_true", help="skip the QEMU boards")
    ap.add_argument("--round-boards", default="", help="BOARDS[+HOSTS]: also a plain and a masked round with that many "
                                                       "QEMU boards (and host devices), e.g. 10+10")
    args = ap.parse_args()
    sizes = [int(v) for v in args.host_devices.split(",") if v]
    result, rows = {}, []
    if sizes:
        result, host_rows = host_overhead(sizes)
        for r in [("fleet", "bit-exact", "up B/device plain -> masked", "down B/device", "coordinator CPU/round",
                   "device CPU/round"), *host_rows]:
            print("  ".join(str(c) for c in r))
    if args.round_boards:
        nb, _, nh = args.round_boards.partition("+")
        r = board_overhead(int(nb), int(nh or 0))
        result[f"boards_{nb}_hosts_{nh or 0}"] = r
        print(f"round with {nb} QEMU boards + {nh or 0} hosts: bit-exact {r['bit_exact']}, up B/device "
              f"{r['up_bytes_per_device']}, round s {r['round_s']}; insns per board step: "
              + "; ".join(f"{c}: {r[c]}" for c in ("cortex-m4", "cortex-m7") if c in r))
    if args.no_boards:
        emit(result)
        return
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
                   "shamir_share_insns": ins["shamir_share"], "shamir_threshold": r["shamir_threshold"],
                   "aead_seal_insns": ins["aead_seal"], "aead_bytes": r["aead_bytes"],
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
