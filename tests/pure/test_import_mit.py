"""MIT int8 importer: the three released models import, chain to (1000,1,1), count 51/60/42 convs, and every op
matches an independent float64 re-implementation of tiny-training's integer forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from device_agent.engine import forward_activations, ir, run_forward
from fleet.compiler.mit_import import backbone_convs, import_mit, load_mit

MODELS = {"mbv2-w0.35": 51, "proxyless-w0.3": 60, "mcunet-5fps": 42}


@pytest.fixture(scope="module", params=sorted(MODELS))
def mit(request, models_dir):
    path = models_dir / f"{request.param}.pkl"
    return request.param, import_mit(path), load_mit(path)


def _ref_conv(x: np.ndarray, cfg: dict) -> np.ndarray:
    """tiny-training's forward for one conv, in float64: round((conv(x - zx) + b) * sx*sw/sy) + zy, clamp."""
    p = cfg["params"]
    w = torch.from_numpy(p["weight"].astype(np.float64))
    k = w.shape[2]
    xx = torch.from_numpy(x.astype(np.float64)) - p["x_zero"]
    acc = F.conv2d(xx, w, None, cfg["stride"], (k - 1) // 2, 1, cfg["groups"]) + torch.from_numpy(
        p["bias"].astype(np.float64)).view(1, -1, 1, 1)
    eff = torch.from_numpy(p["x_scale"] * p["w_scales"].astype(np.float64) / p["y_scale"]).view(1, -1, 1, 1)
    return ((acc * eff).round() + p["y_zero"]).clamp(-128, 127).numpy()


def _cfg_of(cfg: dict, op_name: str) -> dict:
    if op_name in ("first_conv", "classifier"):
        return cfg[op_name]
    _, i, key = op_name.split(".")
    return cfg["blocks"][int(i)][key]


def test_mit_shapes_chain_and_conv_count(mit):
    # Prepare
    name, g, _ = mit
    # Execute
    convs = backbone_convs(g)
    # Assert
    assert len(convs) == MODELS[name]
    assert g.ops[convs[0]].name == "first_conv" and g.ops[-1].name == "classifier"
    assert g.tensors[g.input_id].shape == (3, 128, 128)
    assert g.tensors[g.output_id].shape == (1000, 1, 1) and g.tensors[g.output_id].name == "classifier.out"
    produced = {g.input_id} | {t.id for t in g.tensors if t.kind == ir.Kind.CONST}
    for op in g.ops:
        op.check()
        assert all(i in produced for i in op.inputs), f"{op.name} reads a tensor not produced yet"
        produced.update(op.outputs)
    for t in g.tensors:
        assert t.scale.dtype == np.float32 and np.all(t.scale > 0) and isinstance(t.zero_point, int)


def test_mit_every_op_matches_float_reference(mit):
    # Prepare
    _, g, cfg = mit
    x = np.random.default_rng(1).integers(-128, 128, (1, 3, 128, 128)).astype(np.int8)
    # Execute
    acts = forward_activations(g, x)
    # Assert: per op, from our own input, the fixed-point result equals float rounding except on exact ties
    n_diff = n_all = 0
    for op in g.ops:
        got = acts[op.outputs[0]].astype(np.int64)
        ins = [acts[i].astype(np.int64) for i in op.inputs if i in acts]
        if op.type == ir.OpType.CONV2D:
            want = _ref_conv(ins[0], _cfg_of(cfg, op.name))
        elif op.type == ir.OpType.ADD:
            p = cfg["blocks"][int(op.name.split(".")[1])]["residual"]["params"]
            a, b = (g.tensors[i] for i in op.inputs)
            real = (ins[0] - a.zero_point) * float(a.scale[0]) + (ins[1] - b.zero_point) * float(b.scale[0])
            want = np.clip(np.round(real / p["y_scale"]) + p["y_zero"], -128, 127)
        else:  # AVGPOOL keeps the quantization: round(mean)
            want = np.round(ins[0].astype(np.float64).mean(axis=(2, 3), keepdims=True))
        assert np.abs(got - want).max() <= 1, op.name
        n_diff += int((got != want).sum())
        n_all += got.size
    assert n_diff / n_all < 1e-3


def test_mit_forward_random_input_no_overflow(mit):
    # Prepare
    _, g, _ = mit
    x = np.random.default_rng(0).integers(-128, 128, (1, 3, 128, 128)).astype(np.int8)
    # Execute
    y = run_forward(g, x)
    # Assert
    assert y.shape == (1, 1000, 1, 1) and y.dtype == np.int8
    assert int(y.max()) - int(y.min()) > 10  # not collapsed to one value


def test_mit_smooth_image_gives_non_degenerate_distribution(mit):
    # Prepare: a smooth, image-like input (low-frequency colour field upsampled to 128x128)
    _, g, _ = mit
    low = np.random.default_rng(2).uniform(-100, 100, (1, 3, 8, 8))
    x = torch.nn.functional.interpolate(torch.from_numpy(low), size=(128, 128), mode="bicubic", align_corners=False)
    x = x.numpy().clip(-128, 127).round().astype(np.int8)
    out = g.tensors[g.output_id]
    # Execute
    z = (run_forward(g, x).reshape(-1).astype(np.float64) - out.zero_point) * float(out.scale[0])
    # Assert
    p = np.exp(z - z.max())
    p /= p.sum()
    entropy = float(-(p * np.log(p)).sum())
    assert 0.1 < entropy < 0.9 * math.log(1000)
    assert p.max() < 0.99


def test_mit_new_classifier_keeps_backbone(mit):
    # Prepare
    from fleet.compiler.quantize import new_classifier

    name, g, _ = mit
    x = np.random.default_rng(3).integers(-128, 128, (1, 3, 128, 128)).astype(np.int8)
    # Execute
    g10 = new_classifier(g, 10, seed=0, init="small")
    y = run_forward(g10, x)
    # Assert
    assert y.shape == (1, 10, 1, 1) and len(backbone_convs(g10)) == MODELS[name]
    head = g10.ops[-1]
    assert head.name == "classifier" and g10.tensors[head.inputs[0]].name == "pool.out"
