"""What every scenario returns: per-device private slices split by natural user, plus the coordinator's proxy set.

Shared by ``serve`` and the simulator (through :func:`fleet.scenarios.load_scenario`); pure data, no loading.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DeviceData:
    """One device's private slice: windows ``(N, C, 1, W)`` float32 and labels ``(N,)`` int64.

    ``t_train``: each training sample's place in the device's stream (time order, smaller = earlier; the built-in
    scenarios store the stream shuffled, so storage order is not time order); None: storage order is time order.
    """

    device_id: str
    subject: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    t_train: np.ndarray | None = None

    @property
    def n_train(self) -> int:
        return len(self.y_train)


@dataclass
class Scenario:
    """Per-device slices plus the coordinator's proxy set (calibration / pretraining only)."""

    devices: list[DeviceData]
    x_proxy: np.ndarray  # (N, C, 1, W) float32
    y_proxy: np.ndarray  # (N,) int64
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, 1, W)
    class_names: tuple[str, ...] = ()

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        """All devices' held-out windows (the fleet-wide test set)."""
        return (np.concatenate([d.x_test for d in self.devices]), np.concatenate([d.y_test for d in self.devices]))


def windows(rec: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Cut one recording ``(T, C)`` into ``(N, C, 1, window)`` windows starting every ``stride`` samples.

    >>> windows(np.zeros((300, 6)), 128, 64).shape
    (3, 6, 1, 128)
    """
    if rec.ndim != 2:
        raise ValueError(f"recording must be (T, C), got shape {rec.shape}")
    n = (len(rec) - window) // stride + 1 if len(rec) >= window else 0
    if n == 0:
        return np.zeros((0, rec.shape[1], 1, window), np.float32)
    idx = np.arange(n)[:, None] * stride + np.arange(window)[None, :]  # (N, W)
    return np.ascontiguousarray(rec[idx].transpose(0, 2, 1)[:, :, None, :], dtype=np.float32)


def _cat(parts: list[np.ndarray], shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros((0, *shape), dtype)




def quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Float input -> int8 with the plan's input quantization: ``clip(round(x / scale) + zp, -128, 127)``.

    Integer input (character ids) is already what the plan takes and comes back unchanged.
    """
    if np.issubdtype(np.asarray(x).dtype, np.integer):
        return np.asarray(x)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"input scale must be a finite number > 0, got {scale}")
    q = np.round(np.asarray(x, np.float64) / scale) + zero_point
    return np.clip(q, -128, 127).astype(np.int8)
