"""Fault harness: a fleet of real processes (Mosquitto with persistence, ``tinyfleet serve``, host device agents)
that benchmarks/faults.py kills, hangs and floods, and the checks that judge a run from the coordinator's store.

Everything is a separate OS process on a free loopback port; faults are real signals (SIGKILL, SIGSTOP) or
real bytes (garbage publishes, the :mod:`fleet.sim.chaos_proxy` in the data path). The run is designed so that
its result is well-defined: every device is selected and must contribute to every round (``over_selection`` 1,
quorum 1, a deadline far beyond any outage), devices train deterministically from ``(seed, round)`` on fixed
private data (device agents keep their counter, rounding step and last delta across restarts), and FedAvg sums
are exact integers, so any correct recovery ends bit-identical to the clean run.
It refuses to judge from what the processes say about themselves: the verdict comes from the SQLite store and
from the acks an independent observer client saw on the broker.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np

from fleet.sim.broker import EmbeddedBroker

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class FleetSpec:
    """One fault-run fleet: ``devices`` host agents on the caller's plan, ``rounds`` rounds."""

    devices: int = 4
    rounds: int = 6
    local_steps: int = 5
    deadline: float = 300.0  # far beyond any outage: a round must never close without every device
    keepalive: int = 30  # device MQTT keepalive, seconds
    will_delay: int = 5  # device Last Will delay, seconds
    quorum: float = 1.0  # 1.0: a round commits only with every device (what makes the result well-defined)
    name: str = "faults"
    mode: str = "sync"  # async: buffered rounds (``rounds`` versions of ``buffer_size`` deltas each)
    buffer_size: int = 3  # async only
    secure: bool = False  # masked rounds (secure_aggregation: threshold 0.6); judged by :func:`_judge_secure`
    stage_timeout: float = 3.0  # secure only: how long a masked round's stage waits for lost devices

    def config_yaml(self, port: int, seed: int) -> str:
        """The fleet config ``tinyfleet serve`` runs."""
        text = (f"name: {self.name}\nbroker: mqtt://127.0.0.1:{port}\ndevices: {self.devices}\n"
                f"rounds: {self.rounds}\nlocal_steps: {self.local_steps}\ndeadline: {self.deadline}\n"
                f"quorum: {self.quorum}\nover_selection: 1.0\nseed: {seed}\n")
        if self.mode == "async":  # NOTE: every idle device trains; a task outlives any outage (like the deadline)
            text += (f"mode: async\nasync_rounds: {{buffer_size: {self.buffer_size}, max_staleness: 1000, "
                     f"task_timeout_s: {self.deadline}}}\n")
        if self.secure:
            text += f"secure_aggregation: {{threshold: 0.6, stage_timeout: {self.stage_timeout}}}\n"
        return text


@dataclass
class Outcome:
    """What one scenario measured; ``row()`` is its line of the benchmark's JSON."""

    passed: bool = False
    lost: int = 0  # acknowledged (accepted) deltas missing from the store or from a committed round
    duplicated: int = 0  # deltas counted more than once (stored twice, or more deltas than devices in a round)
    rejected: int = 0  # acks with accepted = false the observer saw
    crashes: int = 0  # process deaths and coordinator errors we did not inject
    revealed: int | None = None  # secure runs: device inputs an observer of the coordinator + broker could unmask
    kills: int = 0  # faults injected
    expect_rejected: int = 0  # bad deltas the scenario sent: each must come back rejected
    detail: str = ""  # what the scenario measured, for the table
    notes: list[str] = field(default_factory=list)  # every note is a reason the scenario failed

    def row(self) -> dict:
        row = {"pass": self.passed, "lost": self.lost, "duplicated": self.duplicated, "rejected": self.rejected,
               "crashes": self.crashes}
        return row if self.revealed is None else {**row, "revealed": self.revealed}


