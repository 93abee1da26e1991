"""One simulation run: data -> plan -> broker -> coordinator + N host devices over real MQTT -> rounds -> metrics.

Everything crosses the broker exactly as in production (hello, status with Last Will, tasks, deltas, acks,
retained model); the only in-process shortcut is that host devices get the compiled plan object instead of
downloading ``plan/<hash>`` (its size is still reported as ``plan_bytes``). Accuracy is the global model's on
every device's held-out windows, measured by the harness (a simulation privilege: no device sends data).
This module wires components together; it refuses to implement protocol, training or aggregation logic.
(Over 400 lines because it is one sequential story, run -> final metrics; the parts that stand alone live in
backends, baselines and report.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from fleet.compiler.pipeline import (
    PipelineError,
    build_family,
    build_plan,
    float_batch,
    mark_personal,
    pretrain,
    torch_input_shape,
)
from fleet.sim.config import SimConfig
from fleet.sim.errors import SimulationError

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SimResult:
    """What ``tinyfleet simulate`` prints as its last line (``to_dict``); lists are per round, in order."""

    rounds: int = 0  # rounds closed (committed or abandoned)
    devices: int = 0
    accuracy_initial: float = 0.0
    accuracy_per_round: list[float] = field(default_factory=list)
    round_status: list[str] = field(default_factory=list)  # committed | abandoned
    devices_per_round: list[int] = field(default_factory=list)  # accepted deltas
    selected_per_round: list[int] = field(default_factory=list)
    bytes_up_per_device_round: list[float] = field(default_factory=list)  # MQTT PUBLISH bytes, per selected
    bytes_down_per_device_round: list[float] = field(default_factory=list)  # device (headers+topic+payload)
    payload_up_per_device_round: list[float] = field(default_factory=list)
    payload_down_per_device_round: list[float] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    devices_dropped: int = 0  # selected devices whose delta did not count, summed over rounds
    devices_offline: int = 0  # devices the coordinator saw go offline (Last Will / offline status)
    model_version: int = 0
    plan_bytes: int = 0
    plan_sram_bytes: int = 0
    scheme: str = ""
    broker: str = ""
    setup_seconds: float = 0.0
    interrupted: bool = False
    stopped: str = ""  # why the run ended before cfg.rounds without an interrupt (e.g. privacy budget spent)
    aggregator: str = ""
    # aggregation workers (fleet/coordinator/pool.py): {"workers", "restarts", "read", "summed"} (per live worker,
    # counted since its start), {} when the coordinator read every delta itself
    aggregation: dict = field(default_factory=dict)
    epsilon_per_round: list[float] = field(default_factory=list)  # DP: cumulative epsilon after each committed round
    errors: list[str] = field(default_factory=list)
    # per round, pooled over every device's test slice (fleet/sim/baselines.py); empty when not measured
    accuracy_personalized_per_round: list[float] = field(default_factory=list)  # global + each device's personal
    accuracy_local_per_round: list[float] = field(default_factory=list)  # each device trained alone
    accuracy_centralized_per_round: list[float] = field(default_factory=list)  # fp32, pooled data, epoch per round
    personal: list[str] = field(default_factory=list)  # names of the personal tensors
    accuracy_mean_per_device: dict[str, float] = field(default_factory=dict)  # method -> mean of per-device finals
    personalization: str = ""  # the method devices were asked for (personalization.method); "" none
    personal_methods: dict[str, int] = field(default_factory=dict)  # method a device used (after fallback) -> count
    new_users: list[str] = field(default_factory=list)  # device ids held out of training
    personal_lr: dict[str, float] = field(default_factory=dict)  # lr rule's choice per model (personalization.lr_grid)
    select_choices: dict[str, int] = field(default_factory=dict)  # "select" (host-only): model -> devices choosing it
    continual: dict = field(default_factory=dict)  # fleet/sim/personalize.py prequential (+ drift), metrics.json
    per_device: list[dict] = field(default_factory=list)  # metrics.json only (not the printed JSON line)
    # behaviour model (fleet/sim/paced.py): per-device speed/duty/phase, sleep/wake/task events; metrics.json only
    behaviour: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("per_device")
        d.pop("continual")
        d.pop("behaviour")
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 4)
            elif isinstance(v, list) and v and isinstance(v[0], float):
                d[k] = [round(x, 4) for x in v]
        return d


# --- plan -----------------------------------------------------------------------------------------------------


def _input_quant(plan) -> tuple[float, int]:
    t = plan.tensors[plan.input_id]
    return float(np.ravel(t.scale)[0]), int(t.zero_point)


# --- the run --------------------------------------------------------------------------------------------------


AFTER_PHASES = ("baselines", "personalization replays", "new users", "prequential streams", "done")


class _Progress:
    """Rich progress bars on stderr (or nothing)."""

    def __init__(self, enabled: bool, cfg: SimConfig):
        self.p = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True))
        self.p.start()
        self.setup = self.p.add_task("setup", total=4, info="")
        # NOTE: new users are held out of the fleet run: they never connect
        self.connect = self.p.add_task("devices connected", total=cfg.devices - len(cfg.new_user_indices()), info="")
        self.rounds = self.p.add_task("rounds", total=cfg.rounds, info="")
        self.round = self.p.add_task("round 1 deltas", total=cfg.goal_count, info="")
        # NOTE: after the rounds: baselines, personalization replays, new users, streams (long on big fleets)
        self.after = self.p.add_task("after the rounds", total=len(AFTER_PHASES) - 1, info="")

    def phase(self, name: str) -> None:
        """Mark the after-the-rounds phase ``name`` (one of AFTER_PHASES) as the one running."""
        self.update("after", completed=AFTER_PHASES.index(name), info=name)

    def update(self, task: str, **kw) -> None:
        if self.p is not None:
            self.p.update(getattr(self, task), **kw)

    def stop(self) -> None:
        if self.p is not None:
            self.p.stop()


def _open_dashboard(cfg, plan_hash: str, dashboard: tuple, stack: ExitStack):
    from fleet.dashboard.server import open_dashboard

    try:
        dash = open_dashboard(cfg, plan_hash, *dashboard, "tinyfleet simulate")
    except OSError as e:
        raise SimulationError(str(e)) from None
    stack.callback(dash.stop)
    return dash


class _Watcher:
    """Collects the coordinator's informational outputs (driver thread) for the harness (main thread)."""

    def __init__(self):
        self.also = None  # another consumer of every output (the dashboard)
        self.lock = threading.Lock()
        self.closed: list[object] = []
        self.accepted = 0
        self.selected: set[str] = set()
        self.cv = threading.Condition(self.lock)

    def __call__(self, out: object) -> None:
        from device_agent.wire.messages import Publish
        from fleet.coordinator import RoundClosed, RoundRefused, Verdict

        if self.also is not None:
            self.also(out)
        with self.cv:
            if isinstance(out, Publish) and out.topic.endswith(("/task", "/secagg_relay")):
                self.selected.add(out.topic.split("/")[1])
            elif isinstance(out, Verdict) and out.reason == "ok":
                self.accepted += 1
            elif isinstance(out, (RoundClosed, RoundRefused)):
                self.closed.append(out)
            self.cv.notify_all()

    def reset_round(self) -> None:
        with self.cv:
            self.accepted, self.selected = 0, set()


