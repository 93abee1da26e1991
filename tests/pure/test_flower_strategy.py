"""SparseDeltaStrategy: stock Flower strategies aggregate decoded sparse int8 deltas; rounding back to int8;
and why fleet.aggregate (not Flower's FedTrimmedAvg) must aggregate top-k deltas robustly."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
    FedTrimmedAvg,
    Krum,
)
from flwr.supercore.task_identity import TaskIdentity

from device_agent.wire.delta import delta_from_bytes, delta_support, encode_delta
from device_agent.wire.plan import plan_hash
from fleet import aggregate as agg
from fleet.coordinator import WireCodec
from fleet.flower import (
    META,
    SparseDeltaStrategy,
    arrays_from_state,
    initial_arrays,
    reply_content,
    shared_tensors,
    state_from_arrays,
)
from tests.fixtures.tiny import tiny_plan

PLAN = tiny_plan()
SHARED = shared_tensors(PLAN)
CODEC = WireCodec(PLAN)
BASE = state_from_arrays(PLAN, initial_arrays(PLAN))
D = sum(t.numel for t in SHARED)


@pytest.fixture(autouse=True)
def _identity():
    try:
        TaskIdentity.run_id  # noqa: B018
    except RuntimeError:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def flat_to_state(flat: np.ndarray) -> dict[int, np.ndarray]:
    out, pos = {}, 0
    for t in SHARED:
        out[t.id] = flat[pos:pos + t.numel].reshape(t.shape)
        pos += t.numel
    return out


def deltas(n: int, seed: int = 0, disjoint_topk: bool = False) -> list[tuple[bytes, np.ndarray, np.ndarray, int]]:
    """``n`` real delta payloads against BASE: dense random small deltas, or top-k on disjoint coordinate sets.
    Returns (payload, flat int values, flat mask, samples)."""
    rng = np.random.default_rng(seed)
    base_flat = np.concatenate([BASE[t.id].reshape(-1).astype(np.int64) for t in SHARED])
    out = []
    for i in range(n):
        d = rng.integers(-4, 5, D)
        if disjoint_topk:
            d = np.zeros(D, np.int64)
            # device i alone moves coordinates i, i + 4n, ...: sparse enough that the writer picks top-k
            d[i::4 * n] = np.where(base_flat[i::4 * n] > 0, -3, 3)
        new = np.clip(base_flat + d, np.iinfo(np.int32).min, np.iinfo(np.int32).max)
        for t_start, t in zip(np.cumsum([0] + [t.numel for t in SHARED])[:-1], SHARED):
            if BASE[t.id].dtype == np.int8:
                new[t_start:t_start + t.numel] = np.clip(new[t_start:t_start + t.numel], -127, 127)
        k = int(np.count_nonzero(new - base_flat)) if disjoint_topk else None
        blob = encode_delta(PLAN, BASE, flat_to_state(new), device_id=f"d{i}", round_id=1, base_hash=b"\0" * 32,
                            counter=1, sample_count=10 + 5 * i, top_k=k, plan_hash=plan_hash(PLAN)).to_bytes()
        dec = CODEC.decode_delta(blob, hashlib.sha256(blob).hexdigest())
        vals = np.concatenate([dec.values[t.id].reshape(-1) for t in SHARED])
        mask = np.concatenate([dec.masks[t.id].reshape(-1) for t in SHARED])
        out.append((blob, vals, mask, 10 + 5 * i))
    return out


def replies(ds, raw_only: bool = False) -> list[Message]:
    out = []
    for i, (blob, vals, mask, n) in enumerate(ds):
        content = reply_content(PLAN, BASE, flat_to_state(vals), flat_to_state(mask), n, f"d{i}", 1, blob)
        if raw_only:  # what a bridge ClientApp would forward: the delta bytes and the weight, no arrays
            content = RecordDict({"metrics": content.metric_records["metrics"], META: content.config_records[META]})
        parent = Message(RecordDict(), 1000 + i, MessageType.TRAIN)
        out.append(Message(content, reply_to=parent))
    return out


def ours(kind: str, ds, **kw) -> dict[int, np.ndarray]:
    """fleet.aggregate on the same deltas, applied to BASE (the native coordinator's commit)."""
    values = np.stack([v for _, v, _, _ in ds])
    masks = np.stack([m for _, _, m, _ in ds])
    weights = np.array([n for *_, n in ds], np.int64)
    delta = agg.to_int_delta(agg.aggregate(kind, values, masks, weights, **kw))
    base_flat = {t.id: BASE[t.id] for t in SHARED}
    out, pos = {}, 0
    for t in SHARED:
        out[t.id] = agg.apply_int_delta(base_flat[t.id], delta[pos:pos + t.numel])
        pos += t.numel
    return out


def assert_same_but_ties(got, ds):
    """Equal to our exact sparse FedAvg, except by one unit where the exact mean is a .5 tie: Flower sums
    ``value * (w / total)`` in floats, which can land one ulp below the tie and round down."""
    want = ours("fedavg", ds)
    values = np.stack([v for _, v, _, _ in ds])
    masks = np.stack([m for _, _, m, _ in ds])
    mean = agg.fedavg(values, masks, np.array([n for *_, n in ds], np.int64)).value
    pos = 0
    for t in SHARED:
        diff = got[t.id].astype(np.int64).reshape(-1) - want[t.id].astype(np.int64).reshape(-1)
        tie = np.isclose(mean[pos:pos + t.numel] % 1.0, 0.5, atol=1e-9)
        assert np.abs(diff).max() <= 1 and not diff[~tie].any(), t.name
        pos += t.numel


def run(strategy, msgs) -> dict[int, np.ndarray]:
    wrapped = SparseDeltaStrategy(strategy, PLAN)
    arrays, _metrics = wrapped.aggregate_train(1, msgs)
    assert arrays is not None
    return state_from_arrays(PLAN, arrays)


def test_stock_fedavg_through_the_wrapper_equals_our_sparse_fedavg_up_to_ties():
    ds = deltas(5)
    got = run(FedAvg(), replies(ds))
    for t in SHARED:
        assert got[t.id].dtype == BASE[t.id].dtype
    assert_same_but_ties(got, ds)


def test_the_wrapper_decodes_replies_that_carry_only_the_raw_delta():
    ds = deltas(4, seed=3)
    assert_same_but_ties(run(FedAvg(), replies(ds, raw_only=True)), ds)


@pytest.mark.parametrize("make", [lambda: FedProx(proximal_mu=0.0), lambda: Krum(num_malicious_nodes=1),
                                  lambda: DifferentialPrivacyServerSideFixedClipping(
                                      FedAvg(), noise_multiplier=0.1, clipping_norm=50.0, num_sampled_clients=5)])
def test_other_stock_strategies_aggregate_and_come_back_as_valid_int_models(make):
    ds = deltas(5, seed=1)
    strategy = make()
    wrapped = SparseDeltaStrategy(strategy, PLAN)
    if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping):
        # the DP wrapper remembers the arrays it sent (to clip each reply's update): configure first
        from flwr.serverapp import Grid  # noqa: F401
        strategy.current_arrays = arrays_from_state(PLAN, BASE)
    arrays, _ = wrapped.aggregate_train(1, replies(ds))
    state = state_from_arrays(PLAN, arrays)
    for t in SHARED:
        assert state[t.id].dtype == BASE[t.id].dtype and state[t.id].shape == BASE[t.id].shape
        if state[t.id].dtype == np.int8:
            assert np.abs(state[t.id].astype(int)).max() <= 127
    assert wrapped.state[SHARED[0].id] is not None


