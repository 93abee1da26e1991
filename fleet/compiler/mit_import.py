"""Importer for the int8 ``.pkl`` models of mit-han-lab/tiny-training (MbV2-w0.35, ProxylessNAS-w0.3, MCUNet-5FPS).

Their arithmetic is ours (checked against tiny-training's ``quantized_ops``): ``acc = bias + conv(x - x_zero, w)``
with zero padding of ``(k-1)//2``, ``y = round(acc * x_scale * w_scales / y_scale) + y_zero`` clamped to int8;
ReLU6 lives in the output range (``y_zero = -128``, ``y_scale <= 6/255``); a residual is a requantized add with
its own parameters; global average pooling keeps the quantization. So values are copied, not converted: only
multipliers are computed. Refuses what it does not model: squeeze-excite, feature-mix, residual convs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from device_agent.engine import ir

from .graph_builder import GraphBuilder, backbone_convs

__all__ = ["MitFormatError", "backbone_convs", "default_models_dir", "import_mit", "load_mit"]


def default_models_dir() -> Path:
    """Where the MIT int8 models usually are: ``../shared/models/mit-han-lab`` beside the checkout, else
    ``/work/shared/models/mit-han-lab`` (this project's machines). May not exist; callers skip cleanly."""
    here = (Path(__file__).resolve().parents[3] / "shared" / "models" / "mit-han-lab")
    return here if here.exists() else Path("/work/shared/models/mit-han-lab")

CONV_KEYS = ("pointwise1", "depthwise", "pointwise2")


class MitFormatError(ValueError):
    """The pickle is not a tiny-training int8 model this importer understands."""


def load_mit(path: str | Path) -> dict[str, Any]:
    """Load a tiny-training ``.pkl`` (a trusted file: it is a pickle) into its dict of numpy arrays."""
    import torch  # the compiler may import torch; the pickle was written by torch.save

    cfg = torch.load(str(path), weights_only=False, map_location="cpu")
    if not isinstance(cfg, dict) or not {"first_conv", "blocks", "classifier"} <= set(cfg):
        raise MitFormatError(f"{path}: expected a dict with first_conv/blocks/classifier, got {type(cfg).__name__}")
    return cfg


def _conv(b: GraphBuilder, name: str, x: int, cfg: dict) -> int:
    p = cfg["params"]
    xt = b.tensor(x)
    if abs(float(p["x_scale"]) - float(xt.scale[0])) > 1e-6 * float(xt.scale[0]) or int(p["x_zero"]) != xt.zero_point:
        raise MitFormatError(f"{name}: input quantization ({p['x_scale']}, {p['x_zero']}) differs from the "
                             f"producer's ({float(xt.scale[0])}, {xt.zero_point})")
    w = np.asarray(p["weight"])
    if w.dtype != np.int8 or w.ndim != 4 or int(w.min()) < -127:
        raise MitFormatError(f"{name}: weight must be int8 (O, I/g, kh, kw) in [-127, 127], got {w.dtype} {w.shape}")
    kh, kw = w.shape[2:]
    stride = int(cfg.get("stride", 1))
    groups = int(cfg.get("groups", 1))
    y = b.add_conv(name, x, w, np.asarray(p["w_scales"], np.float32), np.asarray(p["bias"], np.int32),
                   float(p["y_scale"]), int(p["y_zero"]), stride=(stride, stride),
                   pad=((kh - 1) // 2, (kw - 1) // 2), groups=groups)
    out_shape = cfg.get("out_shape")
    if out_shape is not None and b.tensor(y).shape[1:] != (out_shape, out_shape):
        raise MitFormatError(f"{name}: computed output {b.tensor(y).shape} but the file says {out_shape}x{out_shape}")
    return y


def _block(b: GraphBuilder, i: int, x: int, cfg: dict) -> int:
    if cfg.get("se") is not None:
        raise MitFormatError(f"blocks.{i}: 'se' (squeeze-excite) is not supported")
    h = x
    for key in CONV_KEYS:
        if cfg.get(key) is not None:
            h = _conv(b, f"blocks.{i}.{key}", h, cfg[key])
    res = cfg.get("residual")
    if res is None:
        return h
    if "kernel_size" in res:
        raise MitFormatError(f"blocks.{i}: a residual with its own conv is not supported")
    p = res["params"]
    xt = b.tensor(x)
    if abs(float(p["x_scale"]) - float(xt.scale[0])) > 1e-6 * float(xt.scale[0]) or int(p["x_zero"]) != xt.zero_point:
        raise MitFormatError(f"blocks.{i}.residual: skip-input quantization differs from the block input's")
    return b.add_add(f"blocks.{i}.add", x, h, float(p["y_scale"]), int(p["y_zero"]))


def import_mit(path: str | Path, name: str | None = None) -> ir.Graph:
    """Import a tiny-training int8 model as a forward graph ``(3, R, R) int8 -> (1000, 1, 1) int8 logits``.

    Parameters
    ----------
    path : str or Path
        e.g. ``../shared/models/mit-han-lab/mbv2-w0.35.pkl``.
    name : str, optional
        Graph name; default the file stem.

    Returns
    -------
    ir.Graph
        Ops ``first_conv``, ``blocks.<i>.<pointwise1|depthwise|pointwise2>``, ``blocks.<i>.add``, ``pool``,
        ``classifier``; tensors ``<op>.out`` / ``<op>.weight`` / ``<op>.bias``. The input (real = pixel/127.5 - 1)
        has the first conv's ``x_scale, x_zero``. :func:`backbone_convs` maps scheme conv indices to ops.
    """
    cfg = load_mit(path)
    if cfg.get("feature_mix") is not None:
        raise MitFormatError(f"{path}: 'feature_mix' conv is not supported")
    b = GraphBuilder(name or Path(path).stem)
    fc = cfg["first_conv"]
    res = int(fc.get("in_shape", 128))
    x = b.add_input("input", (int(fc["in_channel"]), res, res), float(fc["params"]["x_scale"]),
                    int(fc["params"]["x_zero"]))
    x = _conv(b, "first_conv", x, fc)
    for i, blk in enumerate(cfg["blocks"]):
        x = _block(b, i, x, blk)
    xt = b.tensor(x)
    # NOTE: tiny-training pools with round(mean) in the integer domain: same scale and zero point as its input.
    x = b.add_avgpool("pool", x, float(xt.scale[0]), xt.zero_point)
    y = _conv(b, "classifier", x, cfg["classifier"])
    return b.finish(y)


def conv_count(graph: ir.Graph) -> int:
    """Number of backbone convs (the scheme index range), e.g. 51 / 60 / 42 for the three released models."""
    return len(backbone_convs(graph))