def run_simulation(cfg: SimConfig, out_dir: Path | None = None, progress: bool = True,
                   stop: threading.Event | None = None, probe=None, dashboard: tuple | None = None) -> SimResult:
    """Run ``cfg`` end to end; Ctrl-C (KeyboardInterrupt) or ``stop`` ends early with the finished rounds.

    ``probe(agents)``, if given, is called with the device agents after the last round, before they stop (tests
    read what devices hold privately, e.g. the traffic audit's personal models). ``dashboard``: ``((host, port),
    token)`` serves the live dashboard (fleet.dashboard) for the run's duration."""
    res = SimResult(devices=cfg.devices, broker=cfg.broker, aggregator="dp" if cfg.dp else cfg.aggregator)
    bar = _Progress(progress, cfg)
    try:
        with ExitStack() as stack:
            stack.callback(bar.stop)
            _run(cfg, out_dir, bar, res, stack, stop or threading.Event(), probe, dashboard)
    except KeyboardInterrupt:
        res.interrupted = True
    return res


def _run(cfg: SimConfig, out_dir: Path | None, bar: _Progress, res: SimResult, stack: ExitStack,
         stop: threading.Event, probe=None, dashboard: tuple | None = None) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_agent.board_secagg import BoardDeviceProtocol, SealingBoardTrainer, board_masked_round
    from device_agent.buffer import SampleBuffer
    from device_agent.engine.personal import Personalizer
    from device_agent.engine.trainer import Trainer
    from device_agent.mqtt import DeviceAgent
    from device_agent.protocol import DeviceProtocol, Identity, WireDeviceCodec
    from device_agent.wire.envelope import Signer, Verifier
    from device_agent.wire.messages import DEVICE_UP
    from fleet.coordinator import Coordinator, FamilyCodec, RoundClosed, StartRound, WireCodec, plan_sram
    from fleet.coordinator.core import unpack_state
    from fleet.mqtt import CoordinatorLink
    from fleet.scenarios import load_scenario
    from fleet.scenarios.base import quantize
    from fleet.sim.broker import resolve
    from fleet.store import Store

    t0 = time.monotonic()
    try:
        scenario = load_scenario(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise SimulationError(f"dataset: {e}") from None
    bar.update("setup", advance=1, info="data")
    held = set(cfg.new_user_indices())
    newcomers = [d for i, d in enumerate(scenario.devices) if i in held]
    scenario.devices = [d for i, d in enumerate(scenario.devices) if i not in held]
    res.new_users = [d.device_id for d in newcomers]
    res.devices = len(scenario.devices)
    cfg = replace(cfg, devices=len(scenario.devices))  # NOTE: the fleet is what is left (goal, selection, hello)
    family = None
    try:
        if cfg.plan_budgets:  # mixed-memory fleet: one nested plan per budget, the largest is the fleet's model
            family = build_family(cfg, scenario)
            plan, res.scheme = family.largest.plan, family.largest.scheme.name
        else:
            plan, _report, res.scheme = build_plan(cfg, scenario)
            plan = mark_personal(plan, cfg.personal)
    except (PipelineError, ValueError) as e:
        raise SimulationError(str(e)) from None
    res.personal = list(cfg.personal)
    res.personalization = cfg.personalization.method or ""
    res.plan_sram_bytes = plan_sram(plan)
    bar.update("setup", advance=1, info=f"plan {res.scheme}")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    url, embedded = resolve(cfg.broker, workdir=(out_dir / "broker") if out_dir else None, **cfg.tls_files())
    if embedded is not None:
        embedded.start()
        stack.callback(embedded.close)
        url = embedded.url
    res.broker = str(url)
    bar.update("setup", advance=1, info=str(url))

    key = Ed25519PrivateKey.generate()  # the fleet's signing key for this run
    signer, verifier = Signer.ed25519(key), Verifier.ed25519(key.public_key())
    ccfg = cfg.coordinator_config()
    store_path = str(out_dir / "store.sqlite") if out_dir is not None else ":memory:"
    codec = FamilyCodec(family, signer=signer) if family is not None else WireCodec(plan, signer=signer)
    res.plan_bytes = len(codec.plan_bytes())
    watcher = _Watcher()
    dash = _open_dashboard(cfg, codec.plan_hash, dashboard, stack) if dashboard is not None else None
    if dash is not None:
        watcher.also = lambda out: dash.update(lambda v: v.apply(out))
    agg = None
    if cfg.aggregation_workers:  # fleet/coordinator/pool.py: workers read and sum the deltas, the coordinator judges
        from fleet.coordinator.pool import AggregationPool

        agg = AggregationPool(url, cfg.name, FamilyCodec(family) if family is not None else WireCodec(plan),
                              cfg.aggregation_workers)

    pacer = None  # behaviour model: the fleet's simulated clock, which the coordinator's deadlines follow too
    if cfg.behaviour.enabled:
        from fleet.sim.paced import Pacer

        pacer = Pacer(cfg.behaviour.time_scale)
        stack.callback(pacer.stop)
    clock = time.time if pacer is None else _fleet_clock(pacer)

    def coordinator():
        c = Coordinator(plan, Store(store_path), ccfg, clock, codec)
        if agg is not None:
            c.partials = agg.partials
        return c

    kinds = tuple(k for k in DEVICE_UP if k != "delta" or agg is None)
    link = CoordinatorLink(url, cfg.name, coordinator, on_output=watcher, kinds=kinds)
    link.start()
    stack.callback(link.stop)
    if agg is not None:
        agg.start(link)
        stack.callback(agg.stop)  # NOTE: before link.stop (the stack unwinds last-in first-out)
    if dash is not None:
        dash.follow(link)

    scale, zp = _input_quant(plan)
    board_sram = max(res.plan_sram_bytes, 256_000, family.largest.need if family is not None else 0)
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="devices")  # NOTE: 2 cores; GIL-bound anyway
    stack.callback(pool.shutdown, wait=False, cancel_futures=True)
    from fleet.sim.backends import build_devices  # python Trainer or one QEMU board per device

    mixed = _mixed_fleet(cfg, family, board_sram)  # per device: (backend, board, SRAM, member or None)
    plans = [(m or family.smallest).plan if family is not None else plan for (_, _, _, m) in mixed]
    if cfg.device_groups:
        from fleet.sim.backends import build_mixed_devices

        slots = build_mixed_devices(cfg, [k[:3] for k in mixed], plans, stack)
    else:
        slots = build_devices(cfg, plan, stack)
    agent = _agent_factory(cfg, plan, url, mixed, res, pacer)  # DeviceAgent, or PacedAgent (behaviour)
    streams: list = []  # boards storing their device's samples (Futures)
    agents: list[DeviceAgent] = []
    stack.callback(lambda: [a.stop(graceful=True) for a in agents])
    specs, used = _personal_specs(cfg, plan, res.plan_sram_bytes, board_sram, slots)
    for i, dd in enumerate(scenario.devices):
        sram = cfg.personalization.device_sram[i % len(cfg.personalization.device_sram)] \
            if cfg.personalization.device_sram else board_sram
        board_name, own = cfg.model.board, plan
        if cfg.device_groups:
            _, board_name, sram, _ = mixed[i]
            own = plans[i]
        if slots[i].host is not None:  # fleet/sim/workers.py: protocol, trainer and samples live in a worker
            proto = slots[i].host.device(
                i, Identity(dd.device_id, cfg.model.board, sram, 1_000_000), verifier,
                quantize(dd.x_train, scale, zp) if dd.n_train else None, dd.y_train.astype(np.int32),
                (max(1, dd.n_train), tuple(scenario.input_shape), np.int8, cfg.seed + i), seed=cfg.seed + i,
                personal=specs[i])
            agents.append(agent(i, proto, slots[i].executor).start(timeout=None))
            continue
        buf = SampleBuffer(max(1, dd.n_train), tuple(scenario.input_shape), np.int8, seed=cfg.seed + i)
        if dd.n_train:
            xq, yq = quantize(dd.x_train, scale, zp), dd.y_train.astype(np.int32)
            buf.add(xq, yq)
            if slots[i].on_samples is not None:  # a board keeps its samples: they reach it once, as its stream
                streams.append(slots[i].on_samples(xq, yq))
        pers, cls, kw = None, DeviceProtocol, {}
        if specs[i] is not None:  # NOTE: a board keeps and trains its personal copy itself (never read back)
            on_board = getattr(slots[i].trainer, "personalizer", None)
            pers = on_board(specs[i]) if on_board is not None else Personalizer(own, specs[i])
        board = getattr(slots[i].trainer, "board", None)
        if isinstance(board, SealingBoardTrainer):  # a board masks its own delta in secure rounds
            cls, kw = BoardDeviceProtocol, {"masked_round": board_masked_round(board.client, lock=slots[i].trainer.lock)}
        proto = cls(Identity(dd.device_id, board_name, sram, 1_000_000), own, slots[i].trainer,
                    WireDeviceCodec(own, verifier), buf, seed=cfg.seed + i, personalizer=pers, **kw)
        agents.append(agent(i, proto, slots[i].executor or pool).start(timeout=None))
    deadline = time.monotonic() + 30
    online = 0
    while online < cfg.devices:
        if stop.is_set() or time.monotonic() > deadline:
            raise SimulationError(f"only {online} of {cfg.devices} devices said hello within 30 s")
        time.sleep(0.1)
        online = link.call(lambda c: sum(r.online for r in c.registry.devices.values()))
        bar.update("connect", completed=online)
    for f in streams:  # every board holds its samples before the first round
        f.result()
    if pacer is not None:  # simulated time 0: duty cycles start now
        pacer.start()
    bar.update("setup", advance=1, info="fleet up")
    res.setup_seconds = time.monotonic() - t0

    evaluator = Trainer(plan)
    slices = _device_slices(scenario, scale, zp)
    participation = {dd.device_id: 0 for dd in scenario.devices}
    x_test, y_test = scenario.test_set()
    xq_test = quantize(x_test, scale, zp)

    def model(version: int | None = None) -> dict:
        """The coordinator's current model, or the stored ``version`` (async: the session has moved on)."""
        if version is None:
            return link.call(lambda c: {k: v.copy() for k, v in c.state.items()})
        return link.call(lambda c: unpack_state(c.shared, c.store.version(version).state))

    def accuracy(version: int | None = None) -> float:
        evaluator.load_trainable(model(version))
        return evaluator.evaluate(xq_test, y_test.astype(np.int32))

    res.accuracy_initial = accuracy()
    res.personal_methods = {m: used.count(m) for m in sorted(set(used))} if cfg.personalization.method else {}
    initial = {t.id: np.array(t.data, copy=True) for t in plan.trainable}
    globals_: list[dict] = []  # every trainable tensor after each round (personal ones: initial values)
    asynchronous, first = cfg.mode == "async", len(watcher.closed)
    at_start = [a.endpoint.traffic_snapshot() for a in agents]
    for r in range(cfg.rounds):
        if stop.is_set():
            res.interrupted = True
            break
        bar.update("round", description=f"round {r + 1} deltas", completed=0, info="")
        before = [a.endpoint.traffic_snapshot() for a in agents]
        watcher.reset_round()
        t_round = time.monotonic()
        link.submit(StartRound())  # NOTE: async: opens the session once; an open session ignores it
        with watcher.cv:
            while len(watcher.closed) <= first + r:
                if stop.is_set():
                    break
                watcher.cv.wait(0.2)
                bar.update("round", completed=watcher.accepted, info=f"{len(watcher.selected)} selected")
        if len(watcher.closed) <= first + r:
            res.interrupted = True
            break
        closed = watcher.closed[first + r]  # NOTE: async versions may close faster than this loop: each in its turn
        if not isinstance(closed, RoundClosed):  # refused (privacy budget): no more rounds, nothing changed
            res.stopped, res.errors = closed.detail, [*res.errors, closed.detail]
            break
        res.model_version = closed.version
        if closed.epsilon is not None:
            res.epsilon_per_round.append(closed.epsilon)
        if not asynchronous:  # NOTE: async devices never wait for a version: they are already training the next
            _settle([a for a, k in zip(agents, mixed) if family is None or k[3] is not None],
                    closed.version if closed.committed else None)
        res.round_seconds.append(time.monotonic() - t_round)
        after = [a.endpoint.traffic_snapshot() for a in agents]
        sel = max(1, len(watcher.selected))
        up = sum(a.sent - b.sent for a, b in zip(after, before))
        down = sum(a.received - b.received for a, b in zip(after, before))
        res.bytes_up_per_device_round.append(up / sel)
        res.bytes_down_per_device_round.append(down / sel)
        res.payload_up_per_device_round.append(sum(a.sent_payload - b.sent_payload for a, b in zip(after, before)) / sel)
        res.payload_down_per_device_round.append(
            sum(a.received_payload - b.received_payload for a, b in zip(after, before)) / sel)
        res.round_status.append("committed" if closed.committed else "abandoned")
        res.devices_per_round.append(len(closed.accepted))
        res.selected_per_round.append(len(watcher.selected))
        if not asynchronous:  # NOTE: an async task spans versions: not answering one is not a drop
            res.devices_dropped += len(watcher.selected - set(closed.accepted))
        version = closed.version if asynchronous else None
        res.accuracy_per_round.append(accuracy(version))
        if dash is not None:
            dash.update(lambda v, r=r: v.add_accuracy("global", r + 1, res.accuracy_per_round[-1]))
        globals_.append({**initial, **model(version)})
        for dev in closed.accepted:
            participation[dev] = participation.get(dev, 0) + 1
        if res.personal or res.personalization:
            res.accuracy_personalized_per_round.append(
                _personalized(link, evaluator, agents, slices, bool(res.personalization))[0])
        res.rounds += 1
        bar.update("rounds", advance=1, info=f"acc {res.accuracy_per_round[-1]:.3f}")
    if asynchronous and res.rounds:  # NOTE: versions close while the harness scores the last one: per-version
        _async_traffic(res, at_start, [a.endpoint.traffic_snapshot() for a in agents])  # windows mean nothing
    if probe is not None:
        probe(agents)
    res.model_version = link.call(lambda c: c.version) if not res.interrupted else res.model_version
    res.devices_offline = link.call(lambda c: sum(not rec.online for rec in c.registry.devices.values()))
    if agg is not None:
        res.aggregation = link.call(lambda c: agg.summary())
    res.errors = link.errors + [f"{a.device_id}: {n[1]}" for a in agents for n in a.notes if n[0] == "error"]
    if pacer is not None:
        pacer.stop()
        res.behaviour.update(sim_seconds=round(pacer.now(), 3), events=list(pacer.events))
        res.errors += [f"behaviour: {e}" for e in pacer.errors]
    if res.rounds:
        bar.phase("baselines")
        _final_metrics(cfg, scenario, plan, link, evaluator, agents, slots, slices, participation, res)
        for i, m in enumerate(used):
            res.per_device[i]["personalization"] = m
        if pacer is not None:
            _behaviour_columns(res, [a.device_id for a in agents])
        if family is not None:
            _plan_columns(res, mixed, plans, codec)
        if not res.interrupted:
            _personal_metrics(cfg, plan, initial, globals_, slices, _device_slices_of(newcomers, scale, zp),
                              [int(d.subject) for d in scenario.devices], res,
                              ([d.t_train for d in scenario.devices], [d.t_train for d in newcomers]), bar.phase)
        bar.phase("done")
    if out_dir is not None:
        _write_run(out_dir, res)


