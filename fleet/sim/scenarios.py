"""Scenario dispatch for ``tinyfleet simulate``: a config's dataset name -> its loader, model name -> float model.

The three scenarios (``watch``, ``shakespeare``, ``heart``) return the same :class:`~fleet.sim.datasets.Scenario`:
per-device slices split by natural user plus the coordinator's proxy set. Samples are float32 ``(N, C, H, W)``
(quantized on the device with the plan's input scale) or int8 character ids ``(N, L)`` (the plan's input
already). This module only picks; loading and splitting live in the ``datasets*`` modules.
"""

from __future__ import annotations

import numpy as np

from fleet.sim.config import SimConfig
from fleet.sim.datasets import Scenario

MODELS = ("imu_cnn", "char_cnn", "char_conv", "tabular_net")


def load_scenario(cfg: SimConfig) -> Scenario:
    """The devices' data and the proxy set for ``cfg.dataset`` over ``cfg.devices`` devices.

    ``dataset.max_test_per_device`` keeps that many evenly spaced windows of each test slice (in order).
    """
    sc = _load(cfg)
    cap = cfg.dataset.max_test_per_device
    if cap is not None:
        for dd in sc.devices:
            if len(dd.y_test) > cap:
                keep = np.linspace(0, len(dd.y_test) - 1, cap).round().astype(int)
                dd.x_test, dd.y_test = dd.x_test[keep], dd.y_test[keep]
    return sc


def _load(cfg: SimConfig) -> Scenario:
    d = cfg.dataset
    if d.name == "shakespeare":
        from fleet.sim.datasets_text import load_shakespeare_scenario

        return load_shakespeare_scenario(cfg.devices, d.window, d.stride, d.devices_per_user, d.proxy_users,
                                         d.min_chars, d.max_train_per_device, d.max_proxy, cfg.seed)
    if d.name == "heart":
        from fleet.sim.datasets_heart import load_heart_scenario

        return load_heart_scenario(cfg.devices, d.proxy_fraction, d.max_train_per_device, cfg.seed)
    from fleet.sim.datasets import load_watch_scenario

    return load_watch_scenario(cfg.devices, d.window, d.stride, tuple(d.proxy_subjects), d.max_train_per_device,
                               cfg.seed)


def make_model(name: str, x: np.ndarray, num_classes: int):
    """A fresh float torch model ``name`` sized for samples like ``x`` (batch first) and ``num_classes``.

    Raises ValueError for an unknown name or a model that cannot read such samples.
    """
    from fleet.compiler import models

    if name == "imu_cnn":
        return models.ImuCNN(in_channels=x.shape[1], num_classes=num_classes)
    if name in ("char_cnn", "char_conv"):
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"model.name: {name} reads character ids (N, L), got {x.dtype} {x.shape}")
        if name == "char_cnn":
            return models.CharCNN(vocab=num_classes)
        return models.CharConvNet(vocab=num_classes, length=x.shape[1])
    if name == "tabular_net":
        return models.TabularNet(in_features=x.shape[1], num_classes=num_classes)
    raise ValueError(f"model.name: unknown model {name!r} (expected one of {', '.join(MODELS)})")
