"""The coordinator on MQTT: one paho client, one driver thread, ``Coordinator.handle`` in between.

Inbound device messages (``dev/+/hello|status|delta``), control commands (``StartRound``, ``Boot``) and a
periodic ``Tick`` all go through one queue into the driver thread, which is the only thread that touches the
coordinator (and its SQLite store). After one blocking get it drains what is already queued (up to
:data:`BATCH_MAX` events, stopping at a ``call``) into one ``handle_many`` (one store transaction, one fsync) and
acknowledges the batch's messages to the broker only after that returned, i.e. after the store committed what
they imply; a crash or a failed batch before that gets them redelivered, and the coordinator's dedup makes the
redelivery harmless. Publish intents go out at QoS 1 under
``tinyfleet/<fleet>/``. Informational outputs (verdicts, closed rounds) are handed to ``on_output``.
This module decides nothing about rounds; it refuses to run the coordinator on any other thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from device_agent.mqtt import BrokerURL, MqttEndpoint
from device_agent.wire.messages import DEVICE_UP, Publish, full_topic, split_topic
from fleet.coordinator import Claimed, Dropped, Received, Verdict

TICK_S = 0.2
BATCH_MAX = 256  # events handled in one store transaction (one fsync), at most
CLAIMS_GRACE_S = 0.02  # how long claim batches of other aggregation workers are waited for, to share a commit
STOP = ("stop", None, None)  # the stop sentinel (None on the queue), when it was drained behind a batch


class CoordinatorLink:
    """Drive a coordinator built by ``factory()`` (called on the driver thread) over MQTT: anything with
    ``handle(event) -> outputs``, and ``handle_many(events) -> outputs`` for batches if it has one.

    ``on_output(output)`` gets every non-publish output (``Verdict``, ``RoundClosed``, ``Dropped``) and also
    every ``Publish`` after it was handed to paho, on the driver thread; keep it short.
    """

    def __init__(self, url: BrokerURL, fleet: str, factory: Callable[[], Any],
                 on_output: Callable[[object], None] | None = None, client_id: str | None = None,
                 tick: float = TICK_S, kinds: tuple[str, ...] = DEVICE_UP):
        self.fleet, self.factory, self.on_output, self.tick = fleet, factory, on_output, tick
        self.coordinator: Any = None
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"coordinator-{fleet}", daemon=True)
        self._ready: Future = Future()
        self.errors: list[str] = []
        self.kinds = kinds  # without "delta" when aggregation workers read the deltas (fleet/coordinator/pool.py)
        subs = [full_topic(fleet, f"dev/+/{kind}") for kind in kinds]
        self.endpoint = MqttEndpoint(url, client_id or f"tinyfleet-{fleet}-coordinator", subs, self._on_message,
                                     on_connect=self._on_connect, retained_on_resume=True)

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> CoordinatorLink:
        """Build the coordinator, connect, and ``Boot`` (publish plan + model, resume an open round)."""
        from fleet.coordinator import Boot

        self._thread.start()
        self._ready.result(timeout)  # re-raises a factory error here
        try:
            self.endpoint.start(timeout)
        except ConnectionError:
            self._stop.set()
            self._q.put(None)
            raise
        self.submit(Boot())
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._q.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.endpoint.stop(graceful=True)

    # --- commands from other threads ------------------------------------------------------------------------

    def submit(self, event: object) -> None:
        """Queue a coordinator event (``StartRound()``, ``Tick()``...) for the driver thread."""
        self._q.put(("event", event, None))

    def submit_claims(self, claims: list, reply: Callable[[set], None]) -> None:
        """Queue an aggregation worker's batch of ``Claimed`` deltas: handled in one store transaction (with other
        workers' batches queued meanwhile), then ``reply({(device_id, content_hash), ...})`` with those of its
        claims that were accepted, on the driver thread, after the store committed."""
        self._q.put(("claims", claims, reply))

    def call(self, fn: Callable[[Any], Any], timeout: float = 30.0) -> Any:
        """Run ``fn(coordinator)`` on the driver thread and return its result (e.g. read the registry)."""
        fut: Future = Future()
        self._q.put(("call", fn, fut))
        return fut.result(timeout)

    # --- network thread -------------------------------------------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        from fleet.coordinator import Boot

        if "delta" not in self.kinds:  # NOTE: a session kept from a run without workers would still get deltas
            self.endpoint.client.unsubscribe(full_topic(self.fleet, "dev/+/delta"))
        # NOTE: after every reconnect, not only when the session is gone: a broker that crashed restarts from its
        # last autosave, so it may have lost the newest retained model, a task it had already PUBACKed to us, or
        # a delta it had PUBACKed to a device (which never sends it again unprompted). Boot republishes the plan
        # and model and re-sends the open round's tasks to every device that has not contributed; devices answer
        # a repeated task with the same delta bytes, and dedup counts them once.
        if self.coordinator is not None and self.endpoint.connects > 1:
            self.submit(Boot())

    def _on_message(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        where = split_topic(self.fleet, topic)
        if where is None or where[1] not in DEVICE_UP:
            ack()
            return
        self._q.put(("event", Received(where[1], where[0], payload), ack))

    # --- driver thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        from fleet.coordinator import Tick

        try:
            self.coordinator = self.factory()
        except BaseException as e:  # noqa: BLE001  handed to start()
            self._ready.set_exception(e)
            return
        self._ready.set_result(True)
        next_tick = time.monotonic() + self.tick
        held = None  # an item taken off the queue while draining a batch, handled next
        while not self._stop.is_set():
            if held is not None:
                item, held = held, None
            else:
                try:
                    item = self._q.get(timeout=max(0.0, next_tick - time.monotonic()))
                except queue.Empty:
                    item = ("event", Tick(), None)
            if item is None:
                break
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self.tick
                if item[1].__class__ is not Tick:
                    self._handle([Tick()])
            kind, what, done = item
            if kind == "call":
                try:
                    done.set_result(what(self.coordinator))
                except BaseException as e:  # noqa: BLE001  handed to the caller
                    done.set_exception(e)
                continue
            if kind == "claims":  # NOTE: every worker's queued batch in one store transaction
                group, held = self._claims_group(item)
                outs = self._handle([ev for _, evs, _ in group for ev in evs])
                for (_, _, reply), mine in zip(group, _accepted_by_batch(group, outs)):
                    reply(mine)
                if held is STOP:
                    break
                continue
            batch = [item]
            while len(batch) < BATCH_MAX:  # whatever queued up meanwhile goes into the same store transaction
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or nxt[0] != "event":  # a call sees the state after the events queued before it
                    held = nxt if nxt is not None else STOP
                    break
                batch.append(nxt)
            self._handle([b[1] for b in batch])
            for _, _, done in batch:
                if done is not None:
                    done()  # the broker may forget the message now: the store has what it implied
            if held is STOP:
                break

    def _claims_group(self, first: tuple) -> tuple[list, object]:
        """``first`` and the claim batches queued right behind it (up to 4 x :data:`BATCH_MAX` claims); the
        item that ended the group, to be handled next (or None)."""
        group, count = [first], len(first[1])
        while count < 4 * BATCH_MAX:
            try:  # NOTE: workers close their batches at the same instants: the others' are a few ms behind
                nxt = self._q.get(timeout=CLAIMS_GRACE_S)
            except queue.Empty:
                return group, None
            if nxt is None or nxt[0] != "claims":
                return group, nxt if nxt is not None else STOP
            group.append(nxt)
            count += len(nxt[1])
        return group, None

    def _handle(self, events: list) -> list:
        """``handle_many(events)``, publish its outputs and return them.

        NOTE: the coordinator's contract: after a failed handle, rebuild from the same store and Boot. Then the
        batch's events are handled again one at a time, so one message that makes a handler raise (a poison
        message) cannot stall the others: it is refused alone (logged with its device id, a ``Dropped``
        output) and counts as handled, so it is acknowledged and the broker does not redeliver it forever.
        """
        try:
            return self._emit(self._many(events))
        except Exception as e:  # noqa: BLE001
            self._rebuild(f"batch of {len(events)}: {type(e).__name__}: {e}")
        out: list = []
        if len(events) > 1 or isinstance(events[0], (Received, Claimed)):
            for ev in events:
                try:
                    out += self._emit(self._many([ev]))
                except Exception as e:  # noqa: BLE001
                    kind = "delta" if isinstance(ev, Claimed) else getattr(ev, "kind", "")
                    who = f"{kind} from device {ev.device_id!r}" if kind else type(ev).__name__
                    self._rebuild(f"refused {who}: {type(e).__name__}: {e}")
                    if kind:
                        out += self._emit([Dropped(ev.device_id, kind, f"handler raised {type(e).__name__}: {e}")])
        return out

    def _many(self, events: list) -> list:
        many = getattr(self.coordinator, "handle_many", None)  # NOTE: the Flower grid's driver has handle only
        return many(events) if many is not None else [o for ev in events for o in self.coordinator.handle(ev)]

    def _rebuild(self, why: str) -> None:
        from fleet.coordinator import Boot

        self.errors.append(why)
        self.coordinator = self.factory()
        self._emit(self.coordinator.handle(Boot()))

    def _emit(self, outputs: list) -> list:
        for out in outputs:
            if isinstance(out, Publish):
                self.endpoint.publish(full_topic(self.fleet, out.topic), out.payload, out.retain)
            if self.on_output is not None:
                self.on_output(out)
        return outputs


def _accepted_by_batch(group: list, outputs: list) -> list[set]:
    """Per claim batch of ``group``, the (device, content hash) of its claims that ``outputs`` accepted. The same
    bytes in two batches (a redelivered delta) are accepted once, on the first claim: it goes to that batch."""
    ok = {(o.device_id, o.content_hash) for o in outputs if isinstance(o, Verdict) and o.reason == "ok"}
    out = []
    for _, claims, _ in group:
        mine = {(c.device_id, c.content_hash) for c in claims} & ok
        ok -= mine
        out.append(mine)
    return out
