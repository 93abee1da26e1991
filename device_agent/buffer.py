"""A bounded buffer of a device's private samples: a stream goes in, the oldest (or a random one) goes out.

Samples leave only as training batches handed to the local trainer; there is no export, no iteration and no
pickling (``__getstate__`` refuses), so nothing in the agent can ship raw data by accident. Two policies:
``fifo`` keeps the newest ``capacity`` samples (continual learning follows drift); ``reservoir`` keeps a uniform
sample of everything seen so far (Vitter's algorithm R, seeded, deterministic).
"""

from __future__ import annotations

import numpy as np

POLICIES = ("fifo", "reservoir")


class SampleBuffer:
    """``capacity`` samples of shape ``x_shape`` / dtype ``x_dtype`` with int32 labels."""

    def __init__(self, capacity: int, x_shape: tuple[int, ...], x_dtype=np.int8, policy: str = "fifo",
                 seed: int = 0):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"buffer policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.capacity, self.policy = capacity, policy
        self._x = np.zeros((capacity, *x_shape), x_dtype)
        self._y = np.zeros(capacity, np.int32)
        self._n = 0  # filled slots
        self._seen = 0  # samples ever offered
        self._next = 0  # fifo: slot the next sample overwrites
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self._n

    @property
    def seen(self) -> int:
        return self._seen

    def add(self, x: np.ndarray, y: np.ndarray | int) -> None:
        """Offer one sample ``x`` (``x_shape``) or a batch ``(N, *x_shape)`` with labels ``y`` (N,)."""
        x = np.asarray(x)
        if x.shape == self._x.shape[1:]:
            x, y = x[None], np.asarray([y])
        y = np.asarray(y)
        if x.shape[1:] != self._x.shape[1:] or y.shape != (x.shape[0],):
            raise ValueError(f"samples must be {self._x.shape[1:]} with one label each, got x {x.shape}, "
                             f"y {y.shape}")
        if x.dtype != self._x.dtype or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"samples must be {self._x.dtype} with integer labels, got {x.dtype} / {y.dtype}")
        for xi, yi in zip(x, y, strict=True):
            slot = self._slot()
            self._seen += 1
            if slot is not None:
                self._x[slot], self._y[slot] = xi, yi

    def _slot(self) -> int | None:
        if self._n < self.capacity:
            self._n += 1
            self._next = self._n % self.capacity
            return self._n - 1
        if self.policy == "fifo":
            slot, self._next = self._next, (self._next + 1) % self.capacity
            return slot
        j = int(self._rng.integers(0, self._seen + 1))  # algorithm R: keep with probability capacity/(seen+1)
        return j if j < self.capacity else None

    def batch(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` samples drawn with ``rng`` (without replacement while ``n <= len``): copies for the trainer."""
        if self._n == 0:
            raise ValueError("the sample buffer is empty: nothing to train on")
        idx = rng.choice(self._n, size=n, replace=n > self._n)
        return self._x[idx].copy(), self._y[idx].copy()

    def clear(self) -> None:
        self._n = self._next = 0

    def __repr__(self) -> str:  # never the data
        return f"SampleBuffer({self._n}/{self.capacity}, policy={self.policy}, seen={self._seen})"

    def __getstate__(self):
        raise TypeError("private samples do not leave the device: SampleBuffer cannot be pickled")
