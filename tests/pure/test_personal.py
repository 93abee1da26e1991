"""Personalization on devices: the integer Ditto rule, which tensors each method keeps, memory costs and the
fallback, the personalizer's contract with the trainer, and a device that personalizes after each update."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.buffer import SampleBuffer
from device_agent.engine import ir
from device_agent.engine.personal import METHODS, Personalizer, PersonalSpec, ditto_pull, head_ids, method_ids
from device_agent.engine.trainer import Trainer
from fleet.compiler.personal import choose_method, method_cost
from tests.fixtures.tiny import tiny_dataset, tiny_plan


@pytest.fixture(scope="module")
def plan():
    return tiny_plan()


@pytest.fixture(scope="module")
def data():
    x, y = tiny_dataset(64, seed=3)
    return x, y.astype(np.int32)


def test_ditto_pull_by_hand():
    p, g = np.array([10, -10, 5, 127, -128], np.int8), np.array([0, 0, 5, -128, 127], np.int8)
    # 10 * 0.25 = 2.5 -> 3 (half up); -10 * 0.25 = -2.5 -> -2 (half up = toward +inf); equal -> unchanged
    assert ditto_pull(p, g, 8192).tolist() == [7, -8, 5, 63, -64]
    assert np.array_equal(ditto_pull(p, g, 32768), g)  # full pull = the global values
    assert np.array_equal(ditto_pull(p, g, 0), p)
    b = np.array([1_000_000, -7], np.int32)
    assert ditto_pull(b, np.zeros(2, np.int32), 16384).tolist() == [500_000, -4]  # pull -3.5 -> -3
    with pytest.raises(ValueError, match="lam_q15"):
        ditto_pull(p, g, 40000)
    with pytest.raises(ValueError, match="differ"):
        ditto_pull(p, g.astype(np.int32), 10)


def test_method_tensors_and_costs(plan):
    trainable = {t.id: t for t in plan.trainable}
    head = head_ids(plan)
    assert method_ids(plan, "finetune") == method_ids(plan, "ditto") == sorted(trainable)
    assert method_ids(plan, "head") == head and len(head) == 2
    (b,) = method_ids(plan, "bias")
    assert trainable[b].dtype == ir.DType.INT32 and b in head
    with pytest.raises(ValueError, match="one of"):
        method_ids(plan, "fedavg")
    sparse = sum(-(-t.nbytes // 4) * 4 for t in plan.trainable)  # each copy 4-aligned, as the board lays it out
    costs = {m: method_cost(plan, m) for m in METHODS}
    assert costs["ditto"].sram_bytes == costs["finetune"].sram_bytes == sparse  # ditto's reference: the stored update
    assert costs["finetune"].sram_bytes > costs["head"].sram_bytes > costs["bias"].sram_bytes == trainable[b].nbytes
    assert all(c.flash_bytes == 0 for c in costs.values())  # the copy lives in SRAM


def test_fallback_takes_the_next_method_that_fits(plan):
    c = {m: method_cost(plan, m).sram_bytes for m in METHODS}
    base = 10_000
    assert choose_method(plan, "ditto", base, base + c["ditto"]) == "ditto"
    assert choose_method(plan, "ditto", base, base + c["ditto"] - 1) == "head"  # finetune costs what ditto does
    assert choose_method(plan, "ditto", base, base + c["head"]) == "head"
    assert choose_method(plan, "finetune", base, base + c["bias"]) == "bias"
    assert choose_method(plan, "head", base, base + c["bias"] - 1) == "none"
    assert choose_method(plan, "head", base, 10**9) == "head"  # never upgrades past what was asked


def _personalize(plan, data, method, steps=12, lam=3277, lr=0.2):
    x, y = data
    t = Trainer(plan)
    ref = t.trainable_state()
    pz = Personalizer(plan, PersonalSpec(method, steps, lr, lam))
    rng = np.random.default_rng(0)
    pz.update(t, ref, lambda _k: (x[rng.integers(0, len(y), 4)], y[rng.integers(0, len(y), 4)]))
    return t, ref, pz


def test_each_method_trains_its_own_set_and_hands_the_trainer_back(plan, data):
    states = {}
    for m in METHODS:
        t, ref, pz = _personalize(plan, data, m)
        assert t.state_hash() == Trainer(plan).state_hash()  # the trainer holds the reference again
        assert sorted(pz.state) == method_ids(plan, m)
        changed = [i for i in pz.state if not np.array_equal(pz.state[i], ref[i])]
        assert changed, m  # it learned something
        model = pz.model(ref)
        assert all(np.array_equal(model[i], ref[i]) for i in ref if i not in pz.state)
        states[m] = model
    hashes = {m: b"".join(np.ascontiguousarray(v).tobytes() for _, v in sorted(s.items()))
              for m, s in states.items()}
    assert len(set(hashes.values())) == len(METHODS)  # methods differ


def test_ditto_full_pull_stays_global_and_finetune_restarts(plan, data):
    _, ref, pz = _personalize(plan, data, "ditto", lam=32768)
    assert all(np.array_equal(pz.state[i], ref[i]) for i in pz.state)
    x, y = data
    t, ref, ft = _personalize(plan, data, "finetune")
    first = {i: v.copy() for i, v in ft.state.items()}
    ft.update(t, ref, lambda _k: (x[:4], y[:4]))  # restarts from ref: the same as a first update
    ft2 = Personalizer(plan, PersonalSpec("finetune", 12, 0.2))
    ft2.steps_done = ft.steps_done - 12  # NOTE: the counter seeds stochastic rounding; only the start may differ
    ft2.update(Trainer(plan), ref, lambda _k: (x[:4], y[:4]))
    assert all(np.array_equal(ft.state[i], ft2.state[i]) for i in ft.state)
    assert any(not np.array_equal(first[i], ft.state[i]) for i in first)


def test_a_device_personalizes_after_each_update_and_sends_only_shared_deltas(plan):
    from device_agent import protocol as dp
    from tests.pure.test_workers import N, run_fleet, samples

    def make(i, did, verifier):
        x, y = samples(i)
        buf = SampleBuffer(len(y), x.shape[1:], np.int8, seed=100 + i)
        buf.add(x, y)
        pz = Personalizer(plan, PersonalSpec("ditto", 6, 0.2, 3277))
        return dp.DeviceProtocol(dp.Identity(did, "stm32f746", 320_000, 1_000_000), plan, Trainer(plan),
                                 dp.WireDeviceCodec(plan, verifier), buf, seed=i, personalizer=pz)

    def plain(i, did, verifier):
        x, y = samples(i)
        buf = SampleBuffer(len(y), x.shape[1:], np.int8, seed=100 + i)
        buf.add(x, y)
        return dp.DeviceProtocol(dp.Identity(did, "stm32f746", 320_000, 1_000_000), plan, Trainer(plan),
                                 dp.WireDeviceCodec(plan, verifier), buf, seed=i)

    state_p, deltas_p, devs = run_fleet(plan, make)
    state_0, deltas_0, _ = run_fleet(plan, plain)
    # the shared deltas are computed against the global model: personalization changes none of them
    assert deltas_p == deltas_0 and all(np.array_equal(state_p[k], state_0[k]) for k in state_p)
    for d in devs:
        assert d.personalizer.updates == d.version >= 3  # one per model version received (v1, v2, v3)
        held, own = d.trainer.trainable_state(), d.personal_model()
        assert any(not np.array_equal(held[i], own[i]) for i in held)
    assert len(devs) == N
