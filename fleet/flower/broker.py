"""The Flower grid on a real broker: ``fleet.mqtt.CoordinatorLink`` drives a :class:`GridCore` on its own thread
exactly as it drives the native coordinator, after reading what the broker retains for the fleet.

:func:`read_fleet` reads ``model/current``, ``flower/state`` and ``flower/lock`` (docs/protocol.md, "Flower runs
on a fleet") and claims the fleet for one run; :func:`mqtt_grid` builds a grid that continues the fleet's model
versions and round ids from them, with its own MQTT client id and a Last Will that frees the fleet. It refuses
to serve a fleet another run holds (:class:`FleetBusy`) before publishing anything. No round logic here.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from device_agent.wire.messages import full_topic
from fleet.flower.claim import LOCK_TOPIC, LOCK_TTL_S, STATE_TOPIC, FleetBusy, Lock, State, winner
from fleet.flower.core import GridConfig, GridCore, Release
from fleet.flower.grid import FleetGrid


@dataclass
class FleetSnapshot:
    """What the broker retains for a fleet when a run starts."""

    lock: Lock | None = None
    state: State | None = None
    version: int = 0  # of the retained model/current (0: none, or not for this plan / not signed by this key)
    model: dict | None = None  # its shared tensors when it is the FULL form
    note: str = ""  # why a retained model/current was not used


def read_fleet(url, fleet: str, client_id: str, plan, verify, codec, *, claim: Lock | None = None,
               timeout: float = 10.0) -> FleetSnapshot:
    """Read the fleet's retained ``flower/lock``, ``flower/state`` and ``model/current``; with ``claim``, take
    the lock for that run or raise :class:`FleetBusy`. A probe message on a topic of our own marks the end of
    the retained messages (the broker sends them on subscribe, before our later publication)."""
    from device_agent.mqtt import MqttEndpoint
    from device_agent.wire.errors import WireFormatError
    from device_agent.wire.update import Form, ModelUpdate, apply_update

    got: queue.Queue = queue.Queue()
    probe = f"flower/probe/{client_id}"
    topics = (LOCK_TOPIC, STATE_TOPIC, "model/current", probe)
    prefix = full_topic(fleet, "")

    def on_msg(topic: str, payload: bytes, ack) -> None:
        ack()
        got.put((topic[len(prefix):], payload))

    ep = MqttEndpoint(url, f"{client_id}-probe", [full_topic(fleet, t) for t in topics], on_msg, session_expiry=0)
    try:
        ep.start(timeout)
    except ConnectionError:
        raise ConnectionError(f"no connection to the broker {url} within {timeout:g} s: is it running, and are the "
                              "URL, credentials and TLS files right?") from None

    def until_probe(mark: bytes) -> list[tuple[str, bytes]]:
        ep.publish(full_topic(fleet, probe), mark)
        out, end = [], time.monotonic() + timeout
        while True:
            try:
                topic, payload = got.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise ConnectionError(f"broker {url}: our own probe message did not come back within "
                                      f"{timeout:g} s (does the ACL allow tinyfleet/{fleet}/flower/#?)") from None
            if topic == probe and payload == mark:
                return out
            out.append((topic, payload))

    try:
        retained = dict(until_probe(b"retained"))
        snap = FleetSnapshot()
        now = time.time()
        try:
            snap.lock = Lock.from_bytes(retained.get(LOCK_TOPIC, b""))
        except ValueError:
            snap.lock = None  # NOTE: not a lock we can read: claim over it
        try:
            snap.state = State.from_bytes(retained.get(STATE_TOPIC, b""))
        except ValueError as e:
            snap.note = f"{e}: round ids start at first-round"
        if claim is not None and snap.lock is not None and snap.lock.live(now) and snap.lock.holder != claim.holder:
            raise FleetBusy(snap.lock.busy_message(fleet, now))
        if claim is not None:
            ep.publish(full_topic(fleet, LOCK_TOPIC), claim.to_bytes(), retain=True)
            claims = []
            for topic, payload in until_probe(b"claimed"):
                if topic == LOCK_TOPIC:
                    try:
                        claims.append(Lock.from_bytes(payload))
                    except ValueError:
                        pass
            w = winner(None, claims, now)
            if w is not None and w.holder != claim.holder:
                ep.publish(full_topic(fleet, LOCK_TOPIC), w.to_bytes(), retain=True).wait_for_publish(timeout)
                raise FleetBusy(w.busy_message(fleet, now))
        payload = retained.get("model/current", b"")
        if payload:
            try:
                upd = ModelUpdate.from_bytes(payload, verify=verify, plan=plan, plan_hash=bytes.fromhex(codec.plan_hash))
                snap.version = upd.new_version
                if upd.form == Form.FULL:
                    full = apply_update(upd, plan, None, plan_hash=bytes.fromhex(codec.plan_hash))
                    snap.model = {t.id: full[t.id] for t in plan.trainable if not t.personal}
            except WireFormatError as e:
                snap.note = f"the retained model/current is not usable here ({e}); starting above flower/state"
        return snap
    finally:
        ep.stop()


class FlowerLink:
    """``fleet.mqtt.CoordinatorLink`` for one ServerApp run: its own client id, a Last Will that deletes the
    fleet's ``flower/lock``, and a ``stop`` that releases the lock before disconnecting."""

    def __init__(self, url, fleet: str, factory: Callable[[], GridCore], client_id: str):
        from fleet.mqtt import CoordinatorLink

        self.fleet, self.client_id = fleet, client_id
        self.inner = CoordinatorLink(url, fleet, factory, client_id=client_id)
        self.inner.endpoint.set_will(full_topic(fleet, LOCK_TOPIC), b"")

    def start(self, timeout: float = 10.0) -> FlowerLink:
        self.inner.start(timeout)
        return self

    def submit(self, event: object) -> None:
        self.inner.submit(event)

    def call(self, fn: Callable[[Any], Any], timeout: float = 30.0) -> Any:
        return self.inner.call(fn, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        try:
            self.submit(Release())
            self.call(lambda core: None, timeout)  # Release handled and its publications handed to paho
            info = self.inner.endpoint.publish(full_topic(self.fleet, LOCK_TOPIC), b"", retain=True)
            info.wait_for_publish(timeout)
        except (RuntimeError, TimeoutError, ValueError):
            pass  # NOTE: no broker now: the Last Will deletes the lock, or it expires
        self.inner.stop(timeout)


def mqtt_grid(url, fleet: str, plan, config: GridConfig | None = None, first_round: int = 1, codec=None, *,
              signer=None, verify=None, run_id: int = 1, initial: str = "fleet",
              timeout: float = 10.0) -> tuple[FleetGrid, FlowerLink]:
    """A started ``(FleetGrid, link)`` on broker ``url`` for fleet ``fleet``; ``link.stop()`` ends it.

    ``signer`` (``device_agent.wire.envelope.Signer``) signs the plan and every model; ``verify`` is the
    matching verifier, used to read the fleet's retained model (both unsigned when None: tests only). The run
    continues the fleet: model versions above the retained ``model/current`` (``initial="fleet"``: starting
    from its values when it is the FULL form; ``"plan"``: from the plan's values) and round ids above
    ``flower/state`` and ``first_round - 1``. Raises :class:`FleetBusy` while another run serves the fleet.
    """
    from device_agent.wire.envelope import Verifier
    from fleet.coordinator import WireCodec

    codec = codec or WireCodec(plan, signer=signer)
    verify = verify or Verifier.unsigned()
    client_id = f"tinyfleet-{fleet}-flower-{uuid.uuid4().hex[:12]}"
    now = time.time()
    snap = read_fleet(url, fleet, client_id, plan, verify, codec,
                      claim=Lock(client_id, run_id, now, now + LOCK_TTL_S), timeout=timeout)
    if snap.note:
        from logging import WARNING

        from flwr.common.logger import log

        log(WARNING, "tinyfleet: %s", snap.note)
    version = max(snap.version, snap.state.version if snap.state else 0)
    start_state = snap.model if initial == "fleet" and snap.version == version else None
    rounds = max(first_round - 1, snap.state.last_round if snap.state else 0)
    lock = Lock(client_id, run_id, now, now + LOCK_TTL_S)

    def factory() -> GridCore:
        return GridCore(plan, time.time, config or GridConfig(), rounds + 1, codec, start_version=version,
                        start_state=start_state, lock=lock)

    link = FlowerLink(url, fleet, factory, client_id)
    try:
        link.start(timeout)
    except BaseException:
        link.stop(timeout)
        raise
    return FleetGrid(link, run_id), link