class ProcessFleet:
    """Broker + ``tinyfleet serve`` + ``spec.devices`` ``device-agent run`` processes under ``workdir`` (emptied
    first).

    With ``chaos`` (:class:`~fleet.sim.chaos_proxy.ChaosProxy` keyword arguments) the coordinator and the devices
    connect through that proxy; the observer always talks to the broker directly. Use as a context manager;
    :meth:`close` ends every process it started.
    """

    def __init__(self, workdir: Path, spec: FleetSpec, plan, dataset, seed: int = 0, chaos: dict | None = None):
        """``plan``: the ir.Plan every device trains; ``dataset(n, seed) -> (x, y)``: one device's samples."""
        self.dir, self.spec, self.seed, self.chaos = Path(workdir), spec, seed, chaos
        self.plan, self.dataset = plan, dataset
        self.proxy = None
        shutil.rmtree(self.dir, ignore_errors=True)  # NOTE: a store or device state left over would resume an old run
        self.dir.mkdir(parents=True)
        self.broker = EmbeddedBroker(persistence=True, workdir=self.dir / "broker")
        self.client_port: int | None = None
        self.serve: subprocess.Popen | None = None
        self.agents: dict[str, subprocess.Popen] = {}
        self.acks: list[dict] = []  # every ack the coordinator published, as the observer received it
        self.secagg: list[tuple[str, str, bytes]] = []  # secure runs: (device, topic kind, payload) as observed
        self.crashes = 0
        self._killed: set[int] = set()  # pids we signalled ourselves
        self._observer = None
        self._lock = threading.Lock()

    # --- files -----------------------------------------------------------------------------------------------

    @property
    def store(self) -> Path:
        return self.dir / "store.sqlite"

    @property
    def serve_log(self) -> Path:
        return self.dir / "serve.log"

    def _prepare(self) -> None:
        from device_agent.wire.plan import plan_to_bytes

        (self.dir / "plan.ttp").write_bytes(plan_to_bytes(self.plan))
        s = self.spec
        (self.dir / "fleet.yaml").write_text(s.config_yaml(self.client_port, self.seed))
        for i in range(s.devices):
            x, y = self.dataset(32, 1000 * self.seed + i)
            np.savez(self.dir / f"d{i}.npz", x=x, y=y)

    # --- processes -------------------------------------------------------------------------------------------

    def start(self, crash_at: str | None = None) -> ProcessFleet:
        self.broker.start()
        self.client_port = self.broker.port
        if self.chaos is not None:
            from fleet.sim.chaos_proxy import ChaosProxy

            self.proxy = ChaosProxy(self.broker.port, **self.chaos).start()
            self.client_port = self.proxy.port
        self._prepare()
        self._start_observer()
        self.start_serve(crash_at)
        pub = Path(f"{self.store}.key.pem.pub")
        end = time.monotonic() + 20
        while not pub.exists():  # serve writes its key before it connects; agents verify with it
            if time.monotonic() > end or self.serve.poll() is not None:
                raise RuntimeError(f"tinyfleet serve did not start: {self.serve_log.read_text()[-2000:]}")
            time.sleep(0.05)
        for i in range(self.spec.devices):
            self.start_agent(f"d{i}")
        return self

    def start_serve(self, crash_at: str | None = None) -> None:
        cmd = [sys.executable, "-m", "fleet.cli", "serve", str(self.dir / "fleet.yaml"), "--store", str(self.store),
               "--plan", str(self.dir / "plan.ttp")] + (["--crash-at", crash_at] if crash_at else [])
        with open(self.serve_log, "a") as log:
            log.write(f"=== start {time.time():.3f}{' --crash-at ' + crash_at if crash_at else ''}\n")
            log.flush()
            self.serve = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=log)

    def start_agent(self, device_id: str) -> None:
        i = int(device_id[1:])
        cmd = [sys.executable, "-m", "device_agent.cli", "run", "--broker", f"mqtt://127.0.0.1:{self.client_port}",
               "--id", device_id, "--fleet", self.spec.name, "--data", str(self.dir / f"{device_id}.npz"),
               "--pubkey", f"{self.store}.key.pem.pub", "--seed", str(i), "--keepalive", str(self.spec.keepalive),
               "--will-delay", str(self.spec.will_delay)]
        with open(self.dir / f"{device_id}.log", "a") as log:
            self.agents[device_id] = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                                      stdout=subprocess.DEVNULL, stderr=log)

    def wait_serve_up(self, timeout: float = 30.0) -> bool:
        """Wait until the current ``tinyfleet serve`` has loaded its plan and store and is connecting (its
        ``fleet ... on`` line after the latest start marker); False if it exited or timed out first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.serve.poll() is None:
            text = self.serve_log.read_text(errors="replace")
            if "tinyfleet serve: fleet" in text[text.rfind("=== start"):]:
                return True
            time.sleep(0.05)
        return False

    def committed(self) -> int:
        """The highest round the coordinator logged as committed (any of its lives)."""
        text = self.serve_log.read_text(errors="replace") if self.serve_log.exists() else ""
        return max((int(m) for m in re.findall(r"^round (\d+): committed", text, re.MULTILINE)), default=0)

    def wait_log(self, needle: str, after: int, timeout: float) -> float | None:
        """``time.monotonic()`` when ``needle`` first shows in the serve log beyond byte ``after``, or None."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.serve_log.read_text(errors="replace")[after:]:
                return time.monotonic()
            time.sleep(0.02)
        return None

    def signal(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one of our processes, remembered as injected (not a crash)."""
        self._killed.add(proc.pid)
        if proc.poll() is None:
            proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait(10)

    def serve_exited(self) -> int | None:
        """The coordinator's exit code once it exited (counting an exit we did not cause as a crash), else None."""
        rc = self.serve.poll()
        if rc is not None and rc != 0 and self.serve.pid not in self._killed and "--crash-at" not in self.serve.args:
            self.crashes += 1
            self._killed.add(self.serve.pid)
        return rc

    def wait_serve(self, timeout: float) -> int:
        """Wait for ``tinyfleet serve`` to finish its rounds; raise TimeoutError with its log tail if it does not."""
        try:
            self.serve.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"serve still running after {timeout:g} s: "
                               f"{self.serve_log.read_text()[-1500:]}") from None
        return self.serve_exited()

    # --- the observer: every ack, straight from the broker ----------------------------------------------------

    def _start_observer(self) -> None:
        from device_agent.mqtt import BrokerURL, MqttEndpoint
        from device_agent.wire.messages import full_topic

        def on_msg(topic: str, payload: bytes, ack) -> None:
            if topic.endswith(("/secagg", "/secagg_relay")):
                with self._lock:
                    self.secagg.append((topic.split("/")[-2], topic.rsplit("/", 1)[1], bytes(payload)))
                ack()
                return
            try:
                msg = json.loads(payload)
                msg["device_id"] = topic.split("/")[-2]
            except ValueError:
                msg = {"bad": payload[:64].hex()}
            with self._lock:
                self.acks.append(msg)
            ack()

        self._observer = MqttEndpoint(BrokerURL("127.0.0.1", self.broker.port), f"{self.spec.name}-observer",
                                      [full_topic(self.spec.name, t) for t in ("dev/+/ack", "dev/+/secagg",
                                                                                "dev/+/secagg_relay")], on_msg)
        self._observer.start(10)

    # --- cleanup ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        procs = [p for p in [self.serve, *self.agents.values()] if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a hung (SIGSTOPped) agent must be able to die
                p.terminate()
            elif p.returncode not in (0, -signal.SIGTERM) and p.pid not in self._killed and p is not self.serve:
                self.crashes += 1  # a device agent died on its own
        for p in procs:  # NOTE: all terminated first, then waited for: agents say goodbye in parallel
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self._observer is not None:
            self._observer.stop()
        if self.proxy is not None:
            self.proxy.close()
        self.broker.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- judging a run from its store ------------------------------------------------------------------------------