def _agent_factory(cfg: SimConfig, plan, url, mixed: list[tuple], res: SimResult, pacer):
    """``agent(i, protocol, executor)``: plain device agents, or (``pacer``: ``behaviour.enabled``) agents that
    live by each device's drawn behaviour on the pacer's simulated clock (fleet/sim/paced.py)."""
    from device_agent.mqtt import DeviceAgent

    if pacer is None:
        return lambda i, proto, executor: DeviceAgent(url, cfg.name, proto, executor=executor)
    from fleet.sim.paced import PacedAgent, draw_fleet

    kinds = [(b, (name if cfg.device_groups else cfg.qemu.machine) if b == "qemu" else None)
             for b, name, _, _ in mixed]
    behaviours, res.behaviour = draw_fleet(cfg, plan, kinds)
    return lambda i, proto, executor: PacedAgent(url, cfg.name, proto, executor=executor, behaviour=behaviours[i],
                                                 pacer=pacer, seed=cfg.seed + i)


def _fleet_clock(pacer) -> Callable[[], float]:
    """The coordinator's clock under a behaviour model: wall time at setup plus the fleet's simulated seconds, so
    ``deadline``, ``heartbeat_timeout`` and async ``task_timeout_s`` are simulated seconds, as every device's speed
    and duty cycle are (``time_scale: 0.1``: a 600 s deadline closes after 60 wall s). Frozen until the pacer starts."""
    wall0 = time.time()
    return lambda: wall0 + pacer.now()


