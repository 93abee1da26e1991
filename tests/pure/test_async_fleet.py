"""Async mode with host devices (real engine training on examples.tiny_plan) through the in-memory link.

Checks each committed version against a float64 numpy reference written from the docs' formula alone (staleness
from the delta's base hash, factor ``1/sqrt(1+s)`` in Q16, sample-weighted over each coordinate's voters), a device
that sleeps through several versions (refused as too stale, then caught up by a FULL update and counted again),
and a coordinator crashed between accepting the K-th delta and committing.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from device_agent import protocol as dp
from device_agent.engine.trainer import Trainer
from device_agent.wire.delta import delta_from_bytes, delta_support, delta_to_dense
from device_agent.wire.messages import Publish
from fleet import coordinator as co
from fleet.coordinator.async_round import AsyncConfig
from fleet.coordinator.core import unpack_state
from fleet.store import Store
from tests.pure.test_fleet_inmemory import PLAN, TEST_X, TEST_Y, Fleet, config


def async_config(k=4, max_staleness=3, max_versions=0, **kw) -> co.CoordinatorConfig:
    return replace(config(goal=k), mode="async", max_versions=max_versions,
                   asynchronous=AsyncConfig(buffer_size=k, max_staleness=max_staleness, **kw))


def started(n=10, store=None, **kw) -> Fleet:
    f = Fleet(n=n, cfg=async_config(**kw), store=store)
    f.boot()
    f.now += 1.0
    f.send(co.StartRound())
    return f


def reference_version(store: Store, b: int, server_lr: float = 1.0) -> dict[int, np.ndarray]:
    """Version b + 1 from version b and buffer b's stored payloads, by the documented formula, in float64."""
    shared = [t for t in PLAN.trainable if not t.personal]
    old = unpack_state(shared, store.version(b).state)
    by_hash = {store.version(v).hash: v for v in range(1, b + 1)}
    ids = sorted(old)
    num = {t: np.zeros(old[t].size) for t in ids}
    den = {t: np.zeros(old[t].size) for t in ids}
    for row, _ in store.buffered(b):
        d = delta_from_bytes(row.payload)
        s = b - by_hash[bytes(d.base_hash).hex()]
        f = np.floor(server_lr * (1.0 + s) ** -0.5 * 65536 + 0.5) / 65536
        vals, masks = delta_to_dense(d, PLAN), delta_support(d, PLAN)
        for t in ids:
            m = masks[t].ravel()
            num[t] += np.where(m, vals[t].ravel().astype(np.float64) * d.sample_count * f, 0.0)
            den[t] += np.where(m, float(d.sample_count), 0.0)
    out = {}
    for t in ids:
        step = np.where(den[t] > 0, np.floor(num[t] / np.where(den[t] > 0, den[t], 1.0) + 0.5), 0.0)
        lo, hi = (-127, 127) if old[t].dtype == np.int8 else (-(2**31), 2**31 - 1)
        out[t] = np.clip(old[t].astype(np.int64).ravel() + step.astype(np.int64), lo, hi).reshape(old[t].shape)
    return out


def test_commits_every_k_with_exact_staleness_weights():
    f = started()
    before = Trainer(PLAN).evaluate(TEST_X, TEST_Y)
    f.pump(max_coord=150)
    closed = f.closed()
    assert len(closed) >= 8 and [c.version for c in closed] == list(range(2, len(closed) + 2))
    assert all(c.committed and len(c.accepted) == 4 for c in closed)
    ok = [v for v in f.verdicts() if v.reason == "ok"]
    assert len(ok) == 4 * len(closed) + len(f.coord.machine.buffer)
    stale_seen = set()
    for c in closed:
        ref = reference_version(f.store, c.round_id)
        got = unpack_state([t for t in PLAN.trainable if not t.personal], f.store.version(c.version).state)
        assert all(np.array_equal(ref[t], got[t]) for t in ref), c
        stale_seen |= {int(s) for s in c.detail.removeprefix("staleness ").split(",")}
    assert stale_seen - {0}, "the FIFO interleaving should produce stale deltas"
    assert f.accuracy() > before + 0.1


