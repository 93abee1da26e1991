"""Memory planner and memory report: cases whose right answer can be checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.engine import ir
from fleet.compiler.compile import compile_full
from fleet.compiler.graph_builder import GraphBuilder
from fleet.compiler.memory import RUNTIME_ALLOWANCE_BYTES
from fleet.compiler.planner import Layout, check_layout, lower_bound, plan_memory, scratch_bytes


def test_disjoint_lifetimes_share_offset_zero():
    assert plan_memory([100, 100], [(0, 1), (2, 3)]) == ([0, 0], 100)


def test_overlapping_lifetimes_stack_largest_first():
    assert plan_memory([60, 100], [(0, 2), (1, 3)]) == ([100, 0], 160)


def test_offsets_are_4_byte_aligned():
    offsets, arena = plan_memory([5, 5, 3], [(0, 0), (0, 0), (0, 0)])
    assert offsets == [0, 8, 16] and arena == 19


def test_a_gap_is_reused_when_it_fits():
    # 0 and 2 live at op 1 and 3 respectively; 1 (ops 0-3) stacks on both; 3 (op 2) fits in 0's slot
    offsets, arena = plan_memory([40, 40, 40, 40], [(0, 1), (0, 3), (3, 3), (2, 2)])
    assert arena == 80 and offsets[3] in (0, 40) and offsets[3] != offsets[1]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="first <= last"):
        plan_memory([4], [(3, 1)])
    with pytest.raises(ValueError, match="2 sizes but 1 lifetimes"):
        plan_memory([4, 4], [(0, 1)])


def test_lower_bound_is_the_busiest_op():
    assert lower_bound([10, 20, 30], [(0, 1), (1, 2), (3, 3)]) == 30


def test_checker_catches_an_overlap():
    plan = ir.Plan([ir.Tensor(0, "a", (8,), ir.DType.INT8, ir.Kind.ACTIVATION, offset=0),
                    ir.Tensor(1, "b", (8,), ir.DType.INT8, ir.Kind.ACTIVATION, offset=4)], [], 0, 1, 1,
                   arena_bytes=12)
    bad = Layout([[0], [1]], [8, 8], [(0, 1), (1, 2)], [0, 4], 12)
    with pytest.raises(AssertionError, match="overlaps"):
        check_layout(plan, bad)


def tiny_graph() -> ir.Graph:
    """input (2,4,4) -> 1x1 conv to 3 channels -> global pool -> 1x1 classifier to 2 logits."""
    b = GraphBuilder("tiny")
    x = b.add_input("input", (2, 4, 4), 0.05, 0)
    a = b.add_conv("conv0", x, np.ones((3, 2, 1, 1), np.int8), np.full(3, 0.01, np.float32), np.zeros(3, np.int32),
                   0.02, -128, (1, 1), (0, 0), 1)
    p = b.add_avgpool("pool", a, 0.02, -128)
    y = b.add_conv("classifier", p, np.ones((2, 3, 1, 1), np.int8), np.full(2, 0.01, np.float32),
                   np.zeros(2, np.int32), 0.1, 0, (1, 1), (0, 0), 1)
    return b.finish(y)


def test_memory_report_by_hand():
    c = compile_full(tiny_graph(), ir.SparseScheme("last"))
    assert [op.type.name for op in c.plan.ops] == ["CONV2D", "AVGPOOL", "CONV2D", "SOFTMAX_CE", "APPLY_MASK",
                                                   "CONV2D_UPDATE"]
    # live at op 0: input 2*4*4 = 32 B, conv0 out 3*4*4 = 48 B, label 4 B -> 84 B, the busiest op
    # (op 3: label 4 + pooled 3 + logits 2 + mask 1 + logits grad 2 + softmax scratch 2*4 = 20 B)
    r = c.report
    assert r.live_peak_bytes == 84 and r.arena_bytes == 84 and r.peak_op == "conv0"
    assert r.trainable_bytes == 2 * 3 + 2 * 4  # int8 weights (2,3,1,1) + int32 biases (2,)
    assert r.peak_sram_bytes == 84 + 14 + RUNTIME_ALLOWANCE_BYTES
    assert r.num_ops == 6
    sizes = {t.name: t.nbytes for t in c.plan.tensors if t.name.endswith(".scratch")}
    assert sorted(sizes.values()) == [8, 12]  # SOFTMAX_CE: 2 int32; update: 3 inputs x 1x1 int32 sums
    check_layout(c.plan, c.layout)


def test_pwdw_scratch_is_one_channel():
    op = ir.Op(ir.OpType.PWDW, [0, 1, 2, 3, 4], [5])
    tensors = [ir.Tensor(0, "x", (8, 64, 64), ir.DType.INT8, ir.Kind.ACTIVATION)]
    assert scratch_bytes(op, tensors) == 64 * 64


def test_reshape_aliases_its_input():
    import torch

    from fleet.compiler.models import TinyCNN
    from fleet.compiler.torch_import import import_torch

    torch.manual_seed(0)
    g = import_torch(TinyCNN().eval(), torch.randn(32, 1, 28, 28))
    c = compile_full(g, ir.SparseScheme("s", 2, {5: 0.5}))
    check_layout(c.plan, c.layout)
    assert c.report.arena_bytes >= c.report.live_peak_bytes
    for op in c.plan.ops:
        if op.type in (ir.OpType.RESHAPE, ir.OpType.RESHAPE_BWD):
            assert c.plan.tensors[op.inputs[0]].offset == c.plan.tensors[op.outputs[0]].offset
    assert all(t.offset >= 0 for t in c.plan.tensors if t.kind in (ir.Kind.ACTIVATION, ir.Kind.GRADIENT))
