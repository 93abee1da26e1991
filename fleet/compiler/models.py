"""Small reference PyTorch models used across TinyFleet (IMU 1D CNN, tiny 2D CNN, next-character model), and the
loader of a user's own model (``module:Class`` + a state-dict file).

All built-in models are MCU-sized (a few thousand to ~20k parameters), float, and built only from layers the
torch importer supports, so ``import_torch(model, calib)`` works on each. They hold no training code and no
data; the loader refuses whole pickled modules (state dicts only) and names every failure in one line.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

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


# --- a user's own model ---------------------------------------------------------------------------------------


class OwnModelError(ValueError):
    """A user's ``module:Class`` (or its weights) that cannot be loaded; the message says why, in one line."""


def import_class(spec: str, root: str | Path | None = None):
    """The class named by ``spec`` (``module:Class`` or ``package.module:Class``), imported with ``root``
    (default: the working directory) first on ``sys.path``, so a model file next to the config or in the
    current folder needs no PYTHONPATH. Raises :class:`OwnModelError`."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise OwnModelError(f"expected 'module:Class' (e.g. model:DigitsCNN for model.py), got {spec!r}")
    where = str(Path(root or ".").resolve())
    _forget_other(mod.split(".")[0], Path(where))
    added = where not in sys.path
    if added:
        sys.path.insert(0, where)
    try:
        return getattr(importlib.import_module(mod), attr)
    except ModuleNotFoundError as e:
        raise OwnModelError(f"cannot load {spec!r}: no module named {e.name!r} in {where} or on PYTHONPATH") \
            from None
    except AttributeError:
        raise OwnModelError(f"cannot load {spec!r}: module {mod!r} has no attribute {attr!r}") from None
    except Exception as e:  # noqa: BLE001  NOTE: the user's module failed to import; say how, not where
        raise OwnModelError(f"cannot load {spec!r}: importing {mod!r} raised {type(e).__name__}: {e}") from None
    finally:
        if added:
            sys.path.remove(where)


def _forget_other(top: str, root: Path) -> None:
    """Drop a module ``top`` imported earlier from another folder when ``root`` has its own (two configs, two
    ``model.py``): the one next to this config must win."""
    cached = sys.modules.get(top)
    here = (root / f"{top}.py").is_file() or (root / top / "__init__.py").is_file()
    file = getattr(cached, "__file__", None)
    if cached is None or not here or file is None or Path(file).resolve().is_relative_to(root):
        return
    for name in [n for n in sys.modules if n == top or n.startswith(f"{top}.")]:
        del sys.modules[name]


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """``model`` with the state dict in ``path`` (``torch.save(model.state_dict(), path)``) loaded strictly.

    A whole pickled module is refused (``weights_only``): save ``model.state_dict()``. Raises :class:`OwnModelError`.
    """
    path = Path(path)
    if not path.is_file():
        raise OwnModelError(f"file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  NOTE: torch.load of a damaged or non-state-dict file raises many kinds
        raise OwnModelError(f"{path}: not a readable state dict ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            "save it with torch.save(model.state_dict(), path)") from None
    if not isinstance(state, dict):
        raise OwnModelError(f"{path}: expected a state dict (torch.save(model.state_dict(), path)), "
                            f"got {type(state).__name__}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise OwnModelError(f"{path}: does not fit the model: {' '.join(str(e).split())[:300]}") from None
    return model


def build_own_model(spec: str, root: str | Path | None = None, weights: str | Path | None = None) -> nn.Module:
    """A fresh instance of the user's ``module:Class`` (no constructor arguments), with ``weights`` loaded."""
    cls = import_class(spec, root)
    try:
        model = cls()
    except Exception as e:  # noqa: BLE001  NOTE: the user's constructor; say how it failed
        raise OwnModelError(f"{spec}: building the model raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise OwnModelError(f"{spec}: expected a torch.nn.Module, got {type(model).__name__}")
    return load_weights(model, weights) if weights is not None else model


def output_classes(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """How many classes ``model`` scores for per-sample inputs of ``input_shape`` (a forward pass on zeros)."""
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *input_shape))
    except Exception as e:  # noqa: BLE001  NOTE: the user's forward pass
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OwnModelError(f"the model cannot read inputs of shape {tuple(input_shape)} per sample ({first})") \
            from None
    if out.ndim != 2:
        raise OwnModelError(f"expected logits (N, classes) for inputs {tuple(input_shape)}, got shape "
                            f"{tuple(out.shape)[1:]} per sample")
    return int(out.shape[1])
