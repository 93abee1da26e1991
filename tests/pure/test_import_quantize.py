"""Quantization helpers: weight/bias/activation quantization, fixed-point attrs, and the fresh classifier head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from device_agent.engine import ir, run_forward
from fleet.compiler import quantize as Q
from fleet.compiler.models import TinyCNN
from fleet.compiler.torch_import import import_torch


def test_quantize_weight_per_channel_symmetric():
    # Prepare
    w = np.array([[[[0.25, -1.0]]], [[[0.02, 0.012]]], [[[0.0, 0.0]]]])
    # Execute
    q, s = Q.quantize_weight(w)
    # Assert
    assert q.dtype == np.int8 and s.dtype == np.float32
    assert q[0].ravel().tolist() == [32, -127] and q[1].ravel().tolist() == [127, 76]
    assert np.allclose(s[:2], [1 / 127, 0.02 / 127]) and s[2] == s.max() and q[2].max() == 0


def test_activation_qparams_include_zero_and_map_ends():
    # Prepare
    ranges = [(0.0, 6.0), (-1.0, 1.0), (0.5, 2.0), (0.0, 0.0)]
    # Execute
    params = [Q.activation_qparams(lo, hi) for lo, hi in ranges]
    # Assert
    assert params[0] == (6 / 255, -128)
    s, z = params[1]
    assert np.isclose(s, 2 / 255) and abs(-1 / s + z + 128) <= 0.5 and abs(1 / s + z - 127) <= 0.5
    assert params[2][1] == -128  # widened to [0, 2]: zero is exactly representable
    assert params[3][0] > 0


def test_bias_overflow_is_an_error():
    # Prepare
    s_w = np.array([1e-6], np.float32)
    # Execute / Assert
    assert Q.quantize_bias(np.array([0.5]), 0.1, s_w)[0] == round(0.5 / (0.1 * float(s_w[0])))
    with pytest.raises(ValueError, match="int32"):
        Q.quantize_bias(np.array([1e6]), 1e-3, s_w, "head.bias")


def test_add_multipliers_below_2_30():
    # Prepare
    cases = [(0.1, 0.05, 0.12), (0.02, 0.3, 0.01), (1.0, 1.0, 1.0)]
    for sa, sb, sy in cases:
        # Execute
        ma, mb, sh = Q.add_multipliers(sa, sb, sy)
        # Assert
        assert max(ma, mb) < 1 << 30 and max(ma, mb) >= 1 << 28
        assert abs(ma / 2**sh - sa / sy) < 1e-8 * sa / sy + 2.0**-sh
        assert abs(mb / 2**sh - sb / sy) < 1e-8 * sb / sy + 2.0**-sh


def test_act_range_relu6_and_avgpool_multiplier():
    # Prepare
    s, z = Q.activation_qparams(-2.0, 8.0)
    # Execute
    lo, hi = Q.act_range("relu6", s, z)
    m, sh = Q.avgpool_multiplier(0.1, 0.1, 16)
    # Assert
    assert lo == z and np.isclose((hi - z) * s, 6.0, atol=s)
    assert Q.act_range(None, s, z) == (-128, 127)
    assert np.isclose(m / 2**sh, 1 / 16)
    with pytest.raises(ValueError, match="gelu"):
        Q.act_range("gelu", s, z)


@pytest.fixture(scope="module")
def tiny_graph() -> ir.Graph:
    torch.manual_seed(0)
    return import_torch(TinyCNN().eval(), torch.randn(64, 1, 28, 28))


@pytest.mark.parametrize("init", ["zero", "small"])
def test_new_classifier_replaces_head(tiny_graph, init):
    # Prepare
    x = np.random.default_rng(0).integers(-128, 128, (4, 1, 28, 28)).astype(np.int8)
    old_w = tiny_graph.tensors[tiny_graph.ops[-1].inputs[1]]
    # Execute
    g = Q.new_classifier(tiny_graph, 3, seed=1, init=init)
    y = run_forward(g, x)
    # Assert
    head = g.ops[-1]
    w, b = g.tensors[head.inputs[1]], g.tensors[head.inputs[2]]
    assert y.shape == (4, 3, 1, 1) and g.tensors[g.output_id].shape == (3, 1, 1)
    assert w.shape == (3, 32, 1, 1) and b.data.tolist() == [0, 0, 0] and head.attrs["mult"].shape == (3,)
    assert np.allclose(w.scale, np.median(old_w.scale)) and g.tensors[g.output_id].zero_point == 0
    assert tiny_graph.tensors[tiny_graph.output_id].shape == (10, 1, 1)  # the original is untouched
    if init == "zero":
        assert not w.data.any() and not y.any()  # logits exactly at the zero point
    else:
        assert w.data.any() and np.abs(w.data).max() <= 8 and len(np.unique(y)) > 1
