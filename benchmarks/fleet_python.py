"""Host-device fleet at scale: N devices really train, every message crosses a real embedded Mosquitto.

One command: ``python benchmarks/fleet_python.py --devices 1000,10000 [--rounds 1] [--steps 4] [--workers 2]
[--per-connection 1] [--agg-workers 0,1,2,4] [--backend process|ray] [--per-round 1000]``.

For each size: the coordinator (``fleet.mqtt.CoordinatorLink`` driving ``fleet.coordinator.Coordinator``, SQLite
store on disk, as ``tinyfleet serve``) runs in this process; the devices run in ``--workers`` processes. Every
device is a real :class:`~device_agent.protocol.DeviceProtocol` with its own engine ``Trainer`` and its own
``--samples`` private samples (``examples.tiny_dataset`` seeded by the device: a small model,
``examples.tiny_plan``, so 10,000 devices fit on 2 cores) and trains ``--steps`` local steps of batch 1 per round.

Connections: one MQTT v5 connection per device by default (persistent session, Last Will, its own
subscriptions), like ``tinyfleet simulate``; but instead of one paho network thread per device (10,000 threads),
each worker drives all its devices' paho clients from one selector loop (paho's external-loop API). Messages are
queued and handled between socket passes, so keepalives go out while devices train. ``--per-connection K > 1``
shares one connection among K devices (per-device topics still, but one Last Will and one retained model copy
per connection): for machines whose file-descriptor limit cannot hold N sockets. The broker needs N + a few file
descriptors (mosquitto inherits this process's ``ulimit -n``, raised to the hard limit here; the generated
config sets no ``max_connections``, i.e. unlimited); the JSON reports both.

Measured per size: ``round_seconds`` (StartRound -> RoundClosed, the round committed), ``coordinator_busy_s``
(wall time inside the coordinator's ``handle``/``handle_many`` during the round: selecting, decoding, judging,
aggregating, persisting) with its CPU time and a breakdown, ``register_s`` (all devices connected and
registered), ``peak_host_mem_mb`` (sum of PSS of this process, the workers and the broker, sampled every 1 s by a
process of its own).
Target (DESIGN.md): 10,000 host devices per round, coordinator overhead < 5 s.

``--agg-workers 0,1,2,4`` runs each size once per count of aggregation workers (fleet/coordinator/pool.py; 0 = the
coordinator reads every delta, the baseline of the same run), each on a fresh broker and store:
``coordinator_plus_agg_workers_s`` adds the workers' time reading and summing deltas to the coordinator's.

What that wall time is made of, from Linux's scheduler counters (benchmarks/sched_probe.py): ``coordinator_runq_s``
(of the handler's wall time, runnable but waiting for a core that the devices' training held), the store's
``durable_commits`` (one WAL fsync each) and their wall time, and per process / per coordinator thread CPU and
run-queue seconds. The overhead that the round pays, defined so that it cannot be flattered by the overlap with
training: ``tail_s`` (the wall clock from the last delta a device sent to the new model published: the part of
the round that waits for the coordinator and workers alone) and ``overhead_bound_s`` = tail + the CPU time of the
coordinator's process (every thread) + the aggregation workers' processes during the round, an upper bound of
what they add to the round on a machine whose cores they share with the devices.
``--backend ray`` puts the device workers (devices and their MQTT connections) in Ray actors on a local Ray
instance instead of spawned processes; peak memory then counts Ray's own processes too. ``--per-round K`` selects
K of the registered devices per round (e.g. 40,000 registered, 1,000 per round). ``--devices-nice K`` runs the device
workers K nicer than the coordinator: the cores are still shared, but the coordinator and the workers no longer wait
behind the devices' training for one (what a coordinator on a machine of its own sees).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit
from benchmarks.sched_probe import CountingConnection, MemProbe, process_sched, thread_sched, threads_sched

FLEET = "scale"
KEEPALIVE_S = 120


class _RayProc:
    """What the benchmark needs of a worker process, for a Ray actor: its pid, a no-op join, no exit code."""

    def __init__(self, pid: int):
        self.pid, self.exitcode = pid, None

    def join(self, timeout: float | None = None) -> None:
        pass


class TimedCoordinator:
    """The coordinator with a stopwatch around every ``handle``/``handle_many`` (its own time, not the link's)."""

    def __init__(self, inner):
        self.inner = inner
        self.busy = {"start": 0.0, "deltas": 0.0, "other": 0.0}
        self.cpu = 0.0
        self.runq_s = 0.0  # of the busy time: runnable, waiting for a core (the devices' training held both)
        self.counts = {"calls": 0, "delta_calls": 0, "deltas": 0, "events": 0, "publishes": 0}
        self.closing_batch_s = 0.0
        self.on = False
        self.db: CountingConnection | None = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _timed(self, fn, events):
        from fleet.coordinator import Claimed, Received, RoundClosed, StartRound

        t0, c0, (_, q0) = time.perf_counter(), time.thread_time(), thread_sched()
        out = fn()
        dt = time.perf_counter() - t0
        if self.on:
            ndeltas = sum(1 for e in events if isinstance(e, Claimed) or isinstance(e, Received) and e.kind == "delta")
            kind = "start" if any(isinstance(e, StartRound) for e in events) else "deltas" if ndeltas else "other"
            self.busy[kind] += dt
            self.cpu += time.thread_time() - c0
            self.runq_s += thread_sched()[1] - q0
            c = self.counts
            c["calls"] += 1
            c["delta_calls"] += bool(ndeltas)
            c["deltas"] += ndeltas
            c["events"] += len(events)
            c["publishes"] += sum(1 for o in out if o.__class__.__name__ == "Publish")
            if any(isinstance(o, RoundClosed) for o in out):
                self.closing_batch_s = dt
        return out

    def handle(self, event):
        return self._timed(lambda: self.inner.handle(event), [event])

    def handle_many(self, events):
        return self._timed(lambda: self.inner.handle_many(events), events)


# --- devices (worker processes) -------------------------------------------------------------------------------


def _devices_worker(conn, host: str, port: int, ids: list[int], per_conn: int, samples: int, nice: int = 0) -> None:
    """Build this worker's devices and serve them over MQTT until told to stop; reports on ``conn``. ``nice`` > 0:
    lower this process's priority by as much (the devices yield the cores, as devices on hardware of their own)."""
    if nice:
        os.nice(nice)
    import selectors
    from collections import deque

    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from device_agent import protocol as dp
    from device_agent.buffer import SampleBuffer
    from device_agent.engine.trainer import Trainer
    from device_agent.wire.envelope import Verifier
    from device_agent.wire.messages import Publish, full_topic, split_topic
    from tests.fixtures.tiny import tiny_dataset, tiny_plan

    plan = tiny_plan()
    codec = dp.WireDeviceCodec(plan, Verifier.unsigned())  # NOTE: stateless, so one per worker (it hashes the plan)
    protos: dict[str, dp.DeviceProtocol] = {}
    for i in ids:
        x, y = tiny_dataset(samples, seed=i)
        buf = SampleBuffer(samples, x.shape[1:], seed=i)
        buf.add(x, y)
        did = f"dev{i:05d}"
        protos[did] = dp.DeviceProtocol(dp.Identity(did, "stm32f746", 320_000, 1_000_000), plan, Trainer(plan),
                                        codec, buf, seed=i)
    sel = selectors.DefaultSelector()
    inbox: deque = deque()
    groups = [list(protos)[k:k + per_conn] for k in range(0, len(protos), per_conn)]
    clients: list = []
    connected = [0]
    stats = {"messages_in": 0, "messages_out": 0, "trained": 0, "connect_retries": 0, "errors": [],
             "last_delta_at": 0.0}

    def send(client, outs):
        for o in outs:
            if isinstance(o, Publish):
                client.publish(full_topic(FLEET, o.topic), o.payload, qos=1, retain=o.retain)
                stats["messages_out"] += 1
                if o.topic.endswith("/delta"):  # NOTE: the wall clock, shared with the coordinator's process
                    stats["last_delta_at"] = time.time()

    def on_connect(client, devs, flags, rc, props):
        subs = [(full_topic(FLEET, "model/current"), 1)]
        subs += [(full_topic(FLEET, f"dev/{d}/{k}"), 1) for d in devs for k in ("task", "ack", "model")]
        client.subscribe(subs)
        connected[0] += 1
        for d in devs:
            inbox.append((client, d, dp.Start()))

    def on_message(client, devs, msg):
        stats["messages_in"] += 1
        where = split_topic(FLEET, msg.topic)
        if where is None:
            return
        for d in (devs if where[0] == "" else [where[0]]):  # model/current: every device on this connection
            inbox.append((client, d, dp.Received(where[1], bytes(msg.payload))))

    last_misc = [0.0]

    def step(timeout: float) -> None:
        """Service the sockets (CONNECT, PUBLISH out; CONNACK, messages in), keepalives once a second, then
        handle queued messages for up to 100 ms."""
        for key, mask in sel.select(timeout):
            if mask & selectors.EVENT_READ:
                key.data.loop_read()
            if mask & selectors.EVENT_WRITE:
                key.data.loop_write()
        if time.monotonic() - last_misc[0] > 1.0:
            for c in clients:
                c.loop_misc()
            last_misc[0] = time.monotonic()
        end = time.monotonic() + 0.1
        while inbox and time.monotonic() < end:
            client, d, event = inbox.popleft()
            try:
                outs = protos[d].handle(event)
            except Exception as e:  # noqa: BLE001  NOTE: counted and reported, the benchmark fails on it
                stats["errors"].append(f"{d}: {type(e).__name__}: {e}")
                continue
            stats["trained"] += sum(1 for o in outs if isinstance(o, Publish) and o.topic.endswith("/delta"))
            send(client, outs)

    for k, devs in enumerate(groups):
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{FLEET}-{devs[0]}-x{len(devs)}",
                        protocol=paho.MQTTv5, userdata=devs)
        if len(devs) == 1:
            will = protos[devs[0]].last_will()
            c.will_set(full_topic(FLEET, will.topic), will.payload, qos=1, retain=True)
        c.on_connect, c.on_message = on_connect, on_message
        c.on_socket_open = lambda cl, ud, sock: sel.register(sock, selectors.EVENT_READ, cl)
        c.on_socket_close = lambda cl, ud, sock: sel.unregister(sock)
        c.on_socket_register_write = lambda cl, ud, sock: sel.modify(
            sock, selectors.EVENT_READ | selectors.EVENT_WRITE, cl)
        c.on_socket_unregister_write = lambda cl, ud, sock: sel.modify(sock, selectors.EVENT_READ, cl)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        for attempt in range(20):  # NOTE: a starved broker lets its accept queue overflow; back off and retry
            try:
                c.connect(host, port, keepalive=KEEPALIVE_S, clean_start=True, properties=props)
                break
            except ConnectionRefusedError:
                stats["connect_retries"] += 1
                time.sleep(0.1 * (attempt + 1))
        else:
            raise ConnectionRefusedError(f"{devs[0]}: broker {host}:{port} refused 20 connects")
        clients.append(c)
        # NOTE: keep every open connection serviced while connecting thousands: a CONNECT left unsent or a
        # keepalive missed for 1.5 x keepalive gets the connection dropped by the broker
        step(0)
    conn.send(("built", len(protos)))
    while True:
        step(0 if inbox else 0.05)
        if conn.poll():
            cmd = conn.recv()
            if cmd == "stop":
                for c in clients:
                    c.disconnect()
                conn.send(("stats", {**stats, "connected": connected[0], "clients": len(clients)}))
                return
            conn.send(("stats", {**stats, "connected": connected[0], "clients": len(clients)}))


