"""Personalization on the device: which tensors a method keeps personal, and the Ditto pull rule (the spec).

A personalization method keeps a **personal copy** of a set of the plan's trainable tensors and trains it on
the device's own samples after each model update; the shared model (what the fleet aggregates, and what the
delta is computed against) is never touched by it. The methods, most memory first:

- ``ditto``: personal copy of the whole sparse set, persisting across updates, each local step followed by an
  integer pull toward the current global values (:func:`ditto_pull`), after Li et al., "Ditto", ICML 2021;
- ``finetune``: personal copy of the whole sparse set, re-started from each new global model and fine-tuned;
- ``head``: personal copy of the classifier's weights and bias (FedPer / FedRep), persisting across updates,
  trained head-only on top of each new global body;
- ``bias``: personal copy of the classifier bias only, persisting, trained bias-only (the baseline).

The Ditto pull is integer arithmetic with a fixed rounding rule, so the firmware can match it bit for bit
(the firmware side is not written yet; docs/personalization.md). This module does no I/O and owns no samples:
batches come from a callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import ir

METHODS = ("ditto", "finetune", "head", "bias")  # most memory first: the fallback order
Q15 = 1 << 15
PERSONAL_STEP0 = 1 << 31  # the trainer's update counter during personal steps starts here (+ steps done)


def head_ids(plan: ir.Plan) -> list[int]:
    """Ids of the trainable inputs (weights, bias) of the op producing the logits: the classifier."""
    trainable = {t.id for t in plan.trainable}
    for op in reversed(plan.forward_ops):
        got = sorted(i for i in op.inputs if i in trainable)
        if got:
            return got
    raise ValueError(f"plan {plan.name!r} has no trainable classifier")


def method_ids(plan: ir.Plan, method: str) -> list[int]:
    """Trainable tensor ids a method keeps a personal copy of (ascending)."""
    if method in ("ditto", "finetune"):
        return sorted(t.id for t in plan.trainable)
    if method == "head":
        return head_ids(plan)
    if method == "bias":
        tensors = {t.id: t for t in plan.tensors}
        biases = [i for i in head_ids(plan) if tensors[i].dtype == ir.DType.INT32]
        if not biases:
            raise ValueError(f"plan {plan.name!r}: the classifier has no trainable bias")
        return biases
    raise ValueError(f"personalization method must be one of {', '.join(METHODS)}, got {method!r}")


def ditto_pull(personal: np.ndarray, reference: np.ndarray, lam_q15: int) -> np.ndarray:
    """One Ditto proximal step in integers: ``p - round_half_up((p - g) * lam_q15 / 2^15)``, saturated.

    Parameters
    ----------
    personal : int8 (weights) or int32 (bias) array, any shape: the personal values p.
    reference : same shape and dtype: the global values g the personal model is pulled toward.
    lam_q15 : pull strength in Q15, ``0 <= lam_q15 <= 32768`` (32768 = copy g, 0 = no pull); it is the
        product ``lr * lambda`` of Ditto's ``p <- p - lr * (grad + lambda * (p - g))``, split off the gradient.

    Returns
    -------
    The pulled values, same dtype (int64 arithmetic, arithmetic shift = floor, +2^14 before it = round half up,
    then clamped to the dtype's range). Example: p = 10, g = 0, lam = 8192 (0.25) -> 10 - 3 = 7 (2.5 rounds up).
    """
    if not 0 <= lam_q15 <= Q15:
        raise ValueError(f"ditto lam_q15 must be in 0..{Q15}, got {lam_q15}")
    if personal.shape != reference.shape or personal.dtype != reference.dtype:
        raise ValueError(f"ditto: personal {personal.dtype} {personal.shape} and reference "
                         f"{reference.dtype} {reference.shape} differ")
    p = personal.astype(np.int64)
    d = p - reference.astype(np.int64)
    pull = (d * lam_q15 + (1 << 14)) >> 15
    info = np.iinfo(personal.dtype)
    return np.clip(p - pull, info.min, info.max).astype(personal.dtype)


@dataclass(frozen=True)
class PersonalSpec:
    """A device's personalization: method, local steps after each update, learning rate, Ditto's pull (Q15)."""

    method: str
    steps: int = 20
    lr: float = 0.01
    lam_q15: int = 3277  # ~0.1
    batch_size: int = 1


class Personalizer:
    """Holds one device's personal copy and trains it; the trainer is borrowed and handed back as it was."""

    def __init__(self, plan: ir.Plan, spec: PersonalSpec):
        self.plan, self.spec = plan, spec
        self.ids = method_ids(plan, spec.method)
        self.state: dict[int, np.ndarray] | None = None  # personal copy, None until the first update
        self.updates = 0
        self.steps_done = 0  # personal steps ever taken: the stochastic-rounding counter of the personal copy

    def update(self, trainer, reference: dict[int, np.ndarray], batch: Callable[[int], tuple]) -> None:
        """Personalize on top of ``reference`` (every trainable tensor: the global model as this device holds
        it); ``batch(k)`` returns step k's ``(x, y)``. The trainer ends holding ``reference`` again."""
        s = self.spec
        start = reference if self.state is None or s.method == "finetune" else {**reference, **self.state}
        trainer.load_trainable(start)
        # NOTE: personal steps draw stochastic rounding from their own counter (from 2^31 up), so the shared
        # training, and the delta, are bit-identical with or without personalization
        shared_step = getattr(trainer, "step", None)
        if shared_step is not None:
            trainer.step = (PERSONAL_STEP0 + self.steps_done) & 0xFFFFFFFF
        keep = {i: v for i, v in reference.items() if i not in self.ids}
        try:
            for k in range(s.steps):
                x, y = batch(k)
                trainer.train_step(x, y, s.lr)
                self.steps_done += 1
                if keep:  # NOTE: restoring the rest after each step = training only the personal set
                    trainer.load_trainable(keep)
                if s.method == "ditto":
                    cur = trainer.trainable_state()
                    trainer.load_trainable({i: ditto_pull(cur[i], reference[i], s.lam_q15) for i in self.ids})
            cur = trainer.trainable_state()
            self.state = {i: cur[i] for i in self.ids}
            self.updates += 1
        finally:
            trainer.load_trainable(reference)
            if shared_step is not None:
                trainer.step = shared_step

    def model(self, reference: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """The personal model: ``reference`` with the personal copy laid over it."""
        return dict(reference) if self.state is None else {**reference, **self.state}
