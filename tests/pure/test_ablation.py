"""ablation: no-QAS factors, the float twin, the frozen-prefix split, the torch scheme mask."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.ablation import (
    engine_ready,
    graph_to_torch,
    n_convs_before,
    noqas_factors,
    shift_scheme,
    split_graph,
    torch_scheme_params,
    without_qas,
)
from device_agent.engine import ir
from device_agent.engine.forward import forward_activations, run_forward
from device_agent.engine.trainer import Trainer
from tests.fixtures.tiny import tiny_dataset, tiny_plan

torch = pytest.importorskip("torch")


def _val(m, e) -> np.ndarray:
    return np.asarray(m, np.float64) * 2.0 ** np.asarray(e, np.float64)


def _imu_graph():
    from fleet.compiler.models import ImuCNN
    from fleet.compiler.torch_import import import_torch

    torch.manual_seed(0)
    return import_torch(ImuCNN().eval(), torch.randn(64, 6, 128), name="ImuCNN")


def test_noqas_factors_are_sx_times_sw():
    # Prepare
    s_x, s_w = 0.02, np.array([0.01, 0.003], np.float32)
    # Execute
    f = noqas_factors(s_x, s_w)
    # Assert: weight and bias factors both s_x * s_w (gradient w.r.t. the integer parameter)
    want = np.float32(s_x) * s_w.astype(np.float64)
    assert np.allclose(_val(f["qas_w_m"], f["qas_w_e"]), want, rtol=1e-4)
    assert np.allclose(_val(f["qas_b_m"], f["qas_b_e"]), want, rtol=1e-4)


def test_without_qas_changes_only_update_factors():
    # Prepare
    plan = tiny_plan(seed=1)
    # Execute
    nq = without_qas(plan)
    # Assert
    assert len(nq.ops) == len(plan.ops) and [t.id for t in nq.tensors] == [t.id for t in plan.tensors]
    n_upd = 0
    for a, b in zip(plan.ops, nq.ops):
        if a.type != ir.OpType.CONV2D_UPDATE:
            assert a.type == b.type and a.attrs.keys() == b.attrs.keys()
            continue
        n_upd += 1
        w = plan.tensors[a.inputs[2]]
        fwd = next(op for op in plan.ops if op.type == ir.OpType.CONV2D and op.inputs[1] == w.id)
        s_x = float(plan.tensors[fwd.inputs[0]].scale[0])
        # with QAS: s_x / s_w and 1 / (s_x s_w); without: s_x s_w for both. Ratio = s_w^2 and (s_x s_w)^2.
        r_w = _val(b.attrs["qas_w_m"], b.attrs["qas_w_e"]) / _val(a.attrs["qas_w_m"], a.attrs["qas_w_e"])
        r_b = _val(b.attrs["qas_b_m"], b.attrs["qas_b_e"]) / _val(a.attrs["qas_b_m"], a.attrs["qas_b_e"])
        sw = w.scale.astype(np.float64)
        assert np.allclose(r_w, sw ** 2, rtol=1e-3)
        assert np.allclose(r_b, (s_x * sw) ** 2, rtol=1e-3)
        assert a.attrs["k"] == b.attrs["k"]
    assert n_upd == 3
    assert nq.name.endswith("+noqas") and plan.name != nq.name  # the input plan is untouched


def test_without_qas_learns_slower_than_qas_on_tiny_task():
    # Prepare: same plan, data, steps and learning rate
    x, y = tiny_dataset(256, seed=3)
    xt, yt = tiny_dataset(256, seed=4)
    plan = tiny_plan(seed=0)
    accs = {}
    for name, p in (("qas", plan), ("noqas", without_qas(plan))):
        tr = Trainer(p)
        # Execute
        for i in range(0, 256, 16):
            tr.train_step(x[i:i + 16], y[i:i + 16], 0.05)
        accs[name] = (tr.evaluate(xt, yt), tr.state_hash())
    # Assert: QAS learns; the integer-gradient update barely moves the weights at the same rate
    assert accs["qas"][0] > accs["noqas"][0]
    assert accs["qas"][1] != accs["noqas"][1]


def test_float_twin_matches_int8_logits():
    # Prepare
    g = _imu_graph()
    x = np.random.default_rng(0).integers(-60, 60, (4, 6, 1, 128)).astype(np.int8)
    t_in, t_out = g.tensors[g.input_id], g.tensors[g.output_id]
    # Execute
    q = run_forward(g, x).reshape(4, -1).astype(np.float64)
    f = graph_to_torch(g)(torch.from_numpy(float(t_in.scale[0]) * (x.astype(np.float32) - t_in.zero_point)))
    # Assert: dequantized int8 logits within a few output LSBs of the float twin's
    qf = float(t_out.scale[0]) * (q - t_out.zero_point)
    assert np.abs(qf - f.detach().numpy()).max() < 6 * float(t_out.scale[0])


def test_split_graph_prefix_then_tail_is_bit_exact():
    # Prepare: cut at the input of the residual pair (conv2's output, read by dw2 and the add)
    g = _imu_graph()
    cut = next(op for op in g.ops if op.name.startswith("conv2")).outputs[0]
    x = np.random.default_rng(1).integers(-128, 128, (3, 6, 1, 128)).astype(np.int8)
    # Execute
    pre, tail = split_graph(g, cut)
    mid = forward_activations(pre, x)[cut]
    # Assert
    assert np.array_equal(run_forward(tail, mid), run_forward(g, x))
    assert n_convs_before(g, cut) == 4


def test_split_graph_refuses_a_cut_inside_a_skip():
    # Prepare: dw2's output lies between the residual's fork and its add
    g = _imu_graph()
    cut = next(op for op in g.ops if op.name.startswith("dw2")).outputs[0]
    # Execute / Assert
    with pytest.raises(ValueError, match="skip connection"):
        split_graph(g, cut)


def test_shift_scheme_and_refusal():
    s = ir.SparseScheme("s", n_bias_update=2, weight_ratio={5: 1.0})
    assert shift_scheme(s, 4, 2).weight_ratio == {1: 1.0}
    with pytest.raises(ValueError, match="before the cut"):
        shift_scheme(s, 6, 0)


def test_torch_scheme_params_masks_first_k_input_channels():
    # Prepare: conv 5 (pw2, 32 -> 32) at ratio 1/4, biases of the last 2 convs, classifier
    g = _imu_graph()
    scheme = ir.SparseScheme("q", n_bias_update=2, weight_ratio={5: 0.25})
    net = graph_to_torch(g)
    # Execute
    params, masks = torch_scheme_params(net, g, scheme)
    # Assert
    assert len(params) == 2 + 1 + 2  # two biases, one weight, classifier weight + bias
    assert sum(p.requires_grad for p in net.parameters()) == len(params)
    (mask,) = masks.values()
    assert mask.shape[:2] == (32, 32) and mask[:, :8].all() and not mask[:, 8:].any()
    assert math.ceil(0.25 * 32) == 8


def test_engine_ready_marks_bias_only_weights_trainable():
    from fleet.compiler.training import build_training_plan

    g = _imu_graph()
    plan = build_training_plan(g, ir.SparseScheme("b", n_bias_update=3))
    ready = engine_ready(plan)
    x = np.zeros((1, 6, 1, 128), np.int8)
    Trainer(ready).train_step(x, np.zeros(1, np.int32), 0.01)  # does not raise
    assert len(ready.trainable) >= len(plan.trainable)
