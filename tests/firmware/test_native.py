"""The native engine (the firmware's C runtime as a host library) is the reference engine, bit for bit."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from tests.conftest import ROOT, require_cmd


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    require_cmd("gcc", "make")
    build = tmp_path_factory.mktemp("native")
    r = subprocess.run(["make", "-s", "-C", str(ROOT / "firmware"), "-f", "boards/host/native.mk", f"BUILD={build}"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return build / "native" / "libtinyfleet_native.so"


def _plans():
    from fleet.compiler.planner import plan_arena
    from tests.fixtures import tiny

    def planned(p):
        plan_arena(p)
        return p

    import torch

    from fleet.compiler.compile import compile_plan
    from fleet.compiler.models import ImuCNN
    from fleet.compiler.scheme import named_scheme
    from fleet.compiler.torch_import import import_torch

    torch.manual_seed(0)
    g = import_torch(ImuCNN().eval(), torch.randn(64, 6, 128), name="ImuCNN")
    imu, _ = compile_plan(g, named_scheme(g, "ImuCNN:tail"), serialize=False)
    rng = np.random.default_rng(0)
    xi, yi = rng.integers(-128, 128, (24, *imu.tensors[imu.input_id].shape)).astype(np.int8), rng.integers(0, 7, 24)
    x, y = tiny.tiny_dataset(40, seed=3)
    xt, yt = tiny.tiny_text_dataset(40, seed=2)
    return {"tiny": (planned(tiny.tiny_plan(seed=1)), x, y, 0.1),
            "text": (planned(tiny.tiny_text_plan(seed=1)), xt, yt, 0.2), "imu": (imu, xi, yi, 0.05)}


@pytest.mark.parametrize("name", ["tiny", "text", "imu"])
def test_every_step_matches_the_reference(library, name):
    from device_agent.engine.trainer import Trainer
    from device_agent.native import NativeTrainer

    plan, x, y, lr = _plans()[name]
    ref, nat = Trainer(plan), NativeTrainer(plan, library)

    hashes, correct = [], []
    for i in range(len(y)):
        a, b = ref.train_step(x[i:i + 1], y[i:i + 1], lr), nat.train_step(x[i:i + 1], y[i:i + 1], lr)
        hashes.append((ref.state_hash(), nat.state_hash()))
        correct.append((a.correct, b.correct))

    assert all(h1 == h2 for h1, h2 in hashes)
    assert len({h for h, _ in hashes}) > len(y) // 2  # the state really moves
    assert all(c1 == c2 for c1, c2 in correct)
    assert nat.step == ref.step == len(y)
    assert abs(a.loss - b.loss) < 0.01  # the runtime's Q15 probability vs the reference's float loss


def test_many_steps_in_one_call_and_state_io(library):
    from device_agent.engine.trainer import Trainer
    from device_agent.native import NativeTrainer

    plan, x, y, lr = _plans()["tiny"]
    ref, nat = Trainer(plan), NativeTrainer(plan, library)
    start = {tid: (v // 2).astype(v.dtype) for tid, v in ref.trainable_state().items()}
    ref.load_trainable(start)
    nat.load_trainable(start)
    ref.step = nat.step = 1000  # seeds the stochastic rounding: both must use it

    for i in range(len(y)):
        ref.train_step(x[i:i + 1], y[i:i + 1], lr)
    stats = nat.steps(x, y, lr)

    assert nat.state_hash() == ref.state_hash() and nat.step == ref.step == 1000 + len(y)
    assert stats.n == len(y)
    assert np.array_equal(nat.predict(x), ref.predict(x))


@pytest.mark.parametrize("opts", [{"accum_steps": 4, "momentum": 0.9, "frac_bits": 16, "warmup": 2, "total": 12},
                                  {"accum_steps": 1, "frac_bits": 8, "warmup": 3, "total": 30}])
def test_a_plan_recipe_runs_in_c_bit_exact_with_its_optimizer_state(library, opts):
    from device_agent.engine.recipe import Recipe, optimizer_region, with_recipe
    from device_agent.engine.trainer import Trainer
    from device_agent.native import NativeTrainer
    from tests.fixtures import tiny

    plan = with_recipe(_plans()["tiny"][0], Recipe(**opts))
    x, y = tiny.tiny_dataset(30, seed=4)
    ref, nat = Trainer(plan), NativeTrainer(plan, library)

    for i in range(0, 30, 3):  # batches that cross accumulation boundaries
        ref.train_step(x[i:i + 3], y[i:i + 3], 0.05)
        nat.steps(x[i:i + 3], y[i:i + 3], 0.05)
        assert nat.state_hash() == ref.state_hash() and (nat.step, nat.pending) == (ref.step, ref.pending)
        assert nat.optimizer_region() == optimizer_region(plan, ref.opt_state)
    fresh = {tid: v.copy() for tid, v in ref.trainable_state().items()}
    ref.load_trainable(fresh)
    nat.load_trainable(fresh)  # a new model version: optimizer state and pending samples reset
    assert nat.optimizer_region() == optimizer_region(plan, ref.opt_state) and nat.pending == ref.pending == 0


def test_refuses_what_it_cannot_do(library):
    from device_agent.native import NativeError, NativeTrainer
    from tests.fixtures import tiny

    plan, x, y, lr = _plans()["tiny"]
    nat = NativeTrainer(plan, library)
    with pytest.raises(ValueError, match="batch 1"):
        nat.train_step(x[:2], y[:2], lr)
    with pytest.raises(ValueError, match="class indices"):
        nat.steps(x[:1], np.array([99]), lr)
    with pytest.raises(NativeError, match="no arena layout"):
        NativeTrainer(tiny.tiny_plan(), library)
    with pytest.raises(NativeError, match="not built"):
        NativeTrainer(plan, library.with_name("missing.so"))
