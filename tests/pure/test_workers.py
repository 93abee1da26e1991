"""Host devices in worker processes (fleet/sim/workers.py) train bit-identically to in-process devices."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from device_agent import protocol as dp
from device_agent.buffer import SampleBuffer
from device_agent.engine.trainer import Trainer
from device_agent.wire.envelope import Signer, Verifier
from device_agent.wire.messages import Publish
from fleet import coordinator as co
from fleet.compiler.pipeline import mark_personal
from fleet.round import RoundConfig
from fleet.sim.workers import WorkerError, WorkerPool
from fleet.store import Store
from tests.fixtures.tiny import tiny_dataset, tiny_plan

N = 6


@pytest.fixture(scope="module")
def plan():
    p = tiny_plan()
    return mark_personal(p, [p.trainable[-1].name])  # one personal tensor: it must stay in the worker, trained


@pytest.fixture(scope="module")
def pool(plan):
    pool = WorkerPool(2, plan)
    yield pool
    pool.close()


def run_fleet(plan, make_device, rounds: int = 2) -> tuple[dict, list[tuple[str, bytes]], list]:
    """Coordinator + N devices over a FIFO in-memory link; returns (final model, every delta, the devices)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    cfg = co.CoordinatorConfig(round=RoundConfig(goal=N, quorum=0.5, deadline_s=60.0), lr=0.2, local_steps=8,
                               batch_size=1)
    coord = co.Coordinator(plan, Store(), cfg, lambda: 0.0, co.WireCodec(plan, signer=Signer.ed25519(key)))
    verifier = Verifier.ed25519(key.public_key())
    devices = {f"d{i:02d}": make_device(i, f"d{i:02d}", verifier) for i in range(N)}
    queue: deque = deque()
    deltas: list[tuple[str, bytes]] = []

    def from_coord(outs):
        for o in outs:
            if isinstance(o, Publish):
                parts = o.topic.split("/")
                targets = [parts[1]] if parts[0] == "dev" else sorted(devices)
                queue.extend(("d", t, dp.Received(parts[-1] if parts[0] == "dev" else "model", o.payload))
                             for t in targets)

    def from_dev(outs):
        for o in outs:
            if isinstance(o, Publish):
                _, did, kind = o.topic.split("/")
                queue.append(("c", co.Received(kind, did, o.payload)))

    def pump():
        while queue:
            item = queue.popleft()
            if item[0] == "c":
                if item[1].kind == "delta":
                    deltas.append((item[1].device_id, item[1].payload))
                from_coord(coord.handle(item[1]))
            else:
                from_dev(devices[item[1]].handle(item[2]))

    from_coord(coord.handle(co.Boot()))
    for d in devices.values():
        from_dev(d.handle(dp.Start()))
    pump()
    for _ in range(rounds):
        from_coord(coord.handle(co.StartRound()))
        pump()
    return {k: v.copy() for k, v in coord.state.items()}, deltas, list(devices.values())


def samples(i: int):
    x, y = tiny_dataset(40 + i, seed=i)
    return x, y.astype(np.int32)


def test_worker_devices_are_bit_identical_to_in_process(plan, pool):
    assert_bit_identical(plan, pool)


def assert_bit_identical(plan, pool) -> None:
    """Devices in ``pool`` (a WorkerPool or its Ray twin) against in-process devices: same deltas, models, state."""
    def local(i, did, verifier):
        x, y = samples(i)
        buf = SampleBuffer(len(y), x.shape[1:], np.int8, seed=100 + i)
        buf.add(x, y)
        return dp.DeviceProtocol(dp.Identity(did, "stm32f746", 320_000, 1_000_000), plan, Trainer(plan),
                                 dp.WireDeviceCodec(plan, verifier), buf, seed=i)

    def remote(i, did, verifier):
        x, y = samples(i)
        return pool.device(i, dp.Identity(did, "stm32f746", 320_000, 1_000_000), verifier, x, y,
                           (len(y), x.shape[1:], np.int8, 100 + i), seed=i)

    state_a, deltas_a, devs_a = run_fleet(plan, local)
    state_b, deltas_b, devs_b = run_fleet(plan, remote)
    assert len(deltas_a) == 2 * N
    assert deltas_a == deltas_b  # every delta byte for byte, in the same order
    assert all(np.array_equal(state_a[k], state_b[k]) for k in state_a)
    assert state_a[plan.trainable[0].id].any()  # it trained
    for a, b in zip(devs_a, devs_b):  # personal tensors: trained in the worker, readable by the harness
        assert a.trainer.state_hash() == b.trainer.state_hash()
        assert b.version == a.version >= 2
    assert sorted({b.worker for b in devs_b}) == [0, 1]


def test_worker_errors_name_the_cause(plan, pool):
    with pytest.raises(ValueError, match="at least 1 worker"):
        WorkerPool(0, plan)
    with pytest.raises(WorkerError, match="not one of"):
        pool.request(0, "call", 0, "trainer.load_trainable", ({},))
    with pytest.raises(WorkerError, match="KeyError"):
        pool.request(1, "call", 12345, "status", ())