def store_versions(store: Path) -> list[bytes]:
    """The model state of every version, in version order (read-only; the coordinator must have exited)."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        return [bytes(r[0]) for r in db.execute("SELECT state FROM versions ORDER BY version")]


def judge(fleet: ProcessFleet, clean: list[bytes] | None, out: Outcome) -> Outcome:
    """Fill ``out`` from ``fleet``'s store and observed acks; ``clean`` is the clean run's :func:`store_versions`.

    Passes when nothing acknowledged is lost, nothing is counted twice, nothing crashed that we did not kill, and
    the scenario added no note of its own (a note is a failure: e.g. fewer faults injected than planned); with
    ``clean``, also every round committed with every device and every model version equals the clean run's.
    """
    spec = fleet.spec
    if spec.mode == "async":
        return _judge_async(fleet, out)
    if spec.secure:
        return _judge_secure(fleet, out)
    with sqlite3.connect(f"file:{fleet.store}?mode=ro", uri=True) as db:
        deltas = db.execute("SELECT round_id, device_id, content_hash FROM deltas").fetchall()
        rounds = dict(db.execute("SELECT round_id, outcome FROM rounds"))
    stored = {(r, d): h for r, d, h in deltas}
    acked = {(a["round_id"], a["device_id"], a["content_hash"]) for a in fleet.acks if a.get("accepted")}
    out.lost = sum(stored.get((r, d)) != h or rounds.get(r) != "committed" for r, d, h in acked)
    per_round: dict[int, int] = {}
    for r, _, _ in deltas:
        per_round[r] = per_round.get(r, 0) + 1
    out.duplicated = (len(deltas) - len({h for _, _, h in deltas})
                      + sum(max(0, n - spec.devices) for n in per_round.values()))
    out.rejected = sum(not a.get("accepted", False) for a in fleet.acks)
    out.crashes += fleet.crashes + _coordinator_errors(fleet.serve_log)
    if clean is not None:
        _exact(fleet, clean, rounds, per_round, out)
    out.passed = not out.notes and out.lost == 0 and out.duplicated == 0 and out.crashes == 0
    return out


def _exact(fleet: ProcessFleet, clean: list[bytes], rounds: dict, per_round: dict, out: Outcome) -> None:
    spec = fleet.spec
    committed = sorted(r for r, o in rounds.items() if o == "committed")
    if committed != list(range(1, spec.rounds + 1)):
        out.notes.append(f"committed rounds {committed}, want 1..{spec.rounds}")
    short = [r for r in committed if per_round.get(r) != spec.devices]
    if short:
        out.notes.append(f"rounds without every device: {short}")
    versions = store_versions(fleet.store)
    if versions != clean[:len(versions)] or len(versions) != spec.rounds + 1:
        out.notes.append(f"model differs from the clean run ({len(versions)} versions)")


def _judge_async(fleet: ProcessFleet, out: Outcome) -> Outcome:
    """:func:`judge` for buffered async runs, whose versions depend on arrival order (no clean run to compare):
    every acknowledged delta is stored once, in a committed buffer or the one left open at the end; every
    committed buffer holds exactly ``buffer_size`` deltas; and every version is what its buffer's stored deltas
    make of the version before (replayed with the coordinator's own aggregation on a copy of the store)."""
    spec = fleet.spec
    with sqlite3.connect(f"file:{fleet.store}?mode=ro", uri=True) as db:
        deltas = db.execute("SELECT d.round_id, d.device_id, d.content_hash, b.buffer_id FROM deltas d "
                            "LEFT JOIN async_buffer b ON b.round_id = d.round_id AND b.device_id = d.device_id"
                            ).fetchall()
        made = dict(db.execute("SELECT round_id, version FROM versions WHERE version > 1"))  # buffer -> version
    stored = {(r, d): (h, b) for r, d, h, b in deltas}
    open_buffer = max(made, default=0) + 1
    acked = {(a["round_id"], a["device_id"], a["content_hash"]) for a in fleet.acks if a.get("accepted")}
    out.lost = sum(stored.get((r, d), ("", 0))[0] != h or (stored[(r, d)][1] not in made
                                                            and stored[(r, d)][1] != open_buffer)
                   for r, d, h in acked)
    sizes: dict[int, int] = {}
    for *_, b in deltas:
        sizes[b] = sizes.get(b, 0) + 1
    out.duplicated = (len(deltas) - len({h for _, _, h, _ in deltas})
                      + sum(max(0, n - spec.buffer_size) for n in sizes.values()))
    short = sorted(b for b in made if sizes.get(b) != spec.buffer_size)
    if short:
        out.notes.append(f"committed buffers without {spec.buffer_size} deltas: {short}")
    if sorted(made.values()) != list(range(2, spec.rounds + 2)):
        out.notes.append(f"versions {sorted(made.values())}, want 2..{spec.rounds + 1}")
    bad = _replay_async(fleet, made)
    if bad:
        out.notes.append(f"versions not reproduced from their buffers: {bad}")
    out.rejected = sum(not a.get("accepted", False) for a in fleet.acks)
    out.crashes += fleet.crashes + _coordinator_errors(fleet.serve_log)
    out.passed = not out.notes and out.lost == 0 and out.duplicated == 0 and out.crashes == 0
    return out


def _replay_async(fleet: ProcessFleet, made: dict[int, int]) -> list[int]:
    """Versions whose stored state differs from applying their buffer to the version before it."""
    import tempfile

    from fleet.coordinator import Coordinator
    from fleet.coordinator.codec import WireCodec
    from fleet.coordinator.core import pack_state, unpack_state
    from fleet.schema import load_fleet_config
    from fleet.store import Store

    cfg = load_fleet_config(fleet.dir / "fleet.yaml").coordinator_config()
    versions = dict(enumerate(store_versions(fleet.store), start=1))
    with tempfile.TemporaryDirectory() as tmp:  # NOTE: a coordinator writes to its store even when only asked
        copy = Path(tmp) / "store.sqlite"
        shutil.copy(fleet.store, copy)
        c = Coordinator(fleet.plan, Store(copy), cfg, time.time, WireCodec(fleet.plan))
        bad = []
        for buffer_id, version in sorted(made.items()):
            c.state = unpack_state(c.shared, versions[version - 1])
            state, _ = c.aggregate_buffer(buffer_id)
            if pack_state(c.shared, state) != versions[version]:
                bad.append(version)
        c.store.close()
    return bad


def _judge_secure(fleet: ProcessFleet, out: Outcome) -> Outcome:
    """:func:`judge` for masked runs (no delta is ever stored or acknowledged): everything the broker carried on the
    secure-aggregation topics, as the observer recorded it, is what the coordinator and the broker saw.

    ``lost``: committed masked rounds whose stored model is not exactly what the observer recomputes, with its own
    :class:`~fleet.security.secagg.SecAggServer`, from that round's observed masked inputs and unmask answers
    (an input dropped or counted twice changes the sum), plus a committed round the observer cannot recompute.
    ``revealed``: device inputs that observer could unmask: a device of a round whose self-mask seed and masking
    key both have ``threshold`` revealed shares, a masked input that is not uniform once every self mask the
    observer can rebuild is removed (more than 5% of its words within 2^24 of 0: a delta is small integers, a
    masked value is uniform mod 2^32), and any individual update in the store. Fewer committed rounds than
    ``rounds`` - faults, a crash or a note fail it too."""
    spec = fleet.spec
    with sqlite3.connect(f"file:{fleet.store}?mode=ro", uri=True) as db:
        rounds = dict(db.execute("SELECT round_id, outcome FROM rounds"))
        made = dict(db.execute("SELECT round_id, version FROM versions WHERE version > 1"))
        stored = db.execute("SELECT COUNT(*) FROM deltas").fetchone()[0]
    revealed, sums = observe_secure(fleet.secagg)
    out.revealed = stored + revealed
    recomputed = {r: t for r, t in sums.items() if rounds.get(r) == "committed"}
    if fleet.store.exists():
        out.lost = _check_secure_versions(fleet, made, recomputed)
    committed = sorted(r for r, o in rounds.items() if o == "committed")
    if len(committed) < spec.rounds - out.kills:
        out.notes.append(f"{len(committed)} masked rounds committed, want at least {spec.rounds} - {out.kills} faults")
    out.crashes += fleet.crashes + _coordinator_errors(fleet.serve_log)
    partial = _partial_rounds(fleet.secagg, spec.devices, set(committed))
    out.detail = (f"{len(committed)} of {len(rounds)} masked rounds committed ({partial} without every device), "
                  f"{len(recomputed)} recomputed")
    out.passed = not out.notes and out.lost == 0 and out.revealed == 0 and out.crashes == 0
    return out


def observe_secure(records: list[tuple[str, str, bytes]]) -> tuple[int, dict[int, np.ndarray | tuple]]:
    """What an observer of the secure-aggregation topics learns: ``(revealed, sums)`` from ``(device, kind,
    payload)`` records. ``revealed`` counts (round, device) pairs whose self-mask seed and masking key both have
    ``threshold`` revealed shares, and masked inputs that are not uniform once the self mask it can rebuild is
    removed (more than 5% of the words within 2^24 of 0); ``sums``: each round's unmasked sum, recomputed with a
    fresh :class:`~fleet.security.secagg.SecAggServer` (rounds whose messages do not make one are left out)."""
    from device_agent.wire.secagg_frames import secagg_from_bytes
    from fleet.security.secagg import SecAggServer

    seen: dict[int, dict[str, dict]] = {}  # round -> message kind -> device -> message (the first observed)
    for device, _, payload in records:
        try:
            round_id, msg = secagg_from_bytes(payload)
        except ValueError:
            continue
        seen.setdefault(round_id, {}).setdefault(type(msg).__name__, {}).setdefault(device, msg)
    revealed = 0
    sums: dict[int, np.ndarray | tuple] = {}
    for r, all_msgs in sorted(seen.items()):
        groups = {tuple(k.device_id for k in m.keys): m for m in all_msgs.get("Roster", {}).values()}
        totals = []
        for ids, roster in groups.items():  # one roster per secure-aggregation group
            msgs = {kind: {d: m for d, m in by.items() if d in ids} for kind, by in all_msgs.items()}
            revealed += _revealed(roster, msgs)
            total = _resum(SecAggServer, roster, msgs)
            if total is not None:
                totals.append(total)
        if totals:
            sums[r] = totals[0] if len(groups) == 1 else tuple(totals)
    return revealed, sums


def _revealed(roster, msgs: dict[str, dict]) -> int:
    """Devices of one group whose input an observer of its messages could unmask (see :func:`observe_secure`)."""
    from device_agent.wire.secagg import SecAggError, context, prg, shamir_combine

    answers = list(msgs.get("UnmaskResponse", {}).values())
    t, xs = roster.threshold, {k.device_id: i + 1 for i, k in enumerate(roster.keys)}
    ctx = context(roster.round_id, roster.session)
    revealed = 0
    for k in roster.keys:
        d = k.device_id
        b_shares = {xs[a.device_id]: a.self_mask_shares[d] for a in answers if d in a.self_mask_shares}
        s_shares = {xs[a.device_id]: a.key_shares[d] for a in answers if d in a.key_shares}
        revealed += len(b_shares) >= t and len(s_shares) >= t
        y = msgs.get("MaskedInput", {}).get(d)
        if y is not None and len(b_shares) >= t:
            try:
                left = y.y - prg(shamir_combine(b_shares, t, 32), ctx, y.y.size, roster.bits)
            except SecAggError:
                continue
            small = np.abs(left.astype(np.int64) - np.where(left >= 1 << 31, 1 << 32, 0)) < 1 << 24
            revealed += float(np.mean(small)) > 0.05
    return revealed


def _partial_rounds(records: list[tuple[str, str, bytes]], devices: int, committed: set[int]) -> int:
    """Committed rounds whose sum left a device out (a smaller roster, or dropouts in the unmask request)."""
    from device_agent.wire.secagg import Roster, UnmaskRequest
    from device_agent.wire.secagg_frames import secagg_from_bytes

    short = set()
    for _, _, payload in records:
        try:
            r, msg = secagg_from_bytes(payload)
        except ValueError:
            continue
        if r in committed and ((isinstance(msg, Roster) and len(msg.keys) < devices)
                               or (isinstance(msg, UnmaskRequest) and len(msg.survivors) < devices)):
            short.add(r)
    return len(short)


def _resum(server_cls, roster, msgs: dict[str, dict]) -> np.ndarray | None:
    """The round's unmasked sum, recomputed from the observed messages (None: they do not make a sum)."""
    request = next(iter(msgs.get("UnmaskRequest", {}).values()), None)
    shares_for = next(iter(msgs.get("SharesFor", {}).values()), None)
    if request is None or shares_for is None:
        return None
    s = server_cls(roster.round_id, roster.session, roster.threshold, roster.length, roster.bits, noise=roster.noise)
    try:
        for k in roster.keys:
            s.receive(k)
        s.roster()
        for d in shares_for.shared:
            s.receive(msgs["ShareKeys"][d])
        s.route_shares()
        for d in request.survivors:
            s.receive(msgs["MaskedInput"][d])
        s.unmask_request()
        for a in msgs.get("UnmaskResponse", {}).values():
            if a.device_id in request.survivors:
                s.receive(a)
        return s.result()
    except (KeyError, ValueError, RuntimeError):
        return None


def _check_secure_versions(fleet: ProcessFleet, made: dict[int, int], recomputed: dict) -> int:
    """Committed masked rounds whose stored version is not the previous one plus the recomputed sum's FedAvg."""
    import tempfile

    from fleet.coordinator import Coordinator
    from fleet.coordinator.codec import WireCodec
    from fleet.coordinator.core import pack_state, unpack_state
    from fleet.schema import load_fleet_config
    from fleet.store import Store

    cfg = load_fleet_config(fleet.dir / "fleet.yaml").coordinator_config()
    versions = dict(enumerate(store_versions(fleet.store), start=1))
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "store.sqlite"
        shutil.copy(fleet.store, copy)
        c = Coordinator(fleet.plan, Store(copy), cfg, time.time, WireCodec(fleet.plan))
        for r, version in sorted(made.items()):
            total = recomputed.get(r)
            if total is None:
                bad += 1
                continue
            c.state = unpack_state(c.shared, versions[version - 1])
            bad += pack_state(c.shared, c.state_from_sum(total)) != versions[version]
        c.store.close()
    return bad


def _coordinator_errors(log: Path) -> int:
    text = log.read_text(errors="replace") if log.exists() else ""
    return text.count("Traceback") + text.count("coordinator error")