def _behaviour_columns(res: SimResult, ids: list[str]) -> None:
    """Per-device table: step time, duty cycle, awake simulated seconds, tasks lost mid-way (behaviour model)."""
    from fleet.sim.report import awake_spans

    b = res.behaviour
    for row, dev, d in zip(res.per_device, ids, b["devices"]):
        spans = awake_spans(b["events"], dev, b["sim_seconds"])
        row.update(step_s=d["step_s"], duty=d["duty"], awake_s=round(sum(e - a for a, e in spans), 1),
                   tasks_lost=sum(1 for e in b["events"] if e[1] == dev and e[2] == "dropout"))


def _mixed_fleet(cfg: SimConfig, family, board_sram: int) -> list[tuple]:
    """Per device: (backend, board, SRAM in its hello, the family member it trains or None: below the smallest)."""
    from fleet.sim.backends import device_backends, group_srams

    if cfg.device_groups:
        return [(b, name, sram, family.choose(sram)) for b, name, sram in group_srams(cfg)]
    member = family.choose(board_sram) if family is not None else None
    return [(b, cfg.model.board, board_sram, member) for b in device_backends(cfg)]


def _plan_columns(res: SimResult, mixed: list[tuple], plans: list, codec) -> None:
    """The device table of a mixed-memory fleet: each device's board and plan (budget, hash, what it needs); host
    devices' SRAM / flash are their plan's (boards report their own measurement)."""
    from device_agent.wire.plan import plan_hash
    from fleet.coordinator import plan_sram

    for row, (_, board, sram, member), p in zip(res.per_device, mixed, plans):
        row["board"] = board
        if member is None:
            row.update(plan=f"none: {sram} B < {codec.family.smallest.need} B", plan_budget=None,
                       plan_need_bytes=None, sram_bytes=None, flash_bytes=None)
            continue
        row.update(plan=plan_hash(p).hex()[:12], plan_budget=member.budget, plan_need_bytes=member.need)
        if row.get("memory_source") == "planned":
            row["sram_bytes"], row["flash_bytes"] = plan_sram(p), member.report.flash_bytes


