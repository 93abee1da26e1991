"""Fault injection with real processes: does a fleet lose, double-count or diverge when things break?

One command: ``python benchmarks/faults.py [--quick] [--kills K] [--seed S] [--only a,b] [--keep DIR]``.
Every scenario runs Mosquitto (persistence on), ``tinyfleet serve`` and 4 (``--quick``: 3) ``device-agent run``
processes on a free loopback port (``fleet/sim/faults.py``); the rounds are designed so the result is
well-defined (every device in every round, deterministic training, exact integer FedAvg), and a first fault-free
run of the same seed is the reference:

- ``broker_kill``: SIGKILL the broker K times at random points (seeded; spread over the run), restart it with
  its persistence file.
- ``coordinator_kill``: SIGKILL ``tinyfleet serve`` K times and restart it on its store: a third at a random
  moment, a third between accepting a delta and checkpointing it (``--crash-at accept:N``: inside the store
  transaction, before it commits), a third after the checkpoint but before the acks (``--crash-at commit:N``).
- ``chaos_proxy``: every client talks through ``fleet/sim/chaos_proxy.py``, which duplicates 30 % and delays
  (reorders) 30 % of all PUBLISH packets in both directions.
- ``garbage``: a rogue client publishes random, empty, oversize (2 MiB), truncated and bit-flipped deltas, a
  replayed old delta and malformed hello/status messages on device topics during the run.
- ``poison``: during the run a rogue client publishes poison on every device topic (hello, status and delta):
  deeply nested JSON (``[`` x 995, ``{`` x 3000: the message that once wedged the coordinator), invalid UTF-8,
  truncated JSON, empty and random payloads; a flood (~50/s) on unknown device ids, and about one message
  every 2 s on each real device's topics (under the per-device rate limits, so the run stays comparable with
  the reference); the coordinator is SIGKILLed and restarted twice meanwhile (its persistent session gets the
  poison queued while it is down). Passes like the others: nothing lost, nothing counted twice, every round
  committed with every device (no stalled round), models bit-identical, and no coordinator error at all.
- ``device_restart``: SIGKILL a device agent (K/4 times, at least 2) and start it again at once (same id, data
  and counter file; its Last Will waits 60 s, so the coordinator never sees it leave).
  Each of these passes when no acknowledged delta is lost, none is counted twice, nothing crashed that was not
  killed on purpose, every round committed with every device, and every model version is bit-identical to the
  reference run's.
- ``device_kill`` / ``device_hang`` (keepalive 2 s, will delay 1 s): a device is SIGKILLed (the kernel closes
  its socket, no DISCONNECT) or SIGSTOPped (no FIN, no packets: only the keepalive finds it); passes when the
  coordinator's registry marks it offline within ``keepalive x 1.5 + will delay`` + 1 s (Mosquitto runs will
  delays on a whole-second clock) + 0.3 s (serve reports registry changes every 0.2 s), plus for the hang 7 s:
  Mosquitto 2.0.x sweeps for expired keepalives only every ~6 s, on the same whole-second clock (its
  keepalive.c; measured 5.6-10.6 s with a 3 s keepalive window), and the rounds go on without it.
- ``async_broker_kill``, ``async_coordinator_kill``, ``async_chaos_proxy``: the same faults under ``mode: async``
  (buffer of devices - 1, every idle device training, 3x the sync run's rounds as versions). Versions depend on arrival order, so
  there is no reference run: each passes when every acknowledged delta is stored once, in a committed buffer or
  the one left open at the end, every committed buffer holds exactly K deltas, exactly ``rounds`` versions were
  published (a restarted coordinator continues the count), and every version replays bit for bit from its
  buffer's stored deltas and the version before (the coordinator's aggregation on a copy of the store).

- ``secagg_dropout``, ``secagg_coordinator_kill``, ``secagg_broker_kill``: masked rounds (``secure_aggregation``,
  threshold 0.6, quorum 0.5) with device agents SIGKILLed and restarted, ``tinyfleet serve`` SIGKILLed at random
  moments (it abandons the open masked round) and the broker SIGKILLed. An observer records everything the broker
  carries on the secure-aggregation topics (all the coordinator and the broker see); each passes with 0 lost
  (every committed version is exactly what the observer recomputes from the observed masked inputs and unmask
  answers) and 0 revealed (no device has both its self-mask seed and its masking key reconstructable, no masked
  input is non-uniform once every self mask the observer can rebuild is removed, nothing individual stored).

Columns: ``lost`` acknowledged deltas missing from the store or from a committed round; ``duplicated`` deltas
stored or counted twice; ``rejected`` acks with ``accepted: false``; ``crashes`` process deaths and coordinator
errors that were not injected; ``faults`` what was injected. Last line: ``{"scenarios": {name: {"pass",
"lost", "duplicated", "rejected", "crashes"}}}`` (secure scenarios add ``revealed``); ``revealed`` device inputs an
observer of the coordinator and the broker could unmask.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit
from fleet.sim.faults import FleetSpec, Outcome, ProcessFleet, judge, store_versions
from tests.fixtures.tiny import tiny_dataset, tiny_plan

WATCH_SLACK = 0.3  # serve polls its registry every 0.2 s; the harness polls the log every 0.02 s
CLOCK_SLACK = 1.0  # NOTE: Mosquitto 2.0 runs will delays (and keepalives) on a whole-second clock
SWEEP_S = 6.0  # NOTE: measured + source: Mosquitto 2.0.x sweeps for expired keepalives only every ~6 s
DEVICES = 4


def spec_for(kills: int, devices: int) -> FleetSpec:
    """Enough rounds that every fault lands inside the run (about two rounds per fault, plus a margin)."""
    return FleetSpec(devices=devices, rounds=2 * kills + 2)


def run_clean(work: Path, spec: FleetSpec, seed: int) -> tuple[list[bytes], Outcome]:
    out = Outcome()
    with ProcessFleet(work / "clean", spec, tiny_plan(), tiny_dataset, seed) as f:
        f.start()
        if f.wait_serve(60 + 3 * spec.rounds) != 0:
            out.notes.append("clean run did not finish")
    judge(f, None, out)
    return store_versions(f.store), out


def _gate(f: ProcessFleet, i: int, kills: int, rng: random.Random, timeout: float = 120.0) -> bool:
    """Wait until the run is ``i/kills`` of the way through (committed rounds), then a random moment more."""
    end = time.monotonic() + timeout
    target = (i * f.spec.rounds) // (kills + 1)
    while f.committed() < target and f.serve.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.3))  # NOTE: a round takes ~0.4 s on an idle machine: stay inside the run
    return f.serve.poll() is None


def broker_kill(f: ProcessFleet, kills: int, rng: random.Random, out: Outcome) -> None:
    f.start()
    f.wait_serve_up()
    for i in range(kills):
        if not _gate(f, i, kills, rng):
            break
        f.broker.kill()
        out.kills += 1
        time.sleep(rng.uniform(0.0, 0.5))
        f.broker.start()


def coordinator_kill(f: ProcessFleet, kills: int, rng: random.Random, out: Outcome) -> None:
    kinds = [("accept", "random", "commit")[i % 3] for i in range(kills)]
    hook = lambda k: f"{k}:{rng.randint(1, 2 * f.spec.devices)}" if k != "random" else None
    f.start(hook(kinds[0]))
    for i, kind in enumerate(kinds):
        if kind == "random":
            f.wait_serve_up()
            if not _gate(f, i, kills, rng):
                break
            f.signal(f.serve)
        else:
            try:
                f.serve.wait(60)  # it kills itself at the named point
            except subprocess.TimeoutExpired:
                out.notes.append(f"--crash-at {f.serve.args[-1]} did not fire within 60 s")
                break
            if f.serve.returncode != -signal.SIGKILL:
                out.crashes += f.serve.returncode != 0
                break  # finished (or died) without reaching the point
        out.kills += 1
        f.serve_exited()
        f.start_serve(hook(kinds[i + 1]) if i + 1 < kills else None)


def chaos_proxy(f: ProcessFleet, kills: int, rng: random.Random, out: Outcome) -> None:
    f.start()
    f.wait_serve(60 + 3 * f.spec.rounds)
    s = f.proxy.stats
    out.kills = s.duplicated + s.delayed
    out.notes += [] if s.duplicated and s.reordered else ["the proxy duplicated or reordered nothing"]
    out.detail = f"{s.publishes} publishes: {s.duplicated} duplicated, {s.delayed} delayed, {s.reordered} reordered"


def garbage(f: ProcessFleet, kills: int, rng: random.Random, out: Outcome) -> None:
    import paho.mqtt.client as paho

    f.start()
    f.wait_serve_up()
    seen: dict[str, bytes] = {}
    rogue = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="rogue", protocol=paho.MQTTv5)
    rogue.on_message = lambda c, u, m: seen.setdefault(m.topic, bytes(m.payload))
    rogue.connect("127.0.0.1", f.broker.port)
    rogue.loop_start()
    top = f"tinyfleet/{f.spec.name}/dev"
    rogue.subscribe(f"{top}/+/delta", qos=1)
    end = time.monotonic() + 60
    while f"{top}/d0/delta" not in seen and time.monotonic() < end:  # a real delta to mangle and replay
        time.sleep(0.05)
    real = seen.get(f"{top}/d0/delta", b"")
    if not real:
        out.notes.append("no real delta seen to truncate, flip and replay")
    flipped = bytearray(real)
    if flipped:
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    bad_deltas = [b"", b"\x00", rng.randbytes(7), rng.randbytes(100), rng.randbytes(5000),
                  rng.randbytes(2 << 20), real[:len(real) // 2], bytes(flipped)]
    msgs = [(f"{top}/d{i % f.spec.devices}/delta", p) for i, p in enumerate(bad_deltas)]
    msgs += [(f"{top}/d1/delta", real),  # d0's delta on d1's topic: WRONG_DEVICE
             (f"{top}/d0/delta", real),  # replayed: counted once (duplicate)
             (f"{top}/d2/hello", b"{not json"), (f"{top}/d1/status", rng.randbytes(64)),
             (f"{top}/d1/hello", b'{"v":1,"type":"hello","device_id":"d1","board":"x","sram":-1}'),
             (f"{top}/evil/delta", rng.randbytes(300)), (f"{top}/d0/task", b"not for devices to send")]
    for topic, payload in msgs:
        rogue.publish(topic, payload, qos=1).wait_for_publish(10)
        time.sleep(rng.uniform(0.0, 0.03))  # NOTE: all of it inside the run: 8 quick rounds last ~3 s when idle
    if f.serve.poll() is not None:
        out.notes.append("the run ended before every bad message was published: some could not be judged")
    out.kills = len(msgs)
    f.wait_serve(60 + 3 * f.spec.rounds)
    rogue.loop_stop()
    rogue.disconnect()
    out.expect_rejected = len(bad_deltas) + 2  # + WRONG_DEVICE and the evil device's delta


POISON = (b"[" * 995, b"{" * 3000, b"\xff\xfe\xfd", b'{"v": 1, "type": "hello", "device_id": ', b"", b"null")


def poison(f: ProcessFleet, kills: int, rng: random.Random, out: Outcome) -> None:
    import threading

    import paho.mqtt.client as paho

    f.start()
    f.wait_serve_up()
    top = f"tinyfleet/{f.spec.name}/dev"
    rogue = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="poisoner", protocol=paho.MQTTv5)
    rogue.connect("127.0.0.1", f.broker.port)
    rogue.loop_start()
    stop, sent = threading.Event(), [0]

    def flood() -> None:
        step = 0
        while not stop.is_set():
            kind = ("hello", "status", "delta")[step % 3]
            payload = POISON[step % len(POISON)] if step % 7 else rng.randbytes(rng.randrange(1, 600))
            dev = f"evil{step % 3}" if step % 100 else f"d{(step // 100) % f.spec.devices}"
            rogue.publish(f"{top}/{dev}/{kind}", payload, qos=1)
            sent[0] += 1
            step += 1
            time.sleep(0.02)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        for i in range(2):
            if not _gate(f, i + 1, 3, rng):
                break
            f.signal(f.serve)
            out.kills += 1
            f.serve_exited()
            time.sleep(rng.uniform(0.2, 0.6))  # poison piles up in the coordinator's persistent session
            f.start_serve()
            f.wait_serve_up()
        f.wait_serve(60 + 3 * f.spec.rounds)
    finally:
        stop.set()
        t.join(5)
        rogue.loop_stop()
        rogue.disconnect()
    out.detail = f"{sent[0]} poison messages, {out.kills} coordinator restarts"
    out.kills += sent[0]


def device_restart(f: ProcessFleet, kills: int, rng: random.Random, out: Outcome) -> None:
    n = max(2, kills // 4)
    f.start()
    f.wait_serve_up()
    for i in range(n):
        if not _gate(f, i, n, rng):
            break
        victim = f"d{rng.randrange(f.spec.devices)}"
        f.signal(f.agents[victim])
        out.kills += 1
        f.start_agent(victim)  # same id, data and counter file: the broker kept its session
    if out.kills < n:
        out.notes.append(f"only {out.kills} of {n} restarts landed inside the run")


def device_faults(f: ProcessFleet, outs: dict[str, Outcome]) -> None:
    """``device_kill`` then ``device_hang`` in one fleet: each victim must be marked offline in time, and the
    rounds must go on without it."""
    f.start()
    end = time.monotonic() + 60
    while f.committed() < 1 and time.monotonic() < end:
        time.sleep(0.05)
    bound = f.spec.keepalive * 1.5 + f.spec.will_delay
    for k, (name, sig, extra) in enumerate((("device_kill", signal.SIGKILL, 0.0),
                                           ("device_hang", signal.SIGSTOP, SWEEP_S + CLOCK_SLACK))):
        out, victim = outs[name], f"d{f.spec.devices - 1 - k}"
        mark = len(f.serve_log.read_text(errors="replace"))
        t0 = time.monotonic()
        f.signal(f.agents[victim], sig)
        seen = f.wait_log(f"device {victim} offline", mark, bound + 10)
        done = f.committed()
        while f.committed() < done + 1 and time.monotonic() < t0 + bound + 30:  # the rounds go on without it
            time.sleep(0.05)
        if seen is None:
            out.notes.append(f"{victim} never marked offline")
            out.detail = f"{victim} not marked offline within {bound + 10:g} s"
            continue
        took = seen - t0
        limit = bound + extra + CLOCK_SLACK + WATCH_SLACK
        out.kills = 1
        out.detail = (f"{victim} offline after {took:.2f} s (keepalive x 1.5 + will delay = {bound:g} s; "
                      f"limit {limit:g} s)")
        if took > limit:
            out.notes.append(f"marked offline after {took:.2f} s > {limit:g} s")
        if f.committed() < done + 1:
            out.notes.append("no round committed after the device was lost")
    f.signal(f.serve, signal.SIGTERM)
    f.serve.wait(10)


def secure_coordinator_kill(f: ProcessFleet, kills: int, rng: random.Random, out: Outcome) -> None:
    """SIGKILL ``tinyfleet serve`` at random moments of a masked run (a masked round has no accept / commit of
    a delta to crash at) and restart it on its store: it abandons the open masked round."""
    f.start()
    for i in range(kills):
        f.wait_serve_up()
        if not _gate(f, i, kills, rng):
            break
        f.signal(f.serve)
        out.kills += 1
        f.serve_exited()
        f.start_serve()


def secure_dropout(f: ProcessFleet, kills: int, rng: random.Random, out: Outcome) -> None:
    """SIGKILL a device agent at a random moment (its masked round's keys die with it) and start it again a moment
    later: the round goes on without it (its pairwise masks recovered from the others' key shares) or, if it
    dropped before sharing keys, without it from the start."""
    f.start()
    f.wait_serve_up()
    for i in range(kills):
        if not _gate(f, i, kills, rng):
            break
        victim = f"d{rng.randrange(f.spec.devices)}"
        f.signal(f.agents[victim])
        out.kills += 1
        time.sleep(rng.uniform(0.2, 0.8))  # NOTE: a masked round takes ~0.8 s here: the restart lands inside the run
        f.start_agent(victim)


RUN = {"broker_kill": broker_kill, "coordinator_kill": coordinator_kill, "chaos_proxy": chaos_proxy,
       "garbage": garbage, "poison": poison, "device_restart": device_restart}
ASYNC_SCENARIOS = ("broker_kill", "coordinator_kill", "chaos_proxy")  # the same faults under ``mode: async``
# masked rounds (secure_aggregation): judged by fleet.sim.faults._judge_secure (0 lost, 0 revealed)
SECURE = {"secagg_dropout": secure_dropout, "secagg_coordinator_kill": secure_coordinator_kill,
          "secagg_broker_kill": broker_kill}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 kills per kill scenario (CI)")
    ap.add_argument("--kills", type=int, help="kills per kill scenario (default 20, --quick 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--devices", type=int, help=f"device agents per fleet (default {DEVICES}, --quick 3)")
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--keep", type=Path, help="keep every process's logs and store under this directory")
    args = ap.parse_args()
    kills = args.kills or (3 if args.quick else 20)
    spec = spec_for(kills, args.devices or (3 if args.quick else DEVICES))
    names = ["broker_kill", "coordinator_kill", "chaos_proxy", "garbage", "poison", "device_restart", "device_kill",
             "device_hang"] + [f"async_{n}" for n in ASYNC_SCENARIOS] + list(SECURE)
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    work = args.keep or Path(tempfile.mkdtemp(prefix="tinyfleet-faults-"))
    os.makedirs(work, exist_ok=True)
    rows, result = [], {}
    t = time.monotonic()
    clean, ref = run_clean(work, spec, args.seed)
    rows.append(("clean (reference)", ref.passed, 0, 0, 0, 0, "-", 0, f"{time.monotonic() - t:.1f}",
                 f"{spec.rounds} rounds x {spec.devices} devices"))
    outs = {name: Outcome() for name in names}
    for name in names:
        out, t = outs[name], time.monotonic()
        if name == "device_hang" and "device_kill" in names:
            continue  # measured in device_kill's fleet
        rng = random.Random(f"{args.seed}/{name}")
        base = name.removeprefix("async_")
        s, chaos = spec, ({"seed": args.seed, "dup": 0.3, "delay": 0.3} if base == "chaos_proxy" else None)
        if name in SECURE:  # NOTE: a lost device must not hold a masked round for the 300 s deadline
            s = replace(spec, secure=True, quorum=0.5, deadline=20.0, keepalive=2, will_delay=1)
        elif base != name:  # NOTE: one delta short of every device per version, so deltas also wait in the buffer;
            # a version needs fewer deltas than a sync round: 3x the versions keep every fault inside the run
            s = replace(spec, mode="async", buffer_size=max(1, spec.devices - 1), rounds=3 * spec.rounds)
        elif name == "device_restart":  # the Last Will waits longer than a restart takes: no DeviceLost
            s = FleetSpec(devices=spec.devices, rounds=spec.rounds, will_delay=60)
        elif name.startswith("device_"):
            s = FleetSpec(devices=spec.devices, rounds=10_000, quorum=0.25, keepalive=2, will_delay=1, deadline=30)
        try:
            with ProcessFleet(work / name, s, tiny_plan(), tiny_dataset, args.seed, chaos) as f:
                if name in SECURE:
                    SECURE[name](f, kills, rng, out)
                elif base in RUN:
                    RUN[base](f, kills, rng, out)
                else:
                    device_faults(f, {"device_kill": out, "device_hang": outs.get("device_hang", Outcome())})
                if name not in ("device_kill", "device_hang") and f.serve.poll() is None:
                    f.wait_serve(60 + 3 * spec.rounds)
            if (base in ("broker_kill", "coordinator_kill") or name in SECURE) and out.kills < kills:
                out.notes.append(f"only {out.kills} of {kills} kills landed inside the run")
            for n in (name, "device_hang") if name == "device_kill" else (name,):
                judge(f, None if n in ("device_kill", "device_hang") else clean, outs[n])
            if out.rejected < out.expect_rejected:
                out.notes.append(f"{out.rejected} rejections < {out.expect_rejected} bad deltas sent")
        except (RuntimeError, TimeoutError, OSError) as e:
            out.notes.append(f"{type(e).__name__}: {str(e)[-300:]}")
            out.passed = False
        for n in (name, "device_hang") if name == "device_kill" and "device_hang" in names else (name,):
            o = outs[n]
            result[n] = o.row()
            detail = "; ".join([o.detail] * bool(o.detail) + o.notes)
            rows.append((n, result[n]["pass"], o.lost, o.duplicated, o.rejected, o.crashes,
                         "-" if o.revealed is None else o.revealed, o.kills,
                         f"{time.monotonic() - t:.1f}", detail))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    emit({"scenarios": result}, rows,
         ("scenario", "pass", "lost", "duplicated", "rejected", "crashes", "revealed", "faults", "seconds", "detail"))


if __name__ == "__main__":
    main()