class _QueueConn:
    """The two ends of a ``multiprocessing`` pipe that ``_devices_worker`` uses, over two queues (a thread in a Ray
    actor talks to the actor's methods through it)."""

    def __init__(self, out_q, in_q):
        self.out_q, self.in_q = out_q, in_q

    def send(self, msg) -> None:
        self.out_q.put(msg)

    def poll(self) -> bool:
        return not self.in_q.empty()

    def recv(self):
        return self.in_q.get()


class RayDevices:
    """A Ray actor running ``_devices_worker`` (devices + their MQTT connections) on a thread of its own; the
    benchmark talks to it as to a worker process (``recv``/``send``/``poll``), one call at a time."""

    def __init__(self, host: str, port: int, ids: list[int], per_conn: int, samples: int):
        import queue

        self.to_driver, self.to_worker = queue.Queue(), queue.Queue()
        conn = _QueueConn(self.to_driver, self.to_worker)
        threading.Thread(target=_devices_worker, args=(conn, host, port, ids, per_conn, samples),
                         daemon=True).start()

    def pid(self) -> int:
        return os.getpid()

    def recv(self, timeout: float):
        import queue

        try:
            return self.to_driver.get(timeout=timeout)
        except queue.Empty:
            return None

    def send(self, msg) -> None:
        self.to_worker.put(msg)


