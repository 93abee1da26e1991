"""Aggregation workers (fleet/coordinator/pool.py) through a real Mosquitto: the committed model is bit-identical
to the single-process coordinator's, every delta counted once, also when a worker is SIGKILLed after the
coordinator accepted a delta it read (before it summed or acknowledged it) and the device sends every delta twice."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from tests.broker.conftest import wait_online

pytestmark = pytest.mark.broker

N = 24  # devices
FLEET = "agg"


def _templates(plan, n=3):
    from device_agent.engine.trainer import Trainer
    from device_agent.wire.delta import encode_delta
    from device_agent.wire.plan import plan_hash
    from tests.fixtures.tiny import tiny_dataset

    out = []
    for i in range(n):
        x, y = tiny_dataset(24, seed=i)
        t = Trainer(plan)
        old = t.trainable_state()
        for k in range(4):
            t.train_step(x[k * 4:(k + 1) * 4], y[k * 4:(k + 1) * 4], 0.2)
        out.append(encode_delta(plan, old, t.trainable_state(), device_id="tmpl", round_id=1,
                                base_hash=b"\0" * 32, counter=1, sample_count=10 + i, plan_hash=plan_hash(plan)))
    return out


class Player:
    """Plays N devices on one MQTT client: hello + status each, then answers every task with that device's
    delta (a template re-encoded for the device, round and base), published ``copies`` times."""

    def __init__(self, url, plan_hash: str, templates, copies: int, gap_s: float = 0.0, fleet: str = FLEET):
        from device_agent.mqtt import MqttEndpoint
        from device_agent.wire.messages import Hello, Status, Task, full_topic, parse, split_topic

        self.templates, self.copies = templates, copies

        def on_task(topic, payload, ack):
            answer(topic, payload)
            ack()

        def answer(topic, payload):
            where = split_topic(fleet, topic)
            if where is not None and where[1] == "task":
                task = parse(payload, Task)
                i = int(where[0][1:])
                t = templates[i % len(templates)]
                t.device_id, t.round_id, t.base_hash, t.counter = where[0], task.round_id, bytes.fromhex(
                    task.model_hash), task.round_id
                blob = t.to_bytes()
                for _ in range(copies):
                    self.sim.publish(full_topic(fleet, f"dev/{where[0]}/delta"), blob)
                time.sleep(gap_s)  # NOTE: devices finishing one by one: a round closes long after its first batch

        self.sim = MqttEndpoint(url, f"{fleet}-player", [full_topic(fleet, "dev/+/task")], on_task).start()
        for i in range(N):
            d = f"d{i:03d}"
            self.sim.publish(full_topic(fleet, f"dev/{d}/hello"),
                             Hello(d, "stm32f746", 320_000, 1_000_000, (plan_hash,), "sim").to_json(), retain=True)
            self.sim.publish(full_topic(fleet, f"dev/{d}/status"), Status(d, "online", 1, 24).to_json(),
                             retain=True)


def _run(broker, tmp_path, workers: int, crash_after: int = 0, rounds: int = 2, copies: int = 2,
         linger_s: float = 0.25, gap_s: float = 0.0):
    """Run ``rounds`` rounds of N devices; returns (states after each round, last merges, pool restarts)."""
    from fleet import round as rnd
    from fleet.coordinator import Coordinator, CoordinatorConfig, RoundClosed, StartRound, WireCodec
    from fleet.coordinator.pool import AggregationPool
    from fleet.mqtt import CoordinatorLink
    from fleet.store import Store
    from tests.fixtures.tiny import tiny_plan

    plan = tiny_plan()
    fleet = f"{FLEET}w" if workers else FLEET  # NOTE: its own MQTT sessions: none kept from the run without workers
    cfg = CoordinatorConfig(round=rnd.RoundConfig(goal=N, over_selection=1.0, quorum=1.0, deadline_s=60.0))
    pool = AggregationPool(broker.url, fleet, WireCodec(plan), workers, crash_after, linger_s) if workers else None
    closed: list = []
    done = threading.Event()

    def on_output(o):
        if isinstance(o, RoundClosed):
            closed.append(o)
            done.set()

    def factory():
        c = Coordinator(plan, Store(str(tmp_path / f"store-{workers}.sqlite")), cfg, time.time, WireCodec(plan))
        if pool is not None:
            c.partials = pool.partials
        return c

    from device_agent.wire.messages import DEVICE_UP
    kinds = DEVICE_UP if pool is None else tuple(k for k in DEVICE_UP if k != "delta")
    link = CoordinatorLink(broker.url, fleet, factory, on_output=on_output, kinds=kinds).start()
    if pool is not None:
        pool.start(link)
    player = Player(broker.url, link.call(lambda c: c.codec.plan_hash), _templates(plan), copies=copies,
                    gap_s=gap_s, fleet=fleet)
    try:
        wait_online(link, N)
        states = []
        for r in range(rounds):
            done.clear()
            link.submit(StartRound())
            assert done.wait(90), f"round {r + 1} did not close"
            assert closed[-1].committed and len(closed[-1].accepted) == N, closed[-1]
            states.append(link.call(lambda c: ({k: v.copy() for k, v in c.state.items()}, c.hash, c.last_merge)))
        restarts = pool.restarts if pool is not None else 0
        return states, restarts
    finally:
        player.sim.stop()
        if pool is not None:
            pool.stop()
        link.stop()


def test_workers_commit_the_single_process_model(broker, tmp_path):
    # Prepare / Execute: the same deltas (each sent twice) to one coordinator alone, then to 2 workers
    alone, _ = _run(broker, tmp_path, workers=0)
    pooled, restarts = _run(broker, tmp_path, workers=2)
    # Assert: same model, bit for bit, every round; the workers summed (the coordinator decoded at most a batch)
    for (s1, h1, _), (s2, h2, merge) in zip(alone, pooled):
        assert h1 == h2
        assert all(np.array_equal(s1[k], s2[k]) for k in s1)
        assert merge is not None and not merge.refused and len(merge.missing) < N
        assert any(w.startswith("agg") for w in merge.taken)
    assert restarts == 0


def test_a_worker_killed_after_acceptance_loses_and_doubles_nothing(broker, tmp_path):
    # Prepare / Execute: slot 0 SIGKILLs itself after the coordinator accepted its 3rd delta, before summing
    # or acknowledging it (no linger and deltas 20 ms apart: batches of one or two, so the kill comes early in
    # round 1, with 2 deltas summed and lost with it); the pool restarts the slot and the broker redelivers its
    # unacknowledged deltas
    alone, _ = _run(broker, tmp_path, workers=0, copies=1)
    pooled, restarts = _run(broker, tmp_path, workers=2, crash_after=3, copies=1, linger_s=0.0, gap_s=0.02)
    # Assert: the kill happened, its accepted deltas were made up from the store, the model is the same
    assert restarts >= 1
    first_merge = pooled[0][2]
    assert first_merge.missing, "the killed worker's accepted deltas must come from the store"
    for (s1, h1, _), (s2, h2, _) in zip(alone, pooled):
        assert h1 == h2
        assert all(np.array_equal(s1[k], s2[k]) for k in s1)


def test_serve_with_aggregation_workers_commits_a_round(serve_tiny, tmp_path):
    # Prepare: `tinyfleet serve` with two aggregation workers and two `device-agent run` processes
    # Execute
    rc, err = serve_tiny("aggserve", "rounds: 2\nlocal_steps: 5\ndeadline: 30\naggregation_workers: 2\n",
                         ["--out", tmp_path / "run"])
    # Assert
    assert rc == 0, err
    assert "2 aggregation workers on tinyfleet/aggserve/dev/+/delta (shared subscription)" in err
    assert "round 1: committed v2 (2 deltas)" in err and "round 2: committed v3 (2 deltas)" in err
    agg = json.loads((tmp_path / "run" / "metrics.json").read_text())["aggregation"]  # the workers summed all 4
    assert agg["workers"] == 2 and agg["restarts"] == 0 and sum(agg["summed"]) == 4, agg


def test_a_lingering_worker_answers_a_commit_at_once_without_its_unclaimed_deltas(broker, tmp_path):
    # Prepare: one worker whose claim batches close only at multiples of 600 s of the wall clock; a round starts
    # and every device sends its delta, which the worker holds unclaimed while it lingers
    from device_agent.wire.messages import DEVICE_UP
    from fleet import round as rnd
    from fleet.coordinator import Coordinator, CoordinatorConfig, StartRound, WireCodec
    from fleet.coordinator.pool import AggregationPool
    from fleet.mqtt import CoordinatorLink
    from fleet.store import Store
    from tests.fixtures.tiny import tiny_plan

    plan, fleet, linger = tiny_plan(), f"{FLEET}l", 600.0
    if time.time() % linger > linger - 30:  # NOTE: not across a batch boundary: the test needs the batch open
        time.sleep(linger - time.time() % linger + 0.1)
    cfg = CoordinatorConfig(round=rnd.RoundConfig(goal=N, over_selection=1.0, quorum=1.0, deadline_s=60.0))
    pool = AggregationPool(broker.url, fleet, WireCodec(plan), 1, linger_s=linger)

    def factory():
        c = Coordinator(plan, Store(str(tmp_path / "store.sqlite")), cfg, time.time, WireCodec(plan))
        c.partials = pool.partials
        return c

    link = CoordinatorLink(broker.url, fleet, factory, kinds=tuple(k for k in DEVICE_UP if k != "delta")).start()
    pool.start(link)
    player = Player(broker.url, link.call(lambda c: c.codec.plan_hash), _templates(plan), copies=1, fleet=fleet)
    try:
        wait_online(link, N)
        link.submit(StartRound())
        time.sleep(1.5)  # the tasks go out, the deltas come back to the worker
        # Execute: the coordinator asks for the round's partial (as a commit does) while the batch lingers
        t0 = time.monotonic()
        parts = link.call(lambda c: pool.partials(c.machine.round_id), timeout=20.0)
        waited = time.monotonic() - t0
        # Assert: answered at once, holding none of the deltas that no verdict has accepted yet
        assert waited < 5.0, f"the partial took {waited:.1f} s: the worker did not answer while lingering"
        assert len(parts) == 1 and parts[0].covered == {} and parts[0].rows == [] and parts[0].sums.count == 0
        assert link.call(lambda c: len(c.machine.accepted)) == 0
    finally:
        player.sim.stop()
        pool.stop()
        link.stop()
