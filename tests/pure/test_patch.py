"""PATCH op: tiled execution equals the whole-tensor layers (and so the unpatched ops), hand-checkable regions and
scratch, the compiler's choice, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_agent.engine import ir, run_forward
from device_agent.engine import patch as P
from device_agent.engine.qmath import quantize_multiplier
from device_agent.wire.envelope import Verifier
from device_agent.wire.plan import plan_from_bytes, plan_to_bytes
from fleet.compiler.compile import compile_full
from fleet.compiler.planner import plan_memory
from tests.conftest import MODELS

pytestmark = pytest.mark.pure


def make_patch(x_shape, specs, tiles, seed=0, offsets=None):
    """A PATCH op over random int8 weights. specs: ("conv", c_out, k, stride, pad, groups, fused) or
    ("add", in_a, in_b); conv layers read the previous layer. Returns (op, tensors by id, consts)."""
    rng = np.random.default_rng(seed)
    tensors = {0: ir.Tensor(0, "x", tuple(x_shape), ir.DType.INT8, ir.Kind.ACTIVATION, zero_point=-3)}
    cols = {k: [] for k in P.LAYER_ATTRS}
    consts, ins, mult, shift = [], [0], [], []
    shapes = [tuple(x_shape)]
    for i, s in enumerate(specs):
        row = {"in_b": -1, "stride_h": 1, "stride_w": 1, "pad_h": 0, "pad_w": 0, "groups": 0, "add_mult_a": 0,
               "add_mult_b": 0, "add_shift": 0, "fused": 0, "buf_off": -1, "act_min": -128, "act_max": 127,
               "zero_point": int(rng.integers(-20, 20))}
        if s[0] == "conv":
            _, co, k, st, pad, g, fused = s
            c, h, w = shapes[i]
            wt = rng.integers(-127, 128, (co, c // g, k, k)).astype(np.int8)
            b = rng.integers(-2000, 2000, co).astype(np.int32)
            for arr in (wt, b):
                tid = len(tensors)
                tensors[tid] = ir.Tensor(tid, f"c{tid}", arr.shape, ir.DType.INT8 if arr.dtype == np.int8
                                         else ir.DType.INT32, ir.Kind.CONST, data=arr)
                ins.append(tid)
                consts.append(arr)
            pairs = [quantize_multiplier(float(v)) for v in rng.uniform(0.002, 0.02, co)]
            mult += [m for m, _ in pairs]
            shift += [sh for _, sh in pairs]
            row.update(kind=P.KIND_CONV, in_a=i, stride_h=st, stride_w=st, pad_h=pad, pad_w=pad, groups=g, fused=fused,
                       act_min=int(rng.integers(-128, -60)))
            shapes.append((co, (h + 2 * pad - k) // st + 1, (w + 2 * pad - k) // st + 1))
        else:
            _, a, b = s
            row.update(kind=P.KIND_ADD, in_a=a, in_b=b, add_mult_a=1 << 28, add_mult_b=3 << 27, add_shift=29)
            shapes.append(shapes[a])
        for k in P.LAYER_ATTRS:
            cols[k].append(int(row[k]))
    yid = len(tensors)
    tensors[yid] = ir.Tensor(yid, "y", shapes[-1], ir.DType.INT8, ir.Kind.ACTIVATION, zero_point=cols["zero_point"][-1])
    attrs = {k: np.asarray(v, np.int32) for k, v in cols.items()}
    attrs.update(tiles_h=tiles[0], tiles_w=tiles[1], mult=np.asarray(mult, np.int32), shift=np.asarray(shift, np.int32))
    op = ir.Op(ir.OpType.PATCH, ins, [yid], attrs, "patch")
    layers = P.layers_of(op, tensors)
    sizes = P.buffer_bytes(layers, *tiles)
    offs = offsets if offsets is not None else plan_memory(sizes, P.lifetimes(layers))[0]
    attrs["buf_off"] = np.asarray([o if s else -1 for o, s in zip(offs, sizes)], np.int32)
    return op, tensors, consts


STAGE = [  # stride-2 first conv fused into a depthwise conv, a fused 5x5 stride-2 block, a residual block
    ("conv", 6, 3, 2, 1, 1, 1), ("conv", 6, 3, 1, 1, 6, 0), ("conv", 4, 1, 1, 0, 1, 0),
    ("conv", 8, 1, 1, 0, 1, 1), ("conv", 8, 5, 2, 2, 8, 0), ("conv", 4, 1, 1, 0, 1, 0),
    ("conv", 8, 1, 1, 0, 1, 1), ("conv", 8, 3, 1, 1, 8, 0), ("conv", 4, 1, 1, 0, 1, 0), ("add", 6, 9),
]


@pytest.mark.parametrize("tiles", [(1, 1), (2, 3), (3, 2), (4, 5), (6, 5)])
def test_tiled_equals_whole_on_odd_shapes(tiles):
    # Prepare: 3x23x19 input (uneven tiles everywhere)
    op, tensors, consts = make_patch((3, 23, 19), STAGE, tiles)
    x = np.random.default_rng(1).integers(-128, 128, (2, 3, 23, 19)).astype(np.int8)
    # Execute
    whole = P.patch_forward(op, tensors, x, consts)
    tiled = P.patch_forward(op, tensors, x, consts, tiled=True)
    # Assert
    assert whole.shape == (2, 4, 6, 5) and np.array_equal(whole, tiled)


def test_add_of_the_stage_input_tiled():
    specs = [("conv", 12, 1, 1, 0, 1, 1), ("conv", 12, 3, 1, 1, 12, 0), ("conv", 4, 1, 1, 0, 1, 0), ("add", 0, 3)]
    op, tensors, consts = make_patch((4, 9, 7), specs, (3, 2), seed=5)
    x = np.random.default_rng(2).integers(-128, 128, (1, 4, 9, 7)).astype(np.int8)
    assert np.array_equal(P.patch_forward(op, tensors, x, consts),
                          P.patch_forward(op, tensors, x, consts, tiled=True))


def test_overlapping_buffers_corrupt_the_tiled_result():
    # Prepare: every layer buffer at offset 0, though the residual branch's buffer lives across the block
    op, tensors, consts = make_patch((3, 23, 19), STAGE, (2, 2))
    bad, _, _ = make_patch((3, 23, 19), STAGE, (2, 2), offsets=[0] * len(STAGE))
    x = np.random.default_rng(1).integers(-128, 128, (1, 3, 23, 19)).astype(np.int8)
    # Execute / Assert
    assert not np.array_equal(P.patch_forward(bad, tensors, x, consts, tiled=True),
                              P.patch_forward(op, tensors, x, consts))


def test_regions_and_scratch_by_hand():
    # Prepare: two 3x3 stride-1 pad-1 convs, 1 -> 2 -> 1 channels, 8x8, 2x2 tiles
    op, tensors, _ = make_patch((1, 8, 8), [("conv", 2, 3, 1, 1, 1, 0), ("conv", 1, 3, 1, 1, 1, 0)], (2, 2))
    layers = P.layers_of(op, tensors)
    # Execute
    first = P.regions(layers, (0, 4, 0, 4))
    last = P.regions(layers, (4, 8, 4, 8))
    # Assert: the first layer makes the tile plus a one-pixel halo, clipped at the border: 2 x 5 x 5 bytes
    assert first == [(0, 5, 0, 5), (0, 4, 0, 4)] and last == [(3, 8, 3, 8), (4, 8, 4, 8)]
    assert P.buffer_bytes(layers, 2, 2) == [50, 0] and P.scratch_bytes(layers, 2, 2) == 50
    # 2 x 9 taps x 25 + 1 x 18 taps x 16 per tile: halos cost 4 x 738 vs 2 x 9 x 64 + 18 x 64 unpatched
    assert P.macs(layers, 2, 2) == 4 * (2 * 9 * 25 + 18 * 16) and P.macs(layers, 1, 1) == 2 * 9 * 64 + 18 * 64


def test_fusion_into_a_non_depthwise_conv_is_refused():
    with pytest.raises(ValueError, match="is fused but"):
        make_patch((3, 8, 8), [("conv", 4, 3, 1, 1, 1, 1), ("conv", 2, 1, 1, 0, 1, 0)], (1, 1))


def test_writer_refuses_an_even_input_count():
    from tests.fixtures.tiny import tiny_plan

    plan = tiny_plan(seed=1)
    op, _, _ = make_patch((3, 8, 8), [("conv", 2, 3, 1, 1, 1, 0)], (1, 1))
    op.inputs = op.inputs[:2]
    plan.ops.insert(0, op)
    with pytest.raises(ValueError, match="1 \\+ 2k"):
        plan_to_bytes(plan)


def _tiny_cnn_graph():
    from fleet.compiler.models import TinyCNN
    from fleet.compiler.torch_import import import_torch

    torch.manual_seed(0)
    model = TinyCNN(in_channels=1, num_classes=10).eval()
    calib = np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32)
    return import_torch(model, calib, name="TinyCNN")


def test_compiler_patches_tinycnn_same_logits_smaller_arena():
    # Prepare
    graph = _tiny_cnn_graph()
    scheme = ir.SparseScheme("b2", n_bias_update=1)
    # Execute
    on = compile_full(graph, scheme)
    off = compile_full(graph, scheme, patch=False)
    back = plan_from_bytes(on.blob, verify=Verifier.unsigned())
    x = np.random.default_rng(3).integers(-128, 128, (4, 1, 28, 28)).astype(np.int8)
    # Assert: a PATCH op, less arena, the same logits; the plan round-trips
    assert ir.OpType.PATCH in [op.type for op in on.plan.ops]
    assert ir.OpType.PATCH not in [op.type for op in off.plan.ops]
    assert on.report.arena_bytes < off.report.arena_bytes
    assert np.array_equal(run_forward(on.plan, x), run_forward(off.plan, x))
    assert np.array_equal(run_forward(back, x), run_forward(off.plan, x)) and plan_to_bytes(back) == on.blob
    for op in on.plan.ops:
        if op.type == ir.OpType.PATCH:
            tensors = {t.id: t for t in on.plan.tensors}
            xin = np.random.default_rng(4).integers(-128, 128, (1, *tensors[op.inputs[0]].shape)).astype(np.int8)
            consts = [tensors[i].data for i in op.inputs[1:]]
            assert np.array_equal(P.patch_forward(op, tensors, xin, consts),
                                  P.patch_forward(op, tensors, xin, consts, tiled=True))


@pytest.mark.models
def test_paper_models_meet_the_arena_targets():
    from fleet.compiler.mit_import import import_mit
    from fleet.compiler.quantize import new_classifier
    from fleet.compiler.scheme import PAPER_SCHEMES, load_schemes

    targets = {"mbv2-w0.35": ("99kb", 78_000), "proxyless-w0.3": ("98kb", 74_000), "mcunet-5fps": ("99kb", 95_000)}
    for model, (rung, target) in targets.items():
        path = MODELS / f"{model}.pkl"
        if not path.exists():
            pytest.skip(f"{path} absent")
        graph = new_classifier(import_mit(path), 10)
        c = compile_full(graph, load_schemes(PAPER_SCHEMES)[model][rung], serialize=False)
        assert c.report.arena_bytes <= target, (model, c.report.arena_bytes)