class _ActorConn:
    """The driver's end of a :class:`RayDevices` actor, shaped like a pipe's."""

    def __init__(self, actor):
        import ray

        self.ray, self.actor, self.got = ray, actor, None

    def poll(self, timeout: float) -> bool:
        if self.got is None:
            self.got = self.ray.get(self.actor.recv.remote(timeout))
        return self.got is not None

    def recv(self):
        self.poll(3600)
        got, self.got = self.got, None
        return got

    def send(self, msg) -> None:
        self.ray.get(self.actor.send.remote(msg))


def _overhead(tail_s: float, sched: dict) -> dict:
    """The overhead the coordinator and its aggregation workers add to a round, bounded from above: the tail (last
    delta sent -> new model published, what the round waits for after the devices are done) plus every CPU second
    their processes spent during the round (all threads: handler, MQTT network, claim readers; the workers' too), as
    if each of them had delayed the devices' training by as much (2 cores shared with the devices, here)."""
    coord = sum(v["cpu_s"] for k, v in sched["coordinator_threads"].items() if k != "MainThread")  # bench driver
    agg = sum(w["cpu_s"] for w in sched["agg_workers"])
    return {"coordinator_process_cpu_s": round(coord, 3), "agg_workers_process_cpu_s": round(agg, 3),
            "overhead_bound_s": round(tail_s + coord + agg, 3)}