def _personal_specs(cfg: SimConfig, plan, plan_sram: int, board_sram: int, slots) -> tuple[list, list[str]]:
    """Per device: the engine PersonalSpec it runs (None: none) and the method it uses after the memory fallback
    (fleet/compiler/personal.py); a board runs it itself (device_agent.bridge.BoardPersonalizer)."""
    from device_agent.engine.personal import PersonalSpec
    from fleet.compiler.personal import choose_method

    pc = cfg.personalization
    specs: list = []
    used: list[str] = []
    for i, slot in enumerate(slots[:cfg.devices]):
        sram = pc.device_sram[i % len(pc.device_sram)] if pc.device_sram else board_sram
        m = choose_method(plan, pc.method, plan_sram, sram) if pc.method else "none"
        used.append(m)
        specs.append(None if m == "none" else PersonalSpec(m, pc.steps, pc.lr or cfg.lr, pc.lam_q15))
    return specs, used


def _async_traffic(res: SimResult, start: list, end: list) -> None:
    """Async runs: every version's traffic figures are the run's bytes per accepted delta, and its devices are
    the ones whose deltas made it (tasks span versions, so a per-version window would split them arbitrarily)."""
    n = max(1, sum(res.devices_per_round))
    for key, attr in (("bytes_up", "sent"), ("bytes_down", "received"), ("payload_up", "sent_payload"),
                      ("payload_down", "received_payload")):
        total = sum(getattr(b, attr) - getattr(a, attr) for a, b in zip(start, end))
        setattr(res, f"{key}_per_device_round", [total / n] * res.rounds)
    res.selected_per_round = list(res.devices_per_round)


