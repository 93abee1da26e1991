"""Running a Flower strategy on a TinyFleet fleet: the two links for :class:`fleet.flower.FleetGrid` and a
``ServerApp`` for ``flwr run``.

- :func:`mqtt_grid` (from :mod:`fleet.flower.broker`) — the grid over a real broker, continuing the fleet's
  model versions and round ids, one ServerApp per fleet at a time.
- :class:`InMemoryLink` — the grid and host devices (``device_agent.protocol.DeviceProtocol``) in one process,
  FIFO delivery, no broker: for tests and benchmarks.
- ``app`` — a ``flwr.serverapp.ServerApp`` whose ``main`` ignores the SuperLink's grid (our devices are not
  SuperNodes) and runs a stock strategy, wrapped in :class:`~fleet.flower.SparseDeltaStrategy`, on an MQTT grid,
  signed with the fleet key; at the end the final model is saved and published to the devices.

This module owns no round logic; it only wires.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.wire.messages import Publish
from fleet.coordinator import Boot, Received
from fleet.flower import (
    FleetBusy,
    GridConfig,
    GridCore,
    SetModel,
    SparseDeltaStrategy,
    arrays_from_state,
    initial_arrays,
)
from fleet.flower.broker import FleetSnapshot, FlowerLink, mqtt_grid, read_fleet


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


# --- the ServerApp (flwr run) -------------------------------------------------------------------------------


def signing(rc):
    """``(signer, verifier)`` from the run config's ``key`` (created with its ``.pub`` when missing, as
    ``tinyfleet serve --key``), or the unsigned pair with ``insecure-unsigned``."""
    from device_agent.wire.envelope import Signer, Verifier
    from fleet.serve import load_or_create_key

    if rc.key is None:
        return None, Verifier.unsigned()
    key = load_or_create_key(Path(rc.key).expanduser())
    return Signer.ed25519(key), Verifier.ed25519(key.public_key())


def evaluator(plan, path: str):
    """``evaluate_fn(round, arrays) -> MetricRecord(accuracy)`` on the coordinator's samples in ``path``."""
    from flwr.app import MetricRecord

    from device_agent.engine.trainer import Trainer
    from device_agent.samples import prepare
    from fleet.flower import state_from_arrays

    with np.load(Path(path).expanduser(), allow_pickle=False) as data:
        x, y, _ = prepare(plan, data["x"], data["y"])

    def evaluate(server_round: int, arrays) -> MetricRecord:
        t = Trainer(plan)
        t.load_trainable(state_from_arrays(plan, arrays))
        return MetricRecord({"accuracy": float(t.evaluate(x, y)), "eval-samples": len(x)})
    return evaluate


def save_model(path: Path, plan, state: dict, version: int, model_hash: str) -> None:
    """The final model as an .npz: one integer array per shared trainable tensor (by name), plus
    ``tinyfleet-version`` and ``tinyfleet-model-hash``."""
    from fleet.flower import shared_tensors

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {t.name: np.asarray(state[t.id]) for t in shared_tensors(plan)}
    with open(path, "wb") as f:
        np.savez(f, **arrays, **{"tinyfleet-version": np.array(version), "tinyfleet-model-hash": np.array(model_hash)})


def main(grid, context) -> None:
    """``flwr run`` entry; the run config keys are those of :mod:`fleet.flower.runconfig` (docs/flower.md)."""
    from logging import INFO, WARNING

    from flwr.app import ConfigRecord
    from flwr.common.logger import log

    from device_agent.mqtt import BrokerURL
    from device_agent.wire.envelope import Verifier
    from device_agent.wire.plan import plan_from_bytes
    from fleet.flower import runconfig

    rc = runconfig.parse(dict(context.run_config))
    try:
        blob = Path(rc.plan).expanduser().read_bytes()
    except OSError as e:
        raise runconfig.RunConfigError(f"run config: plan: cannot read {rc.plan} ({e.strerror or e})") from None
    plan = plan_from_bytes(blob, verify=Verifier.skip())  # our own file: signed by the codec when published
    signer, verify = signing(rc)
    evaluate_fn = evaluator(plan, rc.eval_data) if rc.eval_data else None
    inner = runconfig.make_strategy(rc)
    if rc.strategy.lower() == "fedprox":
        log(WARNING, "tinyfleet: FedProx with proximal-mu = 0 is FedAvg (devices add no proximal term)")
    cfg = GridConfig(lr=rc.lr, local_steps=rc.local_steps, batch_size=rc.batch_size, deadline_s=rc.round_timeout,
                     topk_permille=rc.topk_permille)
    url = BrokerURL.parse(rc.broker, ca_file=rc.ca_file, cert_file=rc.cert_file, key_file=rc.key_file)
    fleet_grid, link = mqtt_grid(url, rc.fleet, plan, cfg, rc.first_round, signer=signer, verify=verify,
                                 run_id=grid.run.run_id, initial=rc.initial_model)
    try:
        fleet_grid.set_run(grid.run)
        start = link.call(lambda core: arrays_from_state(plan, core.state))
        version = link.call(lambda core: core.version)
        log(INFO, "tinyfleet: fleet %r on %s, starting from model v%d, %s", rc.fleet, url, version,
            "signed" if signer else "UNSIGNED (insecure-unsigned)")
        strategy = SparseDeltaStrategy(inner, plan)
        result = strategy.start(fleet_grid, start, num_rounds=rc.num_rounds, timeout=rc.round_timeout,
                       train_config=ConfigRecord({"lr": rc.lr, "local-steps": rc.local_steps,
                                                  "batch-size": rc.batch_size, "topk-permille": rc.topk_permille}),
                       evaluate_fn=evaluate_fn)
        if not result.train_metrics_clientapp:
            raise RuntimeError(f"no device delivered an accepted delta in any of the {rc.num_rounds} rounds (see the "
                               "error replies above and the devices' logs); the fleet's model is unchanged")
        link.submit(SetModel(strategy.state))
        version, mhash = link.call(lambda core: (core.version, core.hash))
        log(INFO, "tinyfleet: final model v%d (%s) published on model/current", version, mhash[:16])
        if rc.final_model:
            save_model(Path(rc.final_model).expanduser(), plan, strategy.state, version, mhash)
            log(INFO, "tinyfleet: final model saved to %s", rc.final_model)
    finally:
        link.stop()


def _make_app():
    from flwr.serverapp import ServerApp

    a = ServerApp()
    a.main()(main)
    return a


app = _make_app()

__all__ = ["FleetBusy", "FleetSnapshot", "FlowerLink", "InMemoryLink", "app", "client_app", "evaluator", "initial_arrays",
           "main", "mqtt_grid", "read_fleet", "save_model", "signing"]


def _make_client_app():
    """flwr's app schema requires a ``clientapp``; TinyFleet devices are not SuperNodes, so nothing should ever
    run this one: a SuperNode that does gets a clear error instead of silently training nothing."""
    from flwr.clientapp import ClientApp

    c = ClientApp()

    @c.train()
    def _train(msg, context):
        raise RuntimeError("fleet.flower_app:client_app runs on no device: TinyFleet devices speak MQTT "
                           "(device-agent run), they are not Flower SuperNodes")

    return c


client_app = _make_client_app()
