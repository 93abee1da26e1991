"""Per-device evaluation and the baselines a fleet run is compared with: personalized, local-only, centralized.

- :func:`device_accuracies` evaluates one shared model state on every device's own held-out slice, optionally
  with each device's personal tensors swapped in (the "personalized" model).
- :func:`local_only` trains each device alone, from the initial model, on its own samples with the same
  number of steps, batch and learning rate as the fleet gives it (no communication at all).
- :func:`centralized` fine-tunes the float (fp32) model on the pooled training data of all devices: the upper
  bound nobody can deploy (it needs every user's raw data in one place).

Accuracies are hit counts over test windows, so pooled numbers weight devices by their test slice size (the same
way the fleet-wide ``accuracy_per_round`` does). This module does no I/O and knows nothing of MQTT.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from device_agent.engine import ir


@dataclass
class DeviceSlice:
    """One device's data as the plan sees it: int8 windows ``(N, *input shape)`` and int32 labels ``(N,)``."""

    device_id: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def personal_ids(plan: ir.Plan) -> list[int]:
    """Ids of the plan's personal tensors, ascending."""
    return sorted(t.id for t in plan.trainable if t.personal)


def _hits(trainer, x: np.ndarray, y: np.ndarray) -> int:
    return round(trainer.evaluate(x, y) * len(y)) if len(y) else 0


def device_accuracies(trainer, shared: dict[int, np.ndarray], devices: Sequence[DeviceSlice],
                      personal: Sequence[dict[int, np.ndarray] | None] | None = None) -> list[float | None]:
    """Accuracy of ``shared`` (global state) on each device's test slice; None for a device with no test window.

    ``personal[i]`` (tensor id -> values) replaces those tensors for device ``i`` only; None keeps the global
    values. ``trainer`` is a host :class:`~device_agent.engine.trainer.Trainer` over the same plan (reused).
    """
    accs: list[float | None] = []
    for i, d in enumerate(devices):
        trainer.load_trainable(shared)
        if personal is not None and personal[i]:
            trainer.load_trainable(personal[i])
        accs.append(_hits(trainer, d.x_test, d.y_test) / len(d.y_test) if len(d.y_test) else None)
    return accs


def pooled(accs: Sequence[float | None], devices: Sequence[DeviceSlice]) -> float:
    """Fleet-wide accuracy from per-device accuracies: hits summed over all test windows."""
    n = sum(len(d.y_test) for d, a in zip(devices, accs) if a is not None)
    return sum(a * len(d.y_test) for d, a in zip(devices, accs) if a is not None) / n if n else 0.0


def local_only(plan: ir.Plan, devices: Sequence[DeviceSlice], rounds: int, local_steps: int, lr: float,
               seed: int, batch_size: int = 1) -> list[list[float | None]]:
    """Each device trains alone from the plan's initial values: ``local_steps`` per round for ``rounds`` rounds.

    Samples are drawn like a fleet device draws them (its buffer, ``rng = default_rng([seed + i, round])``).

    Returns
    -------
    list of rounds, each a list over devices of the device's own-model accuracy on its test slice (None: no
    training or test data).
    """
    from device_agent.buffer import SampleBuffer
    from device_agent.engine.trainer import Trainer

    per_round: list[list[float | None]] = [[None] * len(devices) for _ in range(rounds)]
    for i, d in enumerate(devices):
        if not len(d.y_train) or not len(d.y_test):
            continue
        trainer = Trainer(plan)
        buf = SampleBuffer(len(d.y_train), tuple(d.x_train.shape[1:]), d.x_train.dtype, seed=seed + i)
        buf.add(d.x_train, d.y_train)
        for r in range(rounds):
            rng = np.random.default_rng([seed + i, r + 1])
            for _ in range(local_steps):
                x, y = buf.batch(batch_size, rng)
                trainer.train_step(x, y, lr)
            per_round[r][i] = _hits(trainer, d.x_test, d.y_test) / len(d.y_test)
    return per_round


def centralized(model, x_train: np.ndarray, y_train: np.ndarray, tests: Sequence[tuple[np.ndarray, np.ndarray]],
                epochs: int, seed: int, lr: float = 1e-3, batch: int = 32) -> list[list[float | None]]:
    """Fine-tune the float ``model`` (torch, fp32, every parameter, Adam) on pooled data; one epoch per round.

    Parameters
    ----------
    model : the torch module the plan was quantized from (a fresh copy is trained; ``model`` is untouched).
    x_train : (N, C, W) float32 pooled windows of every device; y_train : (N,) int64.
    tests : per device ``(x (M, C, W) float32, y (M,))``.

    Returns
    -------
    list of epochs, each a list over devices of accuracy on that device's test slice (None: no test data).
    """
    import torch

    torch.manual_seed(seed)
    net = copy.deepcopy(model)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(np.asarray(y_train, np.int64))
    out: list[list[float | None]] = []
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(yt), generator=gen).split(batch):
            if len(idx) < 2:  # NOTE: batch norm cannot train on a single sample
                continue
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
        net.eval()
        accs: list[float | None] = []
        with torch.no_grad():
            for x, y in tests:
                if not len(y):
                    accs.append(None)
                    continue
                pred = net(torch.from_numpy(np.ascontiguousarray(x))).argmax(1).numpy()
                accs.append(float((pred == np.asarray(y)).mean()))
        out.append(accs)
    return out
