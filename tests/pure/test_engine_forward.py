"""Forward int8 kernels against float ops on dequantized tensors (within 1 LSB), and run_forward dispatch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from device_agent.engine import attrs as A
from device_agent.engine import forward_activations, ir, run_forward
from device_agent.engine.conv import ConvGeom
from device_agent.engine.forward import add, avgpool, conv2d, embedding
from tests.fixtures.tiny import tiny_dataset, tiny_plan

RNG = np.random.default_rng(0)

GEOMS = [  # (C_in, C_out, groups, KH, KW, stride, pad, H, W)
    (3, 8, 1, 3, 3, 1, 1, 8, 8),  # plain 3x3
    (8, 8, 8, 3, 3, 2, 1, 9, 7),  # depthwise, stride 2, odd sizes
    (4, 6, 2, 3, 3, 2, 0, 10, 9),  # grouped
    (6, 5, 1, 1, 5, 1, 2, 1, 16),  # conv1d as H = 1 (pad only matters along W here)
    (16, 10, 1, 1, 1, 1, 0, 1, 1),  # linear as 1x1
    (8, 16, 8, 5, 5, 2, 2, 11, 11),  # depthwise multiplier 2, 5x5
]


def _float_conv(x, zx, sx, w, sw, b, geom: ConvGeom, pad_h: int) -> np.ndarray:
    xr = torch.tensor(sx * (x.astype(np.float64) - zx))
    wr = torch.tensor(w.astype(np.float64) * sw[:, None, None, None])
    br = torch.tensor(b.astype(np.float64) * sx * sw)
    return F.conv2d(xr, wr, br, stride=(geom.stride_h, geom.stride_w), padding=(pad_h, geom.pad_w),
                    groups=geom.groups).numpy()


@pytest.mark.parametrize("cin,cout,groups,kh,kw,stride,pad,h,w", GEOMS)
def test_conv2d_matches_float_conv_within_one_lsb(cin, cout, groups, kh, kw, stride, pad, h, w):
    # Prepare
    pad_h = pad if kh > 1 else 0
    geom = ConvGeom(stride, stride, pad_h, pad, groups)
    x = RNG.integers(-128, 128, (2, cin, h, w)).astype(np.int8)
    wq, sw = A.quantize_weights(RNG.standard_normal((cout, cin // groups, kh, kw)))
    sx, zx, sy, zy = 0.05, -3, 0.2, 5
    b = RNG.integers(-2000, 2000, cout).astype(np.int32)
    rq = A.conv_requant(sx, sw, sy)
    # Execute
    y, mask = conv2d(x, zx, wq, b, zy, geom, rq["mult"], rq["shift"], -128, 127)
    # Assert
    want = _float_conv(x, zx, np.float32(sx), wq, sw.astype(np.float64), b, geom, pad_h) / np.float32(sy) + zy
    assert y.dtype == np.int8 and y.shape == want.shape
    assert np.abs(y - np.clip(np.round(want), -128, 127)).max() <= 1
    assert (mask == ((want > -128.5) & (want < 127.5))).mean() > 0.99


def test_conv_geometry_refuses_pads_over_the_kernel_and_empty_outputs():
    # Prepare: the C twin is tf_conv_check (a fuzzed plan's pad of 2^30 once overflowed there)
    ok, wide, huge, empty = ConvGeom(1, 1, 3, 3), ConvGeom(1, 1, 4, 0), ConvGeom(2, 2, 2**30, 0), ConvGeom(2, 1)
    # Execute / Assert
    assert ok.out_hw(1, 1, 3, 3) == (5, 5)  # pad == kernel: legal, the border sees padding only
    for geom, args in ((wide, (8, 8, 3, 3)), (huge, (8, 8, 3, 3)), (empty, (1, 8, 3, 3))):
        with pytest.raises(ValueError, match="pad|no output"):
            geom.out_hw(*args)


def test_conv2d_relu_clamp_and_mask():
    # Prepare
    x = RNG.integers(-128, 128, (1, 4, 5, 5)).astype(np.int8)
    wq, sw = A.quantize_weights(RNG.standard_normal((6, 4, 3, 3)))
    rq = A.conv_requant(0.05, sw, 1.0)
    # Execute
    y_full, _ = conv2d(x, 0, wq, np.zeros(6, np.int32), 0, ConvGeom(1, 1, 1, 1), rq["mult"], rq["shift"],
                       -128, 127)
    y, mask = conv2d(x, 0, wq, np.zeros(6, np.int32), 20, ConvGeom(1, 1, 1, 1), rq["mult"], rq["shift"], 0, 40)
    # Assert: the zero point shifts pre by 20; mask marks exactly the values the clamp let through
    assert -128 < y_full.min() and y_full.max() < 127
    pre = y_full.astype(np.int64) + 20
    assert (y == np.clip(pre, 0, 40)).all()
    assert (mask == ((pre >= 0) & (pre <= 40))).all()
    assert mask.any() and not mask.all()


def test_add_matches_float_within_one_lsb():
    # Prepare
    a = RNG.integers(-128, 128, (3, 4, 5, 5)).astype(np.int8)
    b = RNG.integers(-128, 128, (3, 4, 5, 5)).astype(np.int8)
    sa, za, sb, zb, sy, zy = 0.03, -10, 0.07, 4, 0.09, -2
    at = A.add_requant(sa, sb, sy)
    # Execute
    y, _mask = add(a, za, b, zb, zy, at["mult_a"], at["mult_b"], at["shift"], -128, 127)
    # Assert
    want = (sa * (a.astype(np.float64) - za) + sb * (b.astype(np.float64) - zb)) / sy + zy
    assert np.abs(y - np.clip(np.round(want), -128, 127)).max() <= 1
    assert max(at["mult_a"], at["mult_b"]) < 1 << 30


def test_add_rejects_mismatched_shapes():
    # Prepare
    a, b = np.zeros((1, 2, 3, 3), np.int8), np.zeros((1, 2, 3, 4), np.int8)
    # Execute / Assert
    with pytest.raises(ValueError, match="one shape"):
        add(a, 0, b, 0, 0, 1, 1, 1, -128, 127)


def test_avgpool_matches_float_mean_within_one_lsb():
    # Prepare
    x = RNG.integers(-128, 128, (4, 6, 7, 5)).astype(np.int8)
    sx, zx, sy, zy = 0.04, 3, 0.01, -1
    at = A.avgpool_requant(sx, sy, 7, 5)
    # Execute
    y = avgpool(x, zx, zy, at["mult"], at["shift"])
    # Assert
    want = sx * (x.astype(np.float64) - zx).mean(axis=(2, 3), keepdims=True) / sy + zy
    assert y.shape == (4, 6, 1, 1)
    assert np.abs(y - np.clip(np.round(want), -128, 127)).max() <= 1


def test_embedding_lookup_layout_and_range_check():
    # Prepare
    table = RNG.integers(-127, 128, (10, 3)).astype(np.int8)
    ids = np.array([[1, 9, 1, 0]])
    # Execute
    y = embedding(ids, table)
    # Assert
    assert y.shape == (1, 3, 1, 4)
    assert (y[0, :, 0, 1] == table[9]).all() and (y[0, :, 0, 2] == table[1]).all()
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\)"):
        embedding(np.array([[10]]), table)


def _graph_with_every_forward_op() -> tuple[ir.Graph, dict]:
    """ids -> EMBEDDING -> conv1d -> CLAMP -> PWDW -> AVGPOOL -> RESHAPE -> linear."""
    g = ir.Graph([], [], 0, 0, "all-ops")
    ids = g.add_tensor(name="ids", shape=(6,), dtype=ir.DType.INT32, kind=ir.Kind.INPUT).id
    tq = RNG.integers(-127, 128, (12, 4)).astype(np.int8)
    tab = g.add_tensor(name="table", shape=(12, 4), dtype=ir.DType.INT8, kind=ir.Kind.CONST, data=tq,
                       scale=A.f32(0.05)).id
    e = g.add_tensor(name="emb", shape=(4, 1, 6), dtype=ir.DType.INT8, kind=ir.Kind.ACTIVATION, scale=A.f32(0.05)).id
    g.ops.append(ir.Op(ir.OpType.EMBEDDING, [ids, tab], [e], {}, "emb"))
    w1, s1 = A.quantize_weights(RNG.standard_normal((6, 4, 1, 3)))
    cw = g.add_tensor(name="c.w", shape=w1.shape, dtype=ir.DType.INT8, kind=ir.Kind.CONST, data=w1, scale=s1).id
    cb = g.add_tensor(name="c.b", shape=(6,), dtype=ir.DType.INT32, kind=ir.Kind.CONST,
                      data=np.zeros(6, np.int32)).id
    c = g.add_tensor(name="c.y", shape=(6, 1, 6), dtype=ir.DType.INT8, kind=ir.Kind.ACTIVATION, scale=A.f32(0.1),
                     zero_point=0).id
    g.ops.append(ir.Op(ir.OpType.CONV2D, [e, cw, cb], [c], dict(stride_h=1, stride_w=1, pad_h=0, pad_w=1, groups=1,
                 act_min=-128, act_max=127, **A.conv_requant(0.05, s1, 0.1)), "conv1d"))
    r = g.add_tensor(name="relu", shape=(6, 1, 6), dtype=ir.DType.INT8, kind=ir.Kind.ACTIVATION, scale=A.f32(0.1)).id
    m = g.add_tensor(name="relu.mask", shape=(6, 1, 6), dtype=ir.DType.MASK, kind=ir.Kind.MASK).id
    g.ops.append(ir.Op(ir.OpType.CLAMP, [c], [r, m], {"act_min": 0, "act_max": 127}, "relu"))
    wp, sp = A.quantize_weights(RNG.standard_normal((9, 6, 1, 1)))
    wd, sd = A.quantize_weights(RNG.standard_normal((9, 1, 1, 3)))
    pw = [g.add_tensor(name=n, shape=v.shape, dtype=d, kind=ir.Kind.CONST, data=v, scale=s).id for n, v, d, s in
          [("pw.w", wp, ir.DType.INT8, sp), ("pw.b", np.arange(9, dtype=np.int32), ir.DType.INT32, A.f32(1)),
           ("dw.w", wd, ir.DType.INT8, sd), ("dw.b", -np.arange(9, dtype=np.int32), ir.DType.INT32, A.f32(1))]]
    y = g.add_tensor(name="pwdw", shape=(9, 1, 3), dtype=ir.DType.INT8, kind=ir.Kind.ACTIVATION, scale=A.f32(0.2),
                     zero_point=-128).id
    pa = {"pw_act_min": -128, "pw_act_max": 127, "pw_mult": A.conv_requant(0.1, sp, 0.15)["mult"],
          "pw_shift": A.conv_requant(0.1, sp, 0.15)["shift"], "mid_zero_point": -128, "dw_stride_h": 1,
          "dw_stride_w": 2, "dw_pad_h": 0, "dw_pad_w": 1, "dw_act_min": -128, "dw_act_max": 127,
          "dw_mult": A.conv_requant(0.15, sd, 0.2)["mult"], "dw_shift": A.conv_requant(0.15, sd, 0.2)["shift"]}
    g.ops.append(ir.Op(ir.OpType.PWDW, [r, *pw], [y], pa, "pwdw"))
    p = g.add_tensor(name="pool", shape=(9, 1, 1), dtype=ir.DType.INT8, kind=ir.Kind.ACTIVATION, scale=A.f32(0.2)).id
    g.ops.append(ir.Op(ir.OpType.AVGPOOL, [y], [p], A.avgpool_requant(0.2, 0.2, 1, 3), "pool"))
    f = g.add_tensor(name="flat", shape=(9, 1, 1), dtype=ir.DType.INT8, kind=ir.Kind.ACTIVATION, scale=A.f32(0.2)).id
    g.ops.append(ir.Op(ir.OpType.RESHAPE, [p], [f], {}, "flatten"))
    wl, sl = A.quantize_weights(RNG.standard_normal((3, 9, 1, 1)))
    lw = g.add_tensor(name="fc.w", shape=wl.shape, dtype=ir.DType.INT8, kind=ir.Kind.CONST, data=wl, scale=sl).id
    lb = g.add_tensor(name="fc.b", shape=(3,), dtype=ir.DType.INT32, kind=ir.Kind.CONST, data=np.zeros(3, np.int32)).id
    out = g.add_tensor(name="logits", shape=(3, 1, 1), dtype=ir.DType.INT8, kind=ir.Kind.ACTIVATION,
                       scale=A.f32(0.1)).id
    g.ops.append(ir.Op(ir.OpType.CONV2D, [f, lw, lb], [out], dict(stride_h=1, stride_w=1, pad_h=0, pad_w=0, groups=1,
                 act_min=-128, act_max=127, **A.conv_requant(0.2, sl, 0.1)), "fc"))
    g.input_id, g.output_id = ids, out
    for op in g.ops:
        op.check()
    return g, {"pa": pa, "pw": pw, "r": r, "y": y}


def test_run_forward_graph_every_op_and_pwdw_equals_two_convs():
    # Prepare
    g, h = _graph_with_every_forward_op()
    ids = RNG.integers(0, 12, (5, 6)).astype(np.int32)
    pa, (pw_w, pw_b, dw_w, dw_b) = h["pa"], h["pw"]
    # Execute
    acts = forward_activations(g, ids)
    logits = run_forward(g, ids)
    mid, _ = conv2d(acts[h["r"]], 0, g.tensors[pw_w].data, g.tensors[pw_b].data, -128, ConvGeom(),
                    pa["pw_mult"], pa["pw_shift"], -128, 127)
    two, _ = conv2d(mid, -128, g.tensors[dw_w].data, g.tensors[dw_b].data, -128, ConvGeom(1, 2, 0, 1, 9),
                    pa["dw_mult"], pa["dw_shift"], -128, 127)
    # Assert
    assert logits.shape == (5, 3, 1, 1) and logits.dtype == np.int8
    assert (acts[h["y"]] == two).all()
    assert (logits == acts[g.output_id]).all()
    assert acts[h["r"]].min() >= 0


def test_run_forward_plan_skips_train_ops_and_checks_input():
    # Prepare
    plan = tiny_plan()
    x, _ = tiny_dataset(6, seed=3)
    # Execute
    logits = run_forward(plan, x)
    acts = forward_activations(plan, x)
    # Assert
    assert logits.shape == (6, 4, 1, 1)
    assert not any(plan.tensors[i].kind == ir.Kind.GRADIENT for i in acts)
    with pytest.raises(ValueError, match=r"batch-first \(N, 3, 8, 8\)"):
        run_forward(plan, x[0])
    with pytest.raises(ValueError, match="integer"):
        run_forward(plan, x.astype(np.float32))


def test_engine_imports_numpy_only():
    # Prepare
    code = ("import sys, device_agent.engine, device_agent.engine.trainer; "
            "print(sorted(m for m in ('torch', 'fleet') if m in sys.modules))")
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # Assert: the device engine never pulls in torch or the coordinator
    assert out.strip() == "[]"