def _sched_delta(s0: dict, s1: dict) -> dict:
    """CPU and run-queue seconds each process (and each coordinator thread) spent between two samples."""
    def d(a, b):
        return {"cpu_s": round(b[0] - a[0], 3), "runq_s": round(b[1] - a[1], 3)}

    return {"coordinator_threads": {k: d(s0["coordinator_threads"].get(k, (0.0, 0.0)), v)
                                    for k, v in s1["coordinator_threads"].items()},
            "agg_workers": [d(a, b) for a, b in zip(s0["agg"], s1["agg"])],
            "device_workers": [d(a, b) for a, b in zip(s0["devices"], s1["devices"])],
            "broker": d(s0["broker"], s1["broker"])}


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc)."""
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(k) for k in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                continue
            for k in kids:
                if k not in out:
                    out.add(k)
                    todo.append(k)
    return out


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({path}: {e})"


# --- one size -------------------------------------------------------------------------------------------------


def run_size(n: int, args, workdir: Path, agg_workers: int = 0) -> dict:
    from device_agent.wire.messages import DEVICE_UP
    from fleet import round as rnd
    from fleet.coordinator import Coordinator, CoordinatorConfig, RoundClosed, StartRound, WireCodec
    from fleet.coordinator.pool import AggregationPool
    from fleet.mqtt import CoordinatorLink
    from fleet.sim.broker import EmbeddedBroker
    from fleet.store import Store
    from tests.fixtures.tiny import tiny_plan

    plan = tiny_plan()
    closed: list = []
    done = threading.Event()

    closed_at: list[float] = []

    def on_output(o):
        if isinstance(o, RoundClosed):  # NOTE: after model/current was handed to paho (outputs are in order)
            closed_at.append(time.time())
            closed.append(o)
            done.set()

    goal = min(n, args.per_round) if args.per_round else n
    cfg = CoordinatorConfig(round=rnd.RoundConfig(goal=goal, quorum=0.9, deadline_s=args.deadline,
                                                  over_selection=1.0 if args.per_round else 1.3), lr=0.2,
                            local_steps=args.steps, batch_size=1)
    timed: list[TimedCoordinator] = []

    tag = f"{n}-w{agg_workers}"
    pool: AggregationPool | None = None

    def factory():
        store = Store(str(workdir / f"store-{tag}.sqlite"))
        c = Coordinator(plan, store, cfg, time.time, WireCodec(plan))
        if pool is not None:
            c.partials = pool.partials
        timed.append(TimedCoordinator(c))
        store._db = timed[-1].db = CountingConnection(store._db)  # NOTE: counts and times the commits (fsyncs)
        return timed[0]

    mem = MemProbe().start()  # NOTE: in a process of its own, not the coordinator's
    ctx = mp.get_context("spawn")
    with EmbeddedBroker(workdir=workdir / f"broker-{tag}") as broker:
        kinds = DEVICE_UP if not agg_workers else tuple(k for k in DEVICE_UP if k != "delta")
        pool = AggregationPool(broker.url, FLEET, WireCodec(plan), agg_workers) if agg_workers else None
        link = CoordinatorLink(broker.url, FLEET, factory, on_output=on_output, kinds=kinds).start()
        if pool is not None:
            pool.start(link)
        t0 = time.perf_counter()
        workers = []
        for w in range(args.workers):
            ids = list(range(w, n, args.workers))
            if args.backend == "ray":
                import ray

                actor = ray.remote(num_cpus=0, max_concurrency=4)(RayDevices).remote(
                    broker.url.host, broker.url.port, ids, args.per_connection, args.samples)
                workers.append((_RayProc(ray.get(actor.pid.remote())), _ActorConn(actor)))
                continue
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_devices_worker, daemon=True,
                            args=(child, broker.url.host, broker.url.port, ids, args.per_connection, args.samples,
                                  args.devices_nice))
            p.start()
            workers.append((p, parent))
        mem.pids = [broker.proc.pid] + [p.pid for p, _ in workers] + (pool.pids() if pool is not None else [])
        if args.backend == "ray":  # NOTE: Ray's own processes (GCS, raylet, idle workers) count too
            mem.pids = sorted(set(mem.pids) | _descendants(os.getpid()))
        for p, c in workers:
            if not c.poll(args.setup_timeout):
                raise SystemExit(f"fleet_python: worker {p.pid} did not build its devices within "
                                 f"{args.setup_timeout:g} s (exit code "
                                 f"{p.exitcode}); broker log:\n{_tail(broker.log_path)}")
            c.recv()
        end = time.monotonic() + args.setup_timeout
        online = 0
        while online < n:
            if time.monotonic() > end:
                raise SystemExit(f"fleet_python: only {online} of {n} devices registered within "
                                 f"{args.setup_timeout:g} s (--setup-timeout); broker "
                                 f"log:\n{_tail(broker.log_path)}")
            time.sleep(0.2)
            online = link.call(lambda c: sum(r.online for r in c.registry.devices.values()))
        register_s = time.perf_counter() - t0
        print(f"fleet_python: {n} devices registered in {register_s:.1f} s", file=sys.stderr, flush=True)
        rounds = []
        for _ in range(args.rounds):
            tc = timed[0]
            link.call(lambda c: setattr(c, "on", True))
            tc.busy = {k: 0.0 for k in tc.busy}
            tc.cpu = tc.runq_s = 0.0
            tc.counts = {k: 0 for k in tc.counts}
            db0 = tc.db.counts() if tc.db is not None else {}
            w0 = link.call(lambda c: pool.stats()) if pool is not None else []
            agg_pids = pool.pids() if pool is not None else []
            named = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
            s0 = {"coordinator_threads": threads_sched(named), "agg": [process_sched(p) for p in agg_pids],
                  "devices": [process_sched(p.pid) for p, _ in workers], "broker": process_sched(broker.proc.pid)}
            done.clear()
            t0 = time.perf_counter()
            link.submit(StartRound())
            if not done.wait(args.deadline + 60):
                raise SystemExit("fleet_python: the round never closed")
            wall = time.perf_counter() - t0
            link.call(lambda c: setattr(c, "on", False))
            s1 = {"coordinator_threads": threads_sched(named), "agg": [process_sched(p) for p in agg_pids],
                  "devices": [process_sched(p.pid) for p, _ in workers], "broker": process_sched(broker.proc.pid)}
            w1 = link.call(lambda c: pool.stats()) if pool is not None else []
            db1 = tc.db.counts() if tc.db is not None else {}
            last_sent = 0.0
            for _p, c in workers:
                c.send("stats")
                got = c.recv()
                last_sent = max(last_sent, got[1].get("last_delta_at", 0.0))
            sched = _sched_delta(s0, s1)
            wbusy = [b["busy_s"] - a["busy_s"] for a, b in zip(w0, w1)]
            wcpu = [b["cpu_s"] - a["cpu_s"] for a, b in zip(w0, w1)]
            merge = link.call(lambda c: c.last_merge)
            rc = closed[-1]
            rounds.append({"round_seconds": wall, "committed": rc.committed, "accepted": len(rc.accepted),
                           "coordinator_busy_s": sum(tc.busy.values()), "coordinator_cpu_s": tc.cpu,
                           "busy_breakdown_s": dict(tc.busy), "closing_batch_s": tc.closing_batch_s,
                           "agg_workers_busy_s": wbusy, "agg_workers_cpu_s": wcpu,
                           "agg_workers_summed": [b["summed"] - a["summed"] for a, b in zip(w0, w1)],
                           "merge_decoded_by_coordinator": len(merge.missing) if merge is not None and pool else None,
                           "agg_worker_restarts": pool.restarts if pool is not None else 0,
                           "tail_s": closed_at[-1] - last_sent if last_sent else None,
                           "coordinator_runq_s": tc.runq_s, "coordinator_counts": dict(tc.counts),
                           "store": {k: db1[k] - db0.get(k, 0) for k in db1},
                           "agg_batches": [b["batches"] - a["batches"] for a, b in zip(w0, w1)],
                           "sched": sched, **_overhead(closed_at[-1] - last_sent if last_sent else 0.0, sched)})
        wstats = []
        for p, c in workers:
            c.send("stop")
            wstats.append(c.recv()[1] if c.poll(60) else {})
            p.join(10)
        if pool is not None:
            pool.stop()
        link.stop()
    mem.stop()
    trained = sum(s.get("trained", 0) for s in wstats)
    errors = [e for s in wstats for e in s.get("errors", [])][:5] + link.errors[:5]
    retries = sum(s.get("connect_retries", 0) for s in wstats)
    last = rounds[-1]
    total = last["coordinator_busy_s"] + sum(last["agg_workers_busy_s"])
    return {"devices": n, "workers": args.workers, "agg_workers": agg_workers,
            "coordinator_plus_agg_workers_s": total,
            "coordinator_plus_slowest_agg_worker_s": last["coordinator_busy_s"] + max(last["agg_workers_busy_s"],
                                                                                     default=0.0),
            "devices_per_connection": args.per_connection,
            "connections": sum(s.get("clients", 0) for s in wstats), "connect_retries": retries,
            "local_steps": args.steps,
            "register_s": register_s, "round_seconds": last["round_seconds"],
            "coordinator_overhead_s": last["coordinator_busy_s"], "coordinator_cpu_s": last["coordinator_cpu_s"],
            "busy_breakdown_s": last["busy_breakdown_s"], "closing_batch_s": last["closing_batch_s"],
            "committed": last["committed"], "accepted": last["accepted"], "deltas_trained": trained,
            "tail_s": last["tail_s"], "coordinator_runq_s": last["coordinator_runq_s"], "store": last["store"],
            "coordinator_process_cpu_s": last["coordinator_process_cpu_s"],
            "agg_workers_process_cpu_s": last["agg_workers_process_cpu_s"], "overhead_bound_s": last["overhead_bound_s"],
            "agg_workers_cpu_s": last["agg_workers_cpu_s"],
            "rounds": rounds, "peak_host_mem_mb": round(mem.peak_kb / 1024, 1), "errors": errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1000,10000", help="comma-separated fleet sizes")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="local training steps (batch 1) per device per round")
    ap.add_argument("--samples", type=int, default=16, help="private samples per device")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="device processes")
    ap.add_argument("--backend", choices=("process", "ray"), default="process",
                    help="where the device workers run: spawned processes, or Ray actors on a local Ray instance")
    ap.add_argument("--per-round", type=int, default=0,
                    help="devices selected per round (the round's goal); 0: every registered device")
    ap.add_argument("--agg-workers", default="0",
                    help="comma-separated aggregation worker counts to run each size with (0: the coordinator "
                         "reads every delta itself), e.g. 0,1,2,4")
    ap.add_argument("--per-connection", type=int, default=1, help="devices sharing one MQTT connection")
    ap.add_argument("--devices-nice", type=int, default=0,
                    help="process backend: run the device workers this much nicer than the coordinator (they then "
                         "yield the cores to it, as devices on their own hardware would); 0: same priority")
    ap.add_argument("--deadline", type=float, default=600.0, help="round deadline, seconds")
    ap.add_argument("--setup-timeout", type=float, default=1800.0,
                    help="seconds for the workers to build and connect their devices, and again for registration")
    ap.add_argument("--quick", action="store_true", help="50 devices")
    args = ap.parse_args()
    sizes = [50] if args.quick else [int(s) for s in args.devices.split(",") if s]
    aggs = [int(w) for w in args.agg_workers.split(",") if w]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by mosquitto and the workers
    fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    result: dict = {"devices_nice": args.devices_nice, "ulimit_n": fds,
                    "mosquitto_max_connections": "unlimited (not set)", "host_cores": os.cpu_count(),
                    "target_overhead_s_at_10000": 5.0}
    rows = []
    if args.backend == "ray":
        import ray

        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        result["backend"] = f"ray {ray.__version__} (local instance; actors num_cpus=0)"
    with tempfile.TemporaryDirectory(prefix="tinyfleet-fleetpy-") as tmp:
        for n in sizes:
            need = -(-n // args.per_connection) + 64
            if need > fds:
                print(f"fleet_python: {n} devices need ~{need} file descriptors in the broker, ulimit -n is {fds}: "
                      f"use --per-connection {-(-n // (fds - 64))} or raise the limit", file=sys.stderr)
                return 2
            for w in aggs:
                r = run_size(n, args, Path(tmp), w)
                key = str(n) if aggs == [0] else f"{n}/w{w}"
                result[key] = r
                rows.append((n, w, r["connections"], f"{r['register_s']:.1f}", f"{r['round_seconds']:.1f}",
                             f"{r['coordinator_overhead_s']:.2f}", f"{r['coordinator_cpu_s']:.2f}",
                             f"{r['coordinator_runq_s']:.2f}", f"{r['coordinator_plus_agg_workers_s']:.2f}",
                             f"{r['tail_s']:.2f}", f"{r['coordinator_process_cpu_s']:.2f}",
                             f"{r['agg_workers_process_cpu_s']:.2f}", f"{r['overhead_bound_s']:.2f}",
                             f"{r['store']['durable_commits']}", r["accepted"], r["peak_host_mem_mb"]))
                print(f"fleet_python: {key}: {r['round_seconds']:.1f} s round, coordinator {r['coordinator_overhead_s']:.2f} s"
                      f" + workers {r['coordinator_plus_agg_workers_s'] - r['coordinator_overhead_s']:.2f} s",
                      file=sys.stderr, flush=True)
    emit(result, rows, ("devices", "agg workers", "connections", "register s", "round s", "coord busy s",
                        "coord cpu s", "coord runq s", "coord+workers s", "tail s", "coord proc cpu s",
                        "workers proc cpu s", "overhead bound s", "fsyncs", "accepted", "peak MB"))
    ok = all(r["committed"] and not r["errors"] for k, r in result.items() if isinstance(r, dict))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
