"""Torch importer: PTQ of small CNNs matches float logits, BatchNorm folds exactly, unsupported layers are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from device_agent.engine import ir, run_forward
from fleet.compiler.graph_builder import backbone_convs
from fleet.compiler.models import CharCNN, ImuCNN, TinyCNN
from fleet.compiler.torch_import import UnsupportedLayerError, fold_batchnorm, import_torch


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics so folding matters; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


class Mixed(nn.Module):
    """Conv+BN+ReLU, depthwise, grouped, functional ReLU6, residual torch.add, mean pooling, view, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        y = F.relu6(self.dw(x))
        x = torch.add(x, self.grouped(y)).relu()
        x = x.mean((2, 3))
        return self.fc(x.view(x.size(0), -1))


def _quantize_input(g: ir.Graph, x: np.ndarray) -> np.ndarray:
    t = g.tensors[g.input_id]
    if t.dtype == ir.DType.INT32:
        return x.astype(np.int32)
    q = np.round(x.reshape(x.shape[0], *t.shape) / t.scale[0]) + t.zero_point
    return np.clip(q, -128, 127).astype(np.int8)


def _dequant_logits(g: ir.Graph, y: np.ndarray) -> np.ndarray:
    t = g.tensors[g.output_id]
    return (y.reshape(y.shape[0], -1).astype(np.float64) - t.zero_point) * float(t.scale[0])


CASES = {
    "mixed": (Mixed, lambda n, g: torch.randn(n, 3, 16, 16, generator=g)),
    "imu": (ImuCNN, lambda n, g: torch.randn(n, 6, 128, generator=g)),
    "tiny2d": (TinyCNN, lambda n, g: torch.randn(n, 1, 28, 28, generator=g)),
    "char": (CharCNN, lambda n, g: torch.randint(0, 80, (n, 32), generator=g)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ptq_logits_close_to_float(case):
    # Prepare
    make, data = CASES[case]
    torch.manual_seed(0)
    model = _randomize_bn(make(), 1)
    gen = torch.Generator().manual_seed(2)
    graph = import_torch(model, data(256, gen))
    x = data(300, gen)
    with torch.no_grad():
        want = model(x).numpy()
    # Execute
    got = _dequant_logits(graph, run_forward(graph, _quantize_input(graph, x.numpy())))
    # Assert: within 4% of the float logit range (measured ~1%), argmax agreement > 90%
    span = float(want.max() - want.min())
    assert np.abs(got - want).max() < 0.04 * span
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.9


def test_graph_structure_fuses_bn_and_relu():
    # Prepare
    model = _randomize_bn(Mixed(), 3)
    # Execute
    g = import_torch(model, torch.randn(64, 3, 16, 16))
    # Assert
    assert [op.type for op in g.ops] == [ir.OpType.CONV2D] * 3 + [ir.OpType.ADD, ir.OpType.AVGPOOL, ir.OpType.CONV2D]
    conv, dw, grouped, add = g.ops[:4]
    assert conv.name == "conv" and conv.attrs["act_min"] == g.tensors[conv.outputs[0]].zero_point  # fused ReLU
    y_dw = g.tensors[dw.outputs[0]]
    assert dw.attrs["groups"] == 8 and dw.attrs["act_max"] <= y_dw.zero_point + round(6 / y_dw.scale[0])
    assert grouped.attrs["groups"] == 2
    assert add.attrs["act_min"] == g.tensors[add.outputs[0]].zero_point == -128  # ReLU after the add: range [0, max]
    assert len(backbone_convs(g)) == 3 and g.tensors[g.output_id].shape == (5, 1, 1)
    w = g.tensors[conv.inputs[1]]
    assert w.data.dtype == np.int8 and np.abs(w.data).max() == 127 and w.scale.shape == (8,)
    assert g.tensors[conv.inputs[2]].data.dtype == np.int32


def test_fold_batchnorm_is_exact_in_float():
    # Prepare
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
    _randomize_bn(nn.Sequential(conv, bn), 5)
    x = torch.randn(8, 4, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        want = bn.double()(conv.double()(x))
    # Execute
    w, b = fold_batchnorm(conv.weight, conv.bias, bn)
    got = F.conv2d(x, w, b, padding=1)
    # Assert
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-12)


def test_embedding_layout_and_int32_input():
    # Prepare
    model = CharCNN(vocab=20, dim=4, width=8).eval()
    # Execute
    g = import_torch(model, torch.randint(0, 20, (32, 12)))
    # Assert
    inp, emb = g.tensors[g.input_id], g.ops[0]
    assert inp.dtype == ir.DType.INT32 and inp.shape == (12,)
    assert emb.type == ir.OpType.EMBEDDING and g.tensors[emb.outputs[0]].shape == (4, 1, 12)
    assert g.ops[1].inputs[0] == emb.outputs[0]  # the transpose costs nothing


class _Seq(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


UNSUPPORTED = {
    "maxpool": (_Seq(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
                "body.1", "MaxPool2d"),
    "sigmoid": (_Seq(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
                "body.1", "Sigmoid"),
    "dilation": (_Seq(nn.Conv2d(3, 4, 3, dilation=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
                 "body.0", "Conv2d"),
    "bn_alone": (_Seq(nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)),
                 "body.0", "BatchNorm2d"),
    "no_classifier": (_Seq(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), "output", "output"),
    "partial_pool": (_Seq(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2)),
                     "body.1", "AdaptiveAvgPool2d"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_layer_is_named(case):
    # Prepare
    model, layer, op = UNSUPPORTED[case]
    # Execute
    with pytest.raises(UnsupportedLayerError) as err:
        import_torch(model.eval(), torch.randn(4, 3, 8, 8))
    # Assert
    assert err.value.layer == layer and err.value.op == op
    assert layer in str(err.value) and op in str(err.value)


def test_unsupported_function_is_named():
    # Prepare
    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.gelu(x))

    # Execute
    with pytest.raises(UnsupportedLayerError) as err:
        import_torch(Gelu().eval(), torch.randn(4, 4))
    # Assert
    assert err.value.layer == "gelu" and err.value.op == "gelu"


def test_standalone_relu_becomes_clamp():
    # Prepare: a ReLU after pooling has no conv/add to fold into
    model = _Seq(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)).eval()
    # Execute
    g = import_torch(model, torch.randn(16, 3, 8, 8))
    # Assert
    clamp = next(op for op in g.ops if op.type == ir.OpType.CLAMP)
    x = g.tensors[clamp.inputs[0]]
    assert clamp.name == "body.2" and clamp.attrs["act_min"] == max(-128, x.zero_point)
    assert g.tensors[clamp.outputs[0]].zero_point == x.zero_point