def _settle(agents, version: int | None, timeout: float = 10.0) -> None:
    """Wait until every connected device holds ``version`` (None: until their mailboxes are empty)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        live = [a for a in agents if a.endpoint.connected.is_set() and getattr(a, "awake", True)]
        if all(a.idle() and (version is None or a.protocol.version >= version) for a in live):
            return
        time.sleep(0.05)




# --- end-of-run metrics: per-device accuracies, baselines, metrics.json + report ------------------------------


def _device_slices(scenario, scale: float, zp: int) -> list:
    return _device_slices_of(scenario.devices, scale, zp)


def _device_slices_of(devices, scale: float, zp: int) -> list:
    from fleet.scenarios.base import quantize
    from fleet.sim.baselines import DeviceSlice

    return [DeviceSlice(d.device_id, quantize(d.x_train, scale, zp), d.y_train.astype(np.int32),
                        quantize(d.x_test, scale, zp), d.y_test.astype(np.int32)) for d in devices]


def _personal_metrics(cfg: SimConfig, plan, initial: dict, globals_: list[dict], slices, newcomers,
                      subjects: list[int], res: SimResult, times: tuple[list, list] = ([], []),
                      phase: Callable[[str], None] = lambda name: None) -> None:
    """Every method replayed on this run's global models (fleet/sim/personalize.py): per-device finals, new
    users, prequential curves per buffer policy and the drift case. ``times``: each fleet device's and new user's
    stream order of its training samples (DeviceData.t_train), for the validation split. ``phase(name)``: told
    as each of AFTER_PHASES starts."""
    from fleet.sim import personalize as ps

    pc = cfg.personalization
    methods = list(pc.compare)
    if not methods and not newcomers:
        return
    p = ps.Plain(cfg.local_steps, cfg.lr, pc.steps, pc.lr or cfg.lr, pc.lam_q15, cfg.seed,
                 lr_grid=tuple(pc.lr_grid), validation=pc.validation, validation_gap=pc.validation_gap)
    fleet_times, new_times = (t or None for t in times)
    if methods:
        phase("personalization replays")
        # NOTE: with an lr grid, local-only and every method take the lr chosen on device-held validation data
        # (personalization.validation: which samples a device holds back)
        p, _scores, val = ps.with_tuned_lr(plan, initial, globals_, slices, methods, p, times=fleet_times)
        res.personal_lr = {k: round(v, 6) for k, v in p.lr_by.items()}
        got = ps.compare_methods(plan, initial, globals_, slices, methods, p)
        # NOTE: "select" (host-only: a board runs one configured method) = each device's own pick among global,
        # local-only and every method by its validation data (the same replays the lr rule ran)
        choice = ps.select_per_device(val)
        got["select"] = ps.selected_accuracy(choice, got)
        for row, c in zip(res.per_device, choice):
            row["select_choice"] = c or "global"
        res.select_choices = {c: choice.count(c) for c in sorted({c or "global" for c in choice})}
        # NOTE: "global" comes from the run itself (_final_metrics), and so does "local" unless the lr rule chose
        # local-only's lr: then the replay's local-only (its chosen lr) replaces the run's
        for name in [*methods, "select", *(["local"] if p.lr_by else [])]:
            _mean_into(res, name, got[name])
            for row, a in zip(res.per_device, got[name]):
                row[f"accuracy_{name}"] = None if a is None else round(float(a), 4)
        if "local" not in res.accuracy_mean_per_device:
            _mean_into(res, "local", got["local"])
    if newcomers:
        phase("new users")
        got = ps.new_users(plan, initial, globals_[-1], newcomers, methods, pc.new_user_steps, p)
        if methods:  # a new user selects too, on a quarter of its own training data by the same rule (host-only)
            val = ps.new_users(plan, initial, globals_[-1],
                               ps.validation_split(newcomers, 0.25, p.validation, new_times, p.validation_gap), methods,
                               pc.new_user_steps, p)
            got["select"] = ps.selected_accuracy(ps.select_per_device(val), got)
        for name, accs in got.items():
            _mean_into(res, f"new_users_{name}", accs)
    cc = cfg.continual
    # NOTE: the stream replays cover the devices' own method only (or the first compared one): each model costs
    # its training steps again per buffer policy and for the drift case
    stream_methods = [pc.method] if pc.method else methods[:1]
    if cc.prequential and stream_methods and len(globals_) >= 2:
        phase("prequential streams")
        runs = [ps.prequential(plan, initial, globals_, slices, subjects, stream_methods, p, pol,
                               cc.buffer_capacity, times=fleet_times) for pol in cc.policies]
        if cc.drift:
            runs.append(ps.prequential(plan, initial, globals_, slices, subjects, stream_methods, p,
                                       cc.policies[0], cc.buffer_capacity, drift=True, times=fleet_times))
        res.continual = {"runs": runs}


def _mean_into(res: SimResult, name: str, accs: list) -> None:
    got = [a for a in accs if a is not None]
    if got:
        res.accuracy_mean_per_device[name] = round(float(np.mean(got)), 4)


def _personalized(link, evaluator, agents, slices, whole: bool = False) -> tuple[float, list]:
    """Pooled and per-device accuracy of the global model with each device's own personal tensors swapped in
    (``whole``: every trainable tensor as the device predicts with it, personal copy included; a board's personal
    copy stays on the board, so with ``whole`` a personalizing board is not scored: None)."""
    from device_agent.bridge import BoardPersonalizer
    from fleet.sim.baselines import device_accuracies, personal_ids, pooled

    ids = personal_ids(evaluator.plan)
    shared = link.call(lambda c: {k: v.copy() for k, v in c.state.items()})
    personal: list[dict | None] = []
    on_board = [whole and isinstance(getattr(a.protocol, "personalizer", None), BoardPersonalizer) for a in agents]
    for a, board in zip(agents, on_board):
        if board:  # NOTE: its personal copy never leaves the board: not scored (the replays measure the method)
            personal.append(None)
            continue
        try:
            # the harness reads it; the device never sends it
            state = a.protocol.personal_model() if whole else a.protocol.trainer.trainable_state()
            personal.append(state if whole else {i: state[i] for i in ids})
        except (OSError, RuntimeError, KeyError):  # NOTE: a board that went away counts with the global values
            personal.append(None)
    accs = [None if board else acc for acc, board in zip(device_accuracies(evaluator, shared, slices, personal),
                                                         on_board)]
    return pooled(accs, slices), accs


def _final_metrics(cfg: SimConfig, scenario, plan, link, evaluator, agents, slots, slices,
                   participation: dict[str, int], res: SimResult) -> None:
    """Per-device table and the baselines (same rounds, steps and lr as the fleet), into ``res``."""
    from fleet.sim import baselines as bl

    shared = link.call(lambda c: {k: v.copy() for k, v in c.state.items()})
    methods: dict[str, list] = {"global": bl.device_accuracies(evaluator, shared, slices)}
    if res.personal or res.personalization:
        methods["personalized"] = _personalized(link, evaluator, agents, slices, bool(res.personalization))[1]
    if "local" in cfg.baselines and not res.interrupted:
        per_round = bl.local_only(plan, slices, res.rounds, cfg.local_steps, cfg.lr, cfg.seed)
        res.accuracy_local_per_round = [bl.pooled(a, slices) for a in per_round]
        methods["local"] = per_round[-1]
    if "centralized" in cfg.baselines and not res.interrupted:
        x_proxy, y_proxy = scenario.x_proxy, scenario.y_proxy
        if not len(y_proxy):  # the same fallback as build_plan, so this is the same float model
            x_proxy, y_proxy = scenario.devices[0].x_train, scenario.devices[0].y_train
        model = pretrain(cfg, x_proxy, y_proxy, scenario.num_classes)
        shape = torch_input_shape(cfg)  # an own model's layout; None: the built-in models' float_batch rule
        x = float_batch(np.concatenate([d.x_train for d in scenario.devices]), shape)
        y = np.concatenate([d.y_train for d in scenario.devices])
        tests = [(float_batch(d.x_test, shape), d.y_test) for d in scenario.devices]
        per_round = bl.centralized(model, x, y, tests, res.rounds, cfg.seed)
        res.accuracy_centralized_per_round = [bl.pooled(a, slices) for a in per_round]
        methods["centralized"] = per_round[-1]
    for name, accs in methods.items():
        got = [a for a in accs if a is not None]
        if got:
            res.accuracy_mean_per_device[name] = round(float(np.mean(got)), 4)
    for i, dd in enumerate(scenario.devices):
        # NOTE: a backend that measures its board exposes ``memory`` (sram_bytes, flash_bytes, ...); host devices
        # report the compiler's plan: SRAM of the plan, flash = the plan blob
        mem = dict(getattr(slots[i].trainer, "memory", None) or {})
        row = {"device_id": dd.device_id, "subject": int(dd.subject), "backend": getattr(slots[i], "backend", "python"),
               "n_train": int(dd.n_train), "n_test": len(dd.y_test),
               "rounds_participated": participation.get(dd.device_id, 0),
               "memory_source": "measured" if mem else "planned",
               "sram_bytes": res.plan_sram_bytes, "flash_bytes": res.plan_bytes, **mem}
        for name, accs in methods.items():
            row[f"accuracy_{name}"] = None if accs[i] is None else round(float(accs[i]), 4)
        res.per_device.append(row)


def _write_run(out_dir: Path, res: SimResult) -> None:
    """metrics.json (the printed JSON plus ``per_device``), then index.html + plots (fleet/sim/report.py)."""
    from fleet.metrics import write_metrics

    data = res.to_dict()
    data["per_device"] = res.per_device
    data["continual"] = res.continual
    if res.behaviour:
        data["behaviour"] = res.behaviour
    write_metrics(out_dir, data, "simulate")
    try:
        from fleet.sim.report import write_report

        write_report(out_dir)
    except (ImportError, OSError, ValueError, KeyError) as e:  # NOTE: a report problem must not lose the run
        res.errors.append(f"report: {e} (metrics.json is complete; retry with `tinyfleet report {out_dir}`)")
