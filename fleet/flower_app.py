"""Running a Flower strategy on a TinyFleet fleet: the two links for :class:`fleet.flower.FleetGrid` and a
``ServerApp`` for ``flwr run``.

- :func:`mqtt_grid` — the grid over a real broker: ``fleet.mqtt.CoordinatorLink`` drives a
  :class:`~fleet.flower.GridCore` on its own thread exactly as it drives the native coordinator.
- :class:`InMemoryLink` — the grid and host devices (``device_agent.protocol.DeviceProtocol``) in one process,
  FIFO delivery, no broker: for tests and benchmarks.
- ``app`` — a ``flwr.serverapp.ServerApp`` whose ``main`` ignores the SuperLink's grid (our devices are not
  SuperNodes) and runs a stock strategy, wrapped in :class:`~fleet.flower.SparseDeltaStrategy`, on an MQTT grid.

This module owns no round logic; it only wires.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.wire.messages import Publish
from fleet.coordinator import Boot, Received
from fleet.flower import FleetGrid, GridConfig, GridCore, SparseDeltaStrategy, initial_arrays


class InMemoryLink:
    """A broker stand-in between one :class:`GridCore` and ``devices`` (device id -> DeviceProtocol).

    Synchronous: ``submit`` delivers the event and then every message it causes (tasks, deltas, acks) until
    nothing is left. ``silent`` devices receive but never answer (a device that trains forever).
    """

    def __init__(self, core: GridCore, devices: dict[str, Any]):
        from device_agent import protocol as dp

        self.core, self.devices, self.silent = core, devices, set()
        self.retained: dict[str, bytes] = {}
        self.queue: deque = deque()
        self.bytes_down = self.bytes_up = 0  # payload bytes, per direction
        self._lock = threading.RLock()
        self._dp = dp
        for d in devices.values():
            self._from_device(d.handle(dp.Start()))
        self.submit(Boot())

    def submit(self, event: object) -> None:
        with self._lock:
            self._from_core(self.core.handle(event))
            self._pump()

    def call(self, fn: Callable[[Any], Any], timeout: float = 30.0) -> Any:
        with self._lock:
            return fn(self.core)

    def kill(self, device_id: str) -> None:
        """The device vanishes; the broker publishes its Last Will."""
        with self._lock:
            will = self.devices.pop(device_id).last_will()
            self.submit(Received("status", device_id, will.payload))

    def _from_core(self, outs: list) -> None:
        for o in outs:
            if not isinstance(o, Publish):
                continue
            if o.retain:
                self.retained[o.topic] = o.payload
            parts = o.topic.split("/")
            if parts[0] == "dev":
                self.queue.append((parts[1], self._dp.Received(parts[2], o.payload)))
            elif parts[0] == "model":
                self.queue.extend((d, self._dp.Received("model", o.payload)) for d in sorted(self.devices))

    def _from_device(self, outs: list) -> None:
        for o in outs:
            if isinstance(o, Publish):
                _, did, kind = o.topic.split("/")
                self.queue.append(("", Received(kind, did, o.payload)))

    def _pump(self) -> None:
        while self.queue:
            to, ev = self.queue.popleft()
            if to == "":
                self.bytes_up += len(ev.payload) if ev.kind == "delta" else 0
                self._from_core(self.core.handle(ev))
            elif to in self.devices and to not in self.silent:
                self.bytes_down += len(ev.payload)
                self._from_device(self.devices[to].handle(ev))


def mqtt_grid(url, fleet: str, plan, config: GridConfig | None = None, first_round: int = 1,
              codec=None) -> tuple[FleetGrid, Any]:
    """A started ``(FleetGrid, CoordinatorLink)`` on broker ``url`` for fleet ``fleet``; ``link.stop()`` ends it."""
    from fleet.mqtt import CoordinatorLink

    def factory() -> GridCore:
        return GridCore(plan, time.time, config or GridConfig(), first_round, codec)

    link = CoordinatorLink(url, fleet, factory, client_id=f"tinyfleet-{fleet}-flower")
    link.start()
    return FleetGrid(link), link


# --- the ServerApp (flwr run) -------------------------------------------------------------------------------


def _strategy(name: str, n_nodes: int):
    from flwr.serverapp import strategy as fs

    common = {"fraction_evaluate": 0.0, "min_train_nodes": n_nodes, "min_available_nodes": n_nodes}
    if name == "fedavg":
        return fs.FedAvg(**common)
    if name == "fedprox":
        return fs.FedProx(proximal_mu=0.1, **common)
    if name == "krum":
        return fs.Krum(num_malicious_nodes=0, **common)
    raise ValueError(f"strategy: expected fedavg | fedprox | krum, got {name!r}")


def main(grid, context) -> None:
    """``flwr run`` entry. Run config keys (pyproject ``[tool.flwr.app.config]``): ``plan`` (path of a .ttp),
    ``broker`` (mqtt://host:port), ``fleet``, ``num-rounds``, ``min-nodes``, ``strategy``, ``lr``,
    ``local-steps``, ``batch-size``, ``round-timeout``, ``first-round``."""
    from flwr.app import ConfigRecord

    from device_agent.mqtt import BrokerURL
    from device_agent.wire.envelope import Verifier
    from device_agent.wire.plan import plan_from_bytes

    rc = context.run_config
    plan = plan_from_bytes(Path(str(rc["plan"])).read_bytes(), verify=Verifier.unsigned())
    cfg = GridConfig(lr=float(rc.get("lr", 0.05)), local_steps=int(rc.get("local-steps", 10)),
                     batch_size=int(rc.get("batch-size", 1)), deadline_s=float(rc.get("round-timeout", 60)))
    fleet_grid, link = mqtt_grid(BrokerURL.parse(str(rc.get("broker", "mqtt://127.0.0.1:1883"))),
                                 str(rc.get("fleet", "default")), plan, cfg, int(rc.get("first-round", 1)))
    try:
        fleet_grid.set_run(grid.run)
        strategy = SparseDeltaStrategy(_strategy(str(rc.get("strategy", "fedavg")), int(rc.get("min-nodes", 2))),
                                       plan)
        strategy.start(fleet_grid, initial_arrays(plan), num_rounds=int(rc.get("num-rounds", 3)),
                       timeout=cfg.deadline_s, train_config=ConfigRecord({"lr": cfg.lr,
                                                                          "local-steps": cfg.local_steps}))
    finally:
        link.stop()


def _make_app():
    from flwr.serverapp import ServerApp

    a = ServerApp()
    a.main()(main)
    return a


app = _make_app()
