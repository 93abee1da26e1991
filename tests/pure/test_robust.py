"""Robust aggregation against one poisoning device out of ten, on real encoded deltas of the engine's tiny task.

Ten host devices train ``examples.tiny_plan`` on their own ``tiny_dataset`` shards for three rounds; every
round each delta goes through the wire (``encode_delta`` -> bytes -> ``delta_from_bytes`` -> dense values and
support masks, as the coordinator decodes it) and is aggregated by ``fleet.aggregate``. Device 9 is the
attacker. Its delta stays a *valid* wire delta (int8 weight differences within +-254), because anything else
the coordinator already rejects. Accuracy is measured on 1000 held-out samples.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from device_agent.engine.trainer import Trainer
from device_agent.wire.delta import delta_from_bytes, delta_support, delta_to_dense, encode_delta
from fleet import aggregate as agg
from tests.fixtures.tiny import tiny_dataset, tiny_plan

PLAN = tiny_plan()
SHARED = [t for t in PLAN.trainable if not t.personal]
TEST_X, TEST_Y = tiny_dataset(1000, seed=1000)
SHARDS = [tiny_dataset(48, seed=i) for i in range(10)]
ROUNDS, LR, STEPS, BATCH = 3, 0.2, 8, 8
CLIP, BETA = 3000.0, 0.1  # CLIP ~ the honest devices' median L2 norm in integer units (measured: 2000-4300)
WIRE_LIMIT = np.concatenate([np.full(t.numel, 254 if t.dtype.name == "INT8" else 2**31 - 1) for t in SHARED])
ATTACKER = 9


def _flat(per_tensor: dict[int, np.ndarray]) -> np.ndarray:
    return np.concatenate([per_tensor[t.id].reshape(-1) for t in SHARED])


def honest_deltas(state: dict[int, np.ndarray], round_id: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Every device trains from ``state``; its delta travels through the wire format like a real upload."""
    rows = []
    for i, (x, y) in enumerate(SHARDS):
        tr = Trainer(PLAN)
        tr.load_trainable(state)
        rng = np.random.default_rng([i, round_id])
        for _ in range(STEPS):
            pick = rng.choice(len(x), BATCH, replace=False)
            tr.train_step(x[pick], y[pick], LR)
        new = {t.id: tr.trainable_state()[t.id] for t in SHARED}
        blob = encode_delta(PLAN, state, new, device_id=f"d{i}", round_id=round_id, base_hash=bytes(32),
                            counter=round_id, sample_count=len(x)).to_bytes()
        d = delta_from_bytes(blob)
        rows.append((_flat(delta_to_dense(d, PLAN)).astype(np.int64), _flat(delta_support(d, PLAN)), d.sample_count))
    return rows


ATTACKS = {
    "none": lambda v, w: (v, w),
    "scaled_100x": lambda v, w: (np.clip(v * 100, -WIRE_LIMIT, WIRE_LIMIT), w),
    "sign_flipped": lambda v, w: (-v, w),
    "sign_flipped_100x": lambda v, w: (np.clip(v * -100, -WIRE_LIMIT, WIRE_LIMIT), w),
    "sign_flipped_100x_claims_1e6_samples": lambda v, w: (np.clip(v * -100, -WIRE_LIMIT, WIRE_LIMIT), 10**6),
}


@functools.cache
def _round1() -> list:
    return honest_deltas({t.id: np.asarray(t.data) for t in SHARED}, 1)  # every run starts from the same model


@functools.cache
def run(attack: str, aggregator: str) -> float:
    """Accuracy after ``ROUNDS`` rounds with device 9 applying ``attack`` every round."""
    state = {t.id: np.asarray(t.data) for t in SHARED}
    for r in range(1, ROUNDS + 1):
        rows = list(_round1() if r == 1 else honest_deltas(state, r))
        v, m, w = rows[ATTACKER]
        v, w = ATTACKS[attack](v, w)
        rows[ATTACKER] = (v, m, w)
        values, masks = np.stack([a for a, _, _ in rows]), np.stack([b for _, b, _ in rows])
        weights = np.array([c for *_, c in rows], np.int64)
        step = agg.to_int_delta(agg.aggregate(aggregator, values, masks, weights, clip=CLIP, beta=BETA))
        pos, new = 0, {}
        for t in SHARED:
            new[t.id] = agg.apply_int_delta(state[t.id], step[pos:pos + t.numel])
            pos += t.numel
        state = new
    tr = Trainer(PLAN)
    tr.load_trainable(state)
    return tr.evaluate(TEST_X, TEST_Y)


def test_clean_runs_learn_and_robust_rules_cost_under_one_point():
    base = run("none", "fedavg")
    assert base > 0.9, base
    for kind in ("clipped", "median", "trimmed"):
        assert abs(run("none", kind) - base) <= 0.01, (kind, run("none", kind), base)


@pytest.mark.parametrize("attack", ["scaled_100x", "sign_flipped_100x"])
def test_plain_fedavg_visibly_degrades(attack):
    assert run(attack, "fedavg") < run("none", "fedavg") - 0.3, run(attack, "fedavg")


@pytest.mark.parametrize("kind, attack", [
    ("clipped", "scaled_100x"), ("median", "scaled_100x"), ("trimmed", "scaled_100x"),
    ("median", "sign_flipped"), ("trimmed", "sign_flipped"),
    ("median", "sign_flipped_100x"), ("trimmed", "sign_flipped_100x"),
])
def test_robust_rules_stay_within_one_point_of_their_clean_run(attack, kind):
    clean, attacked = run("none", kind), run(attack, kind)
    assert attacked >= clean - 0.01, (attack, kind, attacked, clean)


@pytest.mark.parametrize("attack", ["sign_flipped", "sign_flipped_100x"])
def test_clipped_mean_bounds_but_does_not_remove_a_sign_flip(attack):
    # NOTE: measured after 3 rounds: clean 93.5%, either flip 92.2% (-1.3 points; plain FedAvg under the
    # unscaled flip: 92.2% too). Clipping bounds a delta's size, not its direction: a flipped delta of honest
    # size passes whole and cancels one honest device, so convergence is ~20% slower. Median and trimmed mean
    # drop it (previous test); plain FedAvg under the 100x flip ends at chance (25%).
    assert run(attack, "clipped") >= run("none", "clipped") - 0.02
    assert run(attack, "clipped") >= run("sign_flipped_100x", "fedavg") + 0.5


@pytest.mark.parametrize("kind", ["median", "trimmed"])
def test_unweighted_rules_ignore_an_inflated_sample_count(kind):
    assert run("sign_flipped_100x_claims_1e6_samples", kind) >= run("none", kind) - 0.02


def test_clipped_mean_ignores_an_inflated_sample_count():
    # the clipped mean caps every weight at the median sample count: the liar counts as one median device
    assert run("sign_flipped_100x_claims_1e6_samples", "clipped") >= run("none", "clipped") - 0.02


def test_capped_weights_keep_honest_weighting_and_cap_the_liar():
    w = np.array([40, 48, 50, 10**6], np.int64)
    assert agg.capped_weights(w).tolist() == [40, 48, 48, 48]
    values = np.array([[2.0], [2.0], [2.0], [-100.0]])
    mean = agg.clipped_mean(values, np.ones((4, 1), bool), w, clip=1e9)  # nothing clipped: only the weights
    assert np.isclose(mean.value[0], (2.0 * (40 + 48 + 48) - 100.0 * 48) / (40 + 48 + 48 + 48))