def test_silent_top_k_coordinates_vote_zero_so_one_sender_cannot_move_a_robust_aggregate():
    ds = deltas(5, disjoint_topk=True)  # each coordinate is sent by at most one device
    sent = [np.concatenate([m.reshape(-1) for m in delta_support(delta_from_bytes(b), PLAN).values()])
            for b, *_ in ds]
    assert np.any(sent, axis=0).sum() < 0.3 * D and all(m.sum() < 0.1 * D for m in sent)  # really top-k
    assert all(m.all() for _, _, m, _ in ds)  # ... and each votes on every coordinate of what it sent
    flower = run(FedTrimmedAvg(beta=0.2), replies(ds))
    changed_by_flower = sum(int(np.count_nonzero(flower[t.id] != BASE[t.id])) for t in SHARED)
    robust = ours("trimmed", ds, beta=0.2)
    median = ours("median", ds)
    changed = {k: sum(int(np.count_nonzero(r[t.id] != BASE[t.id])) for t in SHARED)
               for k, r in (("trimmed", robust), ("median", median))}
    # a top-k device still holds what it did not send (error feedback): its silence is a 0 vote, so a
    # coordinate only one of five devices sent is trimmed away, by Flower's aggregator and ours alike
    assert changed_by_flower == 0 and changed == {"trimmed": 0, "median": 0}
    mean = ours("fedavg", ds)
    assert sum(int(np.count_nonzero(mean[t.id] != BASE[t.id])) for t in SHARED) > 0  # the mean still moves


def test_rounding_back_to_int8_is_half_up_and_clamped():
    t8 = next(t for t in SHARED if BASE[t.id].dtype == np.int8)
    state = {t.id: BASE[t.id].astype(np.float64) for t in SHARED}
    x = np.zeros(t8.numel)
    x[:6] = [0.5, -0.5, 1.49, -1.5, 300.0, -300.0]
    state[t8.id] = x.reshape(t8.shape)
    arrays = ArrayRecord({t.name: __import__("flwr").app.Array(state[t.id]) for t in SHARED})
    back = state_from_arrays(PLAN, arrays)[t8.id].reshape(-1)
    assert back[:6].tolist() == [1, 0, 1, -1, 127, -127]
    state[t8.id] = np.full(t8.shape, np.nan)
    with pytest.raises(ValueError, match="NaN"):
        state_from_arrays(PLAN, ArrayRecord({t.name: __import__("flwr").app.Array(state[t.id]) for t in SHARED}))
    with pytest.raises(ValueError, match="names"):
        state_from_arrays(PLAN, ArrayRecord({"x": __import__("flwr").app.Array(np.zeros(3))}))


def test_configure_train_sends_integral_arrays():
    from fleet.flower import FleetGrid  # noqa: F401  (grid not needed: FedAvg samples through it)

    class OneNodeGrid:
        def get_node_ids(self):
            return [7, 8]

    wrapped = SparseDeltaStrategy(FedAvg(min_available_nodes=2, min_train_nodes=2), PLAN)
    a = initial_arrays(PLAN)
    msgs = list(wrapped.configure_train(1, a, ConfigRecord({"lr": 0.1}), OneNodeGrid()))
    assert len(msgs) == 2 and msgs[0].metadata.message_type == MessageType.TRAIN
    sent = msgs[0].content.array_records["arrays"]
    assert set(sent.keys()) == {t.name for t in SHARED}
