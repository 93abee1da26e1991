"""Small reference PyTorch models used across TinyFleet (IMU 1D CNN, tiny 2D CNN, next-character model).

All are MCU-sized (a few thousand to ~20k parameters), float, and built only from layers the torch importer
supports, so ``import_torch(model, calib)`` works on each. They hold no training code and no data.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, dims: int = 2,
             act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
    layers: list[nn.Module] = [conv(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False), bn(c_out)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class ImuCNN(nn.Module):
    """1D CNN for IMU windows: ``(N, 6, 128)`` float -> ``(N, num_classes)`` logits (~5.9k parameters).

    conv 6->16 /2, depthwise 16 + pointwise 16->32, conv 32->32 /2, a residual depthwise-separable pair,
    global average pool, linear. In the IR the window is ``(6, 1, 128)`` (conv1d = conv2d over H = 1).
    """

    def __init__(self, in_channels: int = 6, num_classes: int = 7, width: int = 32):
        super().__init__()
        self.input_shape = (in_channels, 128)  # per sample, read by `tinyfleet compile`
        self.stem = _conv_bn(in_channels, 16, 5, stride=2, dims=1)
        self.dw1 = _conv_bn(16, 16, 5, groups=16, dims=1)
        self.pw1 = _conv_bn(16, width, 1, dims=1)
        self.conv2 = _conv_bn(width, width, 3, stride=2, dims=1)
        self.dw2 = _conv_bn(width, width, 5, groups=width, dims=1)
        self.pw2 = _conv_bn(width, width, 1, dims=1, act=None)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.pw1(self.dw1(self.stem(x))))
        x = self.relu(x + self.pw2(self.dw2(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


class TinyCNN(nn.Module):
    """Tiny 2D CNN (MobileNetV2-style): ``(N, C, 28, 28)`` float -> ``(N, num_classes)`` (~2.7k parameters).

    stem conv /2 with ReLU6, an inverted-residual block (1x1 expand, 3x3 depthwise, 1x1 project, add), a
    strided depthwise-separable stage, global average pool, linear.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.input_shape = (in_channels, 28, 28)
        self.stem = _conv_bn(in_channels, width, 3, stride=2, act=nn.ReLU6)
        self.expand = _conv_bn(width, 2 * width, 1, act=nn.ReLU6)
        self.depthwise = _conv_bn(2 * width, 2 * width, 3, groups=2 * width, act=nn.ReLU6)
        self.project = _conv_bn(2 * width, width, 1, act=None)
        self.down_dw = _conv_bn(width, width, 3, stride=2, groups=width, act=nn.ReLU6)
        self.down_pw = _conv_bn(width, 2 * width, 1, act=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        x = self.down_pw(self.down_dw(x))
        return self.classifier(self.pool(x).flatten(1))


class CharCNN(nn.Module):
    """Next-character model: ids ``(N, L)`` int -> ``(N, vocab)`` logits for the character after the window.

    Embedding (vocab x dim), transposed to ``(dim, L)`` so conv1d layers follow (``(dim, 1, L)`` in the IR),
    two conv1d + ReLU with a residual, global average pool, linear (~16k parameters for vocab 80).
    """

    def __init__(self, vocab: int = 80, dim: int = 16, width: int = 48):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.conv1 = nn.Conv1d(dim, width, 5, padding=2)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).transpose(1, 2)
        x = torch.relu(self.conv1(x))
        x = torch.relu(x + self.conv2(x))
        return self.classifier(self.pool(x).flatten(1))


class TabularNet(nn.Module):
    """MLP for tabular rows as 1x1 convs: ``(N, F, 1)`` float -> ``(N, num_classes)`` logits (~2.3k parameters).

    Two pointwise conv + BN + ReLU layers (a Linear each, in the engine's (C, H, W) layout: the row is
    ``(F, 1, 1)`` in the IR), then a linear classifier.
    """

    def __init__(self, in_features: int = 32, num_classes: int = 2, width: int = 32):
        super().__init__()
        self.input_shape = (in_features, 1)
        self.fc1 = _conv_bn(in_features, width, 1, dims=1)
        self.fc2 = _conv_bn(width, width, 1, dims=1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.fc2(self.fc1(x)), 1))


class CharConvNet(nn.Module):
    """Next-character model that keeps position: ids ``(N, L)`` -> ``(N, vocab)`` logits (~30k parameters, L=40).

    Embedding (vocab x dim) transposed to ``(dim, L)``, three strided conv1d + BN + ReLU (L -> L/8), flatten, linear.
    Unlike :class:`CharCNN` (global average pool: a bag of n-grams) the classifier sees where each feature
    sits, so the last characters count most; fp32 on Shakespeare it leaves the "always a space" plateau in a
    third of the steps.
    """

    def __init__(self, vocab: int = 79, length: int = 40, dim: int = 16, widths: tuple[int, int, int] = (32, 48, 64)):
        super().__init__()
        if length % 8:
            raise ValueError(f"CharConvNet needs a window length divisible by 8, got {length}")
        self.input_shape = (length,)
        self.embed = nn.Embedding(vocab, dim)
        self.conv1 = _conv_bn(dim, widths[0], 5, stride=2, dims=1)
        self.conv2 = _conv_bn(widths[0], widths[1], 3, stride=2, dims=1)
        self.conv3 = _conv_bn(widths[1], widths[2], 3, stride=2, dims=1)
        self.classifier = nn.Linear(widths[2] * (length // 8), vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).transpose(1, 2)
        x = self.conv3(self.conv2(self.conv1(x)))
        return self.classifier(torch.flatten(x, 1))