def test_server_learning_rate_scales_every_factor_as_documented():
    # Prepare: half steps (FedBuff's server learning rate); out-of-range values are refused with their key
    assert AsyncConfig(server_lr=0.0).validate() == ["server_lr: must be in (0, 1], got 0.0"]
    assert AsyncConfig(server_lr=1.5).validate() and not AsyncConfig(server_lr=0.5).validate()
    f = started(server_lr=0.5)
    # Execute
    f.pump(max_coord=60)
    # Assert: every version is the documented formula with q = floor(0.5 f(s) 2^16 + 0.5)
    closed = f.closed()
    assert len(closed) >= 3
    for c in closed:
        ref = reference_version(f.store, c.round_id, server_lr=0.5)
        got = unpack_state([t for t in PLAN.trainable if not t.personal], f.store.version(c.version).state)
        assert all(np.array_equal(ref[t], got[t]) for t in ref), c


def test_delayed_delta_refused_too_stale_with_its_reason():
    f = started(max_staleness=2)
    f.pump(max_coord=12)
    held: list = []
    route = f._route_dev

    def slow_uplink(dev, outs):  # d05's next delta is held back in the network
        keep = [o for o in outs if isinstance(o, Publish) and o.topic == "dev/d05/delta"][:1] if not held else []
        held.extend(keep)
        route(dev, [o for o in outs if o not in keep])

    f._route_dev = slow_uplink
    while not held:
        f.pump(max_coord=1)
    v0 = f.coord.version
    while f.coord.version < v0 + 4:
        f.pump(max_coord=5)
    f._route_dev = route
    route(f.devices["d05"], held)
    f.pump(max_coord=40)
    mine = [v for v in f.verdicts() if v.device_id == "d05"]
    refused = [v for v in mine if v.reason == "too_stale"]
    assert len(refused) == 1 and refused[0].code == 12 and "versions behind, max 2" in refused[0].detail
    assert "ok" in [v.reason for v in mine[mine.index(refused[0]) + 1:]]  # a new task, counted again


def test_sleeper_catches_up_by_full_update_and_counts_again():
    f = started(max_staleness=2)
    f.pump(max_coord=12)
    f.alive.discard("d09")  # asleep: nothing reaches it, it sends nothing
    held = f.devices["d09"].version
    while f.coord.version < held + 4:
        f.pump(max_coord=5)
    n_ok = [v.reason for v in f.verdicts() if v.device_id == "d09"].count("ok")
    f.alive.add("d09")
    dev = f.devices["d09"]
    f._route_dev(dev, dev.handle(dp.Start()))  # wakes: hello + status with its old version
    f.pump(max_coord=40)
    assert dev.version > held + 4  # the DIFFs it slept through cannot apply: the FULL form on dev/<id>/model
    assert [v.reason for v in f.verdicts() if v.device_id == "d09"].count("ok") > n_ok


def test_crash_between_accept_and_commit_resumes_bit_identically(tmp_path):
    ref = started(store=Store(tmp_path / "ref.db"))
    ref.pump(max_coord=60)

    class Dies(Store):
        def commit_buffer(self, *a, **kw):
            raise RuntimeError("killed before the commit")

    path = tmp_path / "c.db"
    f = started(store=Dies(path))
    try:
        f.pump(max_coord=60)
    except RuntimeError:
        pass
    assert f.coord.version == 1 and len(f.store.buffered(1)) == 4  # the K-th delta is durable, the version not
    f.restart_coordinator(Store(path))  # boots: finishes the commit, re-sends open tasks
    f.pump(max_coord=5)
    assert f.coord.version >= 2
    assert f.store.version(2) == ref.store.version(2)  # bit-identical (hash and stored state)
    rows = [(r.round_id, r.device_id) for r, _ in f.store.buffered(1)]
    assert len(rows) == len(set(rows)) == 4


def test_session_closes_at_max_versions_and_stays_closed_after_a_restart(tmp_path):
    path = tmp_path / "s.db"
    f = started(store=Store(path), max_versions=3)
    f.pump(max_coord=150)
    assert [c.version for c in f.closed()] == [2, 3, 4]  # exactly max_versions, though devices kept training
    assert f.coord.machine.tasks == {} and f.coord.machine.state.value == "idle"
    assert f.coord.handle(co.StartRound()) == []  # a run that published its versions does not reopen
    f.restart_coordinator(Store(path))
    f.send(co.StartRound())
    f.pump(max_coord=40)
    assert f.coord.version == 4 and f.store.version(5) is None
