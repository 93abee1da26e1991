"""Training-graph builder on a tiny torch CNN (stem, inverted residual, strided stage, pool, linear)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_agent.engine import ir
from fleet.compiler.models import TinyCNN
from fleet.compiler.torch_import import import_torch
from fleet.compiler.training import SchemeError, build_training_plan, channels_saved

# TinyCNN backbone convs: 0 stem, 1 expand, 2 depthwise, 3 project (+ residual add), 4 down_dw, 5 down_pw


@pytest.fixture(scope="module")
def graph() -> ir.Graph:
    torch.manual_seed(0)
    return import_torch(TinyCNN().eval(), torch.randn(64, 1, 28, 28))


def producers(plan: ir.Plan) -> dict[int, int]:
    out: dict[int, int] = {}
    for i, op in enumerate(plan.ops):
        for t in op.outputs:
            out.setdefault(t, i)
    return out


def check_invariants(plan: ir.Plan) -> None:
    """Every read produced earlier (or given); no dead op; each update right after its gradient, which then dies."""
    given = {plan.input_id, plan.label_id} | {t.id for t in plan.tensors
                                               if t.kind in (ir.Kind.CONST, ir.Kind.TRAINABLE)}
    made = set(given)
    for i, op in enumerate(plan.ops):
        for t in op.inputs:
            assert t == -1 or t in made, f"op {i} {op.name} reads tensor {t} before it exists"
        made.update(op.outputs)
    reads = {t for op in plan.ops for t in op.inputs} | {plan.logits_id}
    for op in plan.ops:
        if op.type != ir.OpType.CONV2D_UPDATE:
            assert any(t in reads for t in op.outputs), f"dead op {op.name}"
    for i, op in enumerate(plan.ops):
        if op.type != ir.OpType.CONV2D_UPDATE:
            continue
        g = op.inputs[0]
        last_write = max(j for j, o in enumerate(plan.ops[:i]) if g in o.outputs)
        between = plan.ops[last_write + 1:i]
        assert all(o.type == ir.OpType.CONV2D_BWD_INPUT and o.inputs[0] == g for o in between), \
            f"{op.name} is not right after its gradient: {[o.name for o in between]}"
        assert not any(g in o.inputs for o in plan.ops[i + 1:]), f"gradient of {op.name} read after the update"


def test_classifier_only_has_no_backbone_backward_and_fuses_frozen_expansion(graph):
    plan = build_training_plan(graph, ir.SparseScheme("last"))
    check_invariants(plan)
    types = [op.type for op in plan.ops]
    assert ir.OpType.CONV2D_BWD_INPUT not in types
    assert types.count(ir.OpType.CONV2D_UPDATE) == 1
    assert ir.OpType.PWDW in types and not any(op.name.startswith("expand") and op.type == ir.OpType.CONV2D
                                                 for op in plan.ops)
    assert ir.OpType.SAVE_CHANNELS not in types


def test_backward_stops_at_earliest_updated_layer(graph):
    plan = build_training_plan(graph, ir.SparseScheme("s", n_bias_update=3, weight_ratio={3: 1.0}))
    check_invariants(plan)
    bwd = [op.name for op in plan.ops if op.type == ir.OpType.CONV2D_BWD_INPUT]
    upd = [op.name for op in plan.ops if op.type == ir.OpType.CONV2D_UPDATE]
    assert upd == ["classifier.update", "down_pw.0.update", "down_dw.0.update", "project.0.update"]
    assert bwd == ["classifier.bwd", "down_pw.0.bwd", "down_dw.0.bwd"]  # none for project: nothing earlier trains
    assert not any(op.type == ir.OpType.GRAD_ACCUM for op in plan.ops)  # the skip branch is frozen
    kinds = {t.name: t.kind for t in plan.tensors}
    assert kinds["project.0.weight"] == ir.Kind.TRAINABLE and kinds["down_pw.0.weight"] == ir.Kind.CONST
    assert kinds["down_pw.0.bias"] == ir.Kind.TRAINABLE and kinds["depthwise.0.bias"] == ir.Kind.CONST


def test_residual_gradients_are_accumulated_once(graph):
    plan = build_training_plan(graph, ir.SparseScheme("all-bias", n_bias_update=6))
    check_invariants(plan)
    acc = [op for op in plan.ops if op.type == ir.OpType.GRAD_ACCUM]
    assert len(acc) == 1
    stem_out = next(op.outputs[0] for op in plan.ops if op.name == "stem.0")
    assert plan.tensors[acc[0].outputs[0]].shape == plan.tensors[stem_out].shape
    assert ir.OpType.PWDW not in [op.type for op in plan.ops]  # expansion is on the backward path now


def test_bias_only_scheme_saves_nothing(graph):
    plan = build_training_plan(graph, ir.SparseScheme("bias", n_bias_update=6, classifier_weight=False))
    check_invariants(plan)
    assert channels_saved(plan) == {}
    for op in plan.ops:
        if op.type == ir.OpType.CONV2D_UPDATE:
            assert op.inputs[1] == -1 and op.attrs["update_weight"] == 0 and op.attrs["k"] == 0
    assert all(t.kind == ir.Kind.CONST for t in plan.tensors if t.name.endswith(".weight"))


def test_quarter_ratio_saves_a_quarter_of_input_channels(graph):
    plan = build_training_plan(graph, ir.SparseScheme("q", n_bias_update=1, weight_ratio={5: 0.25}))
    check_invariants(plan)
    assert channels_saved(plan) == {"down_pw.0.save": 4}  # C_in = 16
    save = next(op for op in plan.ops if op.type == ir.OpType.SAVE_CHANNELS)
    x = plan.tensors[save.inputs[0]]
    assert plan.tensors[save.outputs[0]].shape == (4, *x.shape[1:])
    upd = next(op for op in plan.ops if op.name == "down_pw.0.update")
    assert upd.inputs[1] == save.outputs[0] and upd.attrs["k"] == 4


def test_full_ratio_keeps_the_input_instead_of_a_copy(graph):
    plan = build_training_plan(graph, ir.SparseScheme("f", n_bias_update=1, weight_ratio={5: 1.0}))
    conv = next(op for op in plan.ops if op.name == "down_pw.0")
    upd = next(op for op in plan.ops if op.name == "down_pw.0.update")
    assert upd.inputs[1] == conv.inputs[0] and channels_saved(plan) == {}


def test_qas_attrs_follow_the_scales(graph):
    from device_agent.engine.qmath import mant_exp

    plan = build_training_plan(graph, ir.SparseScheme("f", n_bias_update=1, weight_ratio={5: 1.0}))
    upd = next(op for op in plan.ops if op.name == "down_pw.0.update")
    s_x = float(plan.tensors[upd.inputs[1]].scale[0])
    s_w = plan.tensors[upd.inputs[2]].scale
    assert (int(upd.attrs["qas_w_m"][3]), int(upd.attrs["qas_w_e"][3])) == mant_exp(s_x / float(s_w[3]))
    assert (int(upd.attrs["qas_b_m"][0]), int(upd.attrs["qas_b_e"][0])) == mant_exp(1 / (s_x * float(s_w[0])))


def test_plan_trains_with_the_engine(graph):
    from device_agent.engine.trainer import Trainer

    plan = build_training_plan(graph, ir.SparseScheme("t", n_bias_update=2, weight_ratio={4: 1.0, 5: 0.25}))
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(4, 1, 28, 28)).astype(np.int8)
    stats = Trainer(plan).train_step(x, np.array([0, 1, 2, 3]), lr=0.01)
    assert np.isfinite(stats.loss) and stats.n == 4


def test_bad_scheme_is_refused_with_the_range(graph):
    with pytest.raises(SchemeError, match=r"conv indices \[9\] out of range \[0, 5\]"):
        build_training_plan(graph, ir.SparseScheme("bad", 1, {9: 1.0}))
    with pytest.raises(SchemeError, match="ratio 0.3"):
        build_training_plan(graph, ir.SparseScheme("bad", 1, {5: 0.3}))


def test_range_ste_drops_masks_of_linear_clamps_only(graph):
    # Prepare: full scheme, so every op output needs a gradient
    n = sum(1 for op in graph.ops if op.type == ir.OpType.CONV2D) - 1
    full = ir.SparseScheme("full", n, {i: 1.0 for i in range(n)})
    # Execute
    exact, ste = build_training_plan(graph, full), build_training_plan(graph, full, range_ste=True)
    # Assert: masks remain exactly on the ReLU ops (act_min at the output zero point); the project conv, the
    # residual add and the logits lose theirs; the rest of the plan is the same ops
    def masked(plan):
        return {plan.tensors[op.inputs[1]].name.removesuffix(".mask") for op in plan.ops
                if op.type == ir.OpType.APPLY_MASK}

    relu = {graph.tensors[op.outputs[0]].name for op in graph.ops if op.type in (ir.OpType.CONV2D, ir.OpType.ADD)
            and int(op.attrs["act_min"]) >= graph.tensors[op.outputs[0]].zero_point}
    assert masked(ste) == masked(exact) & relu
    assert len(masked(exact) - masked(ste)) >= 3  # project, add, logits
    assert len(ste.ops) == len(exact.ops) - len(masked(exact) - masked(ste))
    # and it still plans and runs (a gradient without a mask may have two readers, e.g. a residual's branches)
    from device_agent.engine import Trainer
    from fleet.compiler.planner import check_layout, plan_arena

    check_layout(ste, plan_arena(ste))
    x = np.random.default_rng(0).integers(-128, 128, (2, *graph.tensors[graph.input_id].shape)).astype(np.int8)
    assert np.isfinite(Trainer(ste).train_step(x, np.array([0, 1]), 0.01).loss)
