"""Aggregation workers: N processes that read and sum a fleet's deltas, fed by the broker's shared subscription.

Each worker subscribes ``$share/<group>/tinyfleet/<fleet>/dev/+/delta`` (MQTT 5 shared subscription:
the broker hands each delta to one worker of the group), reads it with the coordinator's own reader
(:func:`fleet.coordinator.deltas.read_delta`), and sends the coordinator a :class:`Claimed` per delta, a batch at
a time. The coordinator judges them with its round machine (the only judge), stores the accepted ones and answers
which were accepted; only then does the worker add those to its partial sum and acknowledge the MQTT messages. At
commit the coordinator asks every worker for its partial of the round and merges them exactly once
(:func:`fleet.coordinator.partials.merge_partials`), decoding from its store whatever no partial covers.

Why local pipes between workers and coordinator, not the broker: the workers are children of the coordinator's
process on its machine, a pipe is ordered and point to point, and it costs no extra trip through the broker whose
fan-in is what the workers relieve. (Workers on other machines would send claims and partials over MQTT instead;
not built.) Exactly once: a worker's MQTT session is persistent under a fixed client id per slot, so a worker
killed before it acknowledged gets its deltas again when the pool restarts its slot; a delta the coordinator had
already stored is then a duplicate (never summed twice), and the killed worker's partial, lost with it, is made up
from the store at merge. This module is I/O (processes, pipes, MQTT); it decides nothing about rounds.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from multiprocessing.connection import wait

from device_agent.mqtt import BrokerURL, MqttEndpoint
from device_agent.wire.messages import full_topic, split_topic
from fleet.aggregate import RunningSums
from fleet.coordinator.deltas import flat_delta, read_delta
from fleet.coordinator.events import Claimed
from fleet.coordinator.partials import Partial

BATCH_MAX = 256  # deltas per claim batch, at most
LINGER_S = 0.5  # a batch closes at the next multiple of this on the wall clock: one store commit (fsync) per period
LINGER_POLL_S = 0.05  # while a batch lingers, how often a worker checks whether it is already full
IDLE_WAIT_S = 5.0  # an idle worker's longest sleep (it wakes at once for a message or a control request)
PARTIAL_TIMEOUT_S = 30.0  # a worker that does not hand its partial by then is left out (its deltas: from the store)


def share_topic(fleet: str, group: str | None = None) -> str:
    """The shared subscription of a fleet's aggregation workers (group ``tinyfleet-<fleet>`` unless given).

    NOTE: Mosquitto grants any client's subscription to a shared group and applies its read ACL only when a
    message is routed to it: a device that joined the workers' group would black-hole its share of the deltas
    (tests/broker/test_acl.py). ``serve`` therefore names the group after a secret (:func:`secret_group`)."""
    return f"$share/{group or f'tinyfleet-{fleet}'}/" + full_topic(fleet, "dev/+/delta")


def secret_group(fleet: str, secret: bytes) -> str:
    """A shared-subscription group name no device can guess: derived from a secret only the coordinator holds (the
    fleet's signing key), the same across restarts so the workers' persistent sessions keep their subscription."""
    return f"tinyfleet-{fleet}-" + hashlib.sha256(b"tinyfleet aggregation group\0" + secret).hexdigest()[:32]


# --- worker process -------------------------------------------------------------------------------------------


def worker_main(url: BrokerURL, fleet: str, slot: int, codec, claims, verdicts, control,
                crash_after: int = 0, linger_s: float = LINGER_S, group: str | None = None) -> None:
    """One aggregation worker until told to stop. ``crash_after`` > 0 (tests): SIGKILL itself right after the
    coordinator accepted its ``crash_after``-th delta, before summing or acknowledging it."""
    shared = [t for t in codec.plan.trainable if not t.personal]
    size = sum(t.numel for t in shared)
    name = f"agg{slot}"
    inbox: queue.Queue = queue.Queue()
    # NOTE: an idle worker sleeps until a message or a control request comes (no polling: a round of 10,000
    # devices lasts minutes, and a wake-up every 50 ms cost more CPU than the deltas' reading); the network thread
    # writes a byte to this pipe when it queues a message while the main thread sleeps
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    idle = threading.Event()

    def on_message(topic: str, payload: bytes, ack) -> None:
        where = split_topic(fleet, topic)
        if where is None or where[1] != "delta":
            ack()
            return
        inbox.put((where[0], payload, ack))
        if idle.is_set():
            with contextlib.suppress(BlockingIOError):  # full: the main thread has bytes to wake on already
                os.write(wake_w, b"\0")

    endpoint = MqttEndpoint(url, f"tinyfleet-{fleet}-{name}", [share_topic(fleet, group)], on_message)
    endpoint.start(timeout=30.0)
    control.send(("ready", name))  # NOTE: a shared subscription drops what arrives before any member subscribed
    partials: dict[int, Partial] = {}
    pending: list = []  # the batch whose verdicts are out: (device, payload, ack), Reading
    accepted_total = 0
    stats = {"busy_s": 0.0, "cpu_s": 0.0, "read": 0, "summed": 0, "batches": 0}  # reading and summing only

    def serve_control() -> bool:
        """Answer one control request; False on stop."""
        try:
            cmd, arg = control.recv()
        except EOFError:
            return False
        if cmd == "stop":
            return False
        if cmd == "stats":
            control.send(dict(stats))
        elif cmd == "partial":  # handed over for the commit of round ``arg``: older rounds are done with too
            part = partials.pop(arg, Partial(arg, RunningSums(size), {}, name))
            part.rows = [(d, r.content_hash, *flat_delta(shared, r.decoded), r.decoded.header.num_samples)
                         for (d, _, _), r in pending
                         if r.decoded is not None and r.decoded.values and r.decoded.header.round_id == arg]
            control.send(part)
            for r in [r for r in partials if r < arg]:
                del partials[r]
        return True

    try:
        while True:
            while control.poll():
                if not serve_control():
                    return
            idle.set()  # NOTE: before looking at the inbox: a message queued after the look wakes the wait
            if inbox.empty():
                wait([control, wake_r], timeout=IDLE_WAIT_S)
            idle.clear()
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            try:
                batch = [inbox.get_nowait()]
            except queue.Empty:
                continue
            # NOTE: deltas trickle in as devices finish training; the coordinator commits (fsyncs, ~3 ms here) once
            # per batch, so a batch of one per delta would make fsync the whole cost of a round. Every worker closes
            # its batch at the same wall-clock instants, so the coordinator commits all workers' batches at once.
            # While it lingers it sleeps on the control pipe, not on the inbox: no wake-up per arriving message,
            # and a commit that asks for this worker's partial meanwhile is answered at once (the lingering
            # deltas are not claimed yet, so no round counts them: leaving them out of the partial is exact).
            end = (math.floor(time.time() / linger_s) + 1) * linger_s if linger_s > 0 else 0.0
            while inbox.qsize() < BATCH_MAX - 1 and (left := end - time.time()) > 0:
                if control.poll(min(left, LINGER_POLL_S)) and not serve_control():
                    return
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(inbox.get_nowait())
                except queue.Empty:
                    break
            t0, c0 = time.perf_counter(), time.thread_time()
            reads = [read_delta(codec, d, p) for d, p, _ in batch]
            stats["busy_s"] += time.perf_counter() - t0
            stats["cpu_s"] += time.thread_time() - c0
            stats["read"] += len(batch)
            stats["batches"] += 1
            claims.send([Claimed(d, p, r.content_hash, r.decoded.header if r.decoded is not None else None,
                                 r.reject, r.detail) for (d, p, _), r in zip(batch, reads)])
            pending[:] = list(zip(batch, reads))  # NOTE: the commit this batch may close asks for them unsummed
            while True:  # NOTE: a commit may ask for our partial while this batch is being judged: answer it
                ready = wait([verdicts, control])
                if verdicts in ready:
                    ok = verdicts.recv()
                    break
                if not serve_control():
                    return
            t0, c0 = time.perf_counter(), time.thread_time()
            for (d, _, ack), r in zip(batch, reads):
                if (d, r.content_hash) in ok and r.decoded is not None:
                    ok.discard((d, r.content_hash))  # NOTE: the same message twice in a batch is accepted once
                    accepted_total += 1
                    if crash_after and accepted_total >= crash_after:
                        os.kill(os.getpid(), signal.SIGKILL)
                    up = r.decoded.header
                    part = partials.setdefault(up.round_id, Partial(up.round_id, RunningSums(size), {}, name))
                    part.sums.add(*flat_delta(shared, r.decoded), up.num_samples)
                    part.covered[d] = r.content_hash
                    stats["summed"] += 1
            stats["busy_s"] += time.perf_counter() - t0
            stats["cpu_s"] += time.thread_time() - c0
            pending.clear()
            for _, _, ack in batch:
                ack()  # NOTE: after the coordinator stored (or refused) it and it is summed: redelivery is harmless
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the coordinator went away
    finally:
        endpoint.stop(graceful=True)


# --- coordinator side -----------------------------------------------------------------------------------------


class _Slot:
    """One worker process and its three pipes (claims up, verdicts down, control both ways)."""

    def __init__(self, ctx, pool: AggregationPool, index: int, crash_after: int):
        self.index = index
        self.claims, child_claims = ctx.Pipe(duplex=False)
        child_verdicts, self.verdicts = ctx.Pipe(duplex=False)
        self.control, child_control = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, daemon=True, name=f"tinyfleet-agg{index}",
                                args=(pool.url, pool.fleet, index, pool.codec, child_claims, child_verdicts,
                                      child_control, crash_after, pool.linger_s, pool.group))
        self.proc.start()
        for c in (child_claims, child_verdicts, child_control):
            c.close()


class AggregationPool:
    """``n`` aggregation workers for the coordinator behind ``link`` (a :class:`fleet.mqtt.CoordinatorLink` built
    with ``kinds`` without ``delta``). Use: ``pool = AggregationPool(url, fleet, codec, n)``; in the link's
    coordinator factory set ``coordinator.partials = pool.partials``; ``pool.start(link)`` after ``link.start()``;
    ``pool.stop()`` before ``link.stop()``. A worker that dies is restarted in its slot (same MQTT session).

    ``codec``: the coordinator's codec without a signer (it is pickled into every worker). ``crash_after``: tests
    only, see :func:`worker_main` (first incarnation of slot 0 only). ``linger_s``: the period at whose wall-clock
    multiples every worker closes its batch of deltas (the latency a delta's ack gains, the fsyncs a round saves;
    0: claim at once). ``group``: the shared-subscription group (:func:`secret_group` on a broker devices share).
    """

    def __init__(self, url: BrokerURL, fleet: str, codec, n: int, crash_after: int = 0, linger_s: float = LINGER_S,
                 group: str | None = None):
        if n < 1:
            raise ValueError(f"aggregation_workers: must be >= 1, got {n}")
        self.url, self.fleet, self.codec, self.n, self.crash_after = url, fleet, codec, n, crash_after
        self.linger_s, self.group = linger_s, group
        self.topic = share_topic(fleet, group)
        self._ctx = mp.get_context("spawn")
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()  # guards _slots against the supervisor's restarts
        self._stop = threading.Event()
        self.restarts = 0
        self.link = None

    def start(self, link, timeout: float = 60.0) -> AggregationPool:
        """Spawn the workers and return once each has subscribed (RuntimeError if one has not by ``timeout``)."""
        self.link = link
        for i in range(self.n):
            self._slots.append(self._spawn(i, self.crash_after if i == 0 else 0))
        end = time.monotonic() + timeout
        for s in self._slots:
            try:
                ready = s.control.poll(max(0.0, end - time.monotonic())) and s.control.recv()[0] == "ready"
            except (EOFError, OSError):
                ready = False
            if not ready:
                self.stop()
                raise RuntimeError(f"aggregation worker {s.index} did not connect to {self.url} within {timeout:g} s "
                                   f"(exit code {s.proc.exitcode})")
        threading.Thread(target=self._supervise, name="tinyfleet-agg-supervisor", daemon=True).start()
        return self

    def _spawn(self, index: int, crash_after: int = 0) -> _Slot:
        slot = _Slot(self._ctx, self, index, crash_after)
        threading.Thread(target=self._read_claims, args=(slot,), name=f"tinyfleet-agg{index}-claims",
                         daemon=True).start()
        return slot

    def _read_claims(self, slot: _Slot) -> None:
        while not self._stop.is_set():
            try:
                claims = slot.claims.recv()
            except (EOFError, OSError):
                return  # the worker died: the supervisor restarts the slot

            def reply(accepted: set, slot=slot) -> None:
                try:
                    slot.verdicts.send(accepted)
                except (BrokenPipeError, OSError):
                    pass  # died meanwhile: its messages come back to its successor, as duplicates if stored
            assert self.link is not None  # NOTE: start() sets it before it spawns a worker
            self.link.submit_claims(claims, reply)

    def _supervise(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                sentinels = [s.proc.sentinel for s in self._slots]
            wait(sentinels, timeout=1.0)  # NOTE: wakes when a worker dies, not five times a second
            restarted = False
            with self._lock:
                for i, slot in enumerate(self._slots):
                    if not slot.proc.is_alive() and not self._stop.is_set():
                        slot.proc.join()
                        self.restarts += 1
                        self._slots[i] = self._spawn(slot.index)
                        restarted = True
            if restarted:
                self._stop.wait(0.2)  # NOTE: a worker that dies at start is not respawned in a tight loop

    def partials(self, round_id: int) -> list[Partial]:
        """Every live worker's partial sum of ``round_id`` (a worker that does not answer is left out). Call it on
        the coordinator's thread only (it is the coordinator's ``partials``), as :meth:`stats`."""
        return self._ask("partial", round_id)

    def stats(self) -> list[dict]:
        """Each live worker's counters: ``busy_s``/``cpu_s`` spent reading and summing, deltas ``read``/``summed``."""
        return self._ask("stats", None)

    def summary(self) -> dict:
        """What metrics.json says of the workers (docs/metrics.md ``aggregation``): ``workers``, ``restarts`` and
        per live worker the deltas ``read`` / ``summed`` since it started. On the coordinator's thread only."""
        stats = self.stats()
        return {"workers": self.n, "restarts": self.restarts, "read": [w["read"] for w in stats],
                "summed": [w["summed"] for w in stats]}

    def _ask(self, cmd: str, arg) -> list:
        with self._lock:
            slots = list(self._slots)
        asked = []
        for s in slots:
            try:
                s.control.send((cmd, arg))
                asked.append(s)
            except (BrokenPipeError, OSError):
                continue
        out, end = [], time.monotonic() + PARTIAL_TIMEOUT_S
        for s in asked:
            try:
                while s.control.poll(max(0.0, end - time.monotonic())):
                    got = s.control.recv()
                    if not (isinstance(got, tuple) and got[:1] == ("ready",)):  # a restarted worker's hello
                        out.append(got)
                        break
            except (EOFError, OSError):
                continue
        return out

    def pids(self) -> list[int]:
        with self._lock:
            return [s.proc.pid for s in self._slots if s.proc.pid is not None]

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._lock:
            slots = list(self._slots)
        for s in slots:
            try:
                s.control.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for s in slots:
            s.proc.join(timeout)
            if s.proc.is_alive():
                s.proc.kill()
                s.proc.join()
