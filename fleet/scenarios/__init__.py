"""The scenario registry, one for ``serve`` and the simulator: a config's dataset name -> its offline loader.

The three built-in scenarios (``watch``, ``shakespeare``, ``heart``) and a user's own data (``npz``: one file per
device, fleet/scenarios/npz.py) return the same :class:`~fleet.scenarios.base.Scenario`:
per-device slices split by natural user plus the coordinator's proxy set. Samples are float32 ``(N, C, H, W)``
(quantized on the device with the plan's input scale) or int8 character ids ``(N, L)`` (the plan's input
already). This module only picks; loading and splitting live in ``watch.py``, ``text.py``, ``heart.py``, ``npz.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fleet.scenarios.base import DeviceData, Scenario, quantize, windows

if TYPE_CHECKING:
    from fleet.schema import FleetConfig

DATASETS = ("watch", "shakespeare", "heart", "npz")
__all__ = ["DATASETS", "DeviceData", "Scenario", "load_scenario", "quantize", "windows"]


def load_scenario(cfg: FleetConfig, devices: bool = True) -> Scenario:
    """The devices' data and the proxy set for ``cfg.dataset`` over ``cfg.devices`` devices.

    ``dataset.max_test_per_device`` keeps that many evenly spaced windows of each test slice (in order).
    ``devices=False`` (a coordinator): own data (``npz``) is read for its proxy set only, no device file.
    """
    if not devices and cfg.dataset.name == "npz":
        from fleet.scenarios.npz import load_npz_scenario

        return load_npz_scenario(cfg, devices=False)
    sc = _load(cfg)
    cap = cfg.dataset.max_test_per_device
    if cap is not None:
        for dd in sc.devices:
            if len(dd.y_test) > cap:
                keep = np.linspace(0, len(dd.y_test) - 1, cap).round().astype(int)
                dd.x_test, dd.y_test = dd.x_test[keep], dd.y_test[keep]
    return sc


def _load(cfg: FleetConfig) -> Scenario:
    d = cfg.dataset
    if d.name == "npz":
        from fleet.scenarios.npz import load_npz_scenario

        return load_npz_scenario(cfg)
    if d.name == "shakespeare":
        from fleet.scenarios.text import load_shakespeare_scenario

        return load_shakespeare_scenario(cfg.devices, d.window, d.stride, d.devices_per_user, d.proxy_users,
                                         d.min_chars, d.max_train_per_device, d.max_proxy, cfg.seed)
    if d.name == "heart":
        from fleet.scenarios.heart import load_heart_scenario

        return load_heart_scenario(cfg.devices, d.proxy_fraction, d.max_train_per_device, cfg.seed)
    from fleet.scenarios.watch import load_watch_scenario

    return load_watch_scenario(cfg.devices, d.window, d.stride, tuple(d.proxy_subjects), d.max_train_per_device,
                               cfg.seed)
