"""Trainer: executes a Plan's op list in order over a tensor store (the host-side device, and the firmware's spec).

It owns copies of the plan's trainable tensors and an update counter; it never recompiles, reorders or skips
ops (except the global weight/bias switches), and never writes back into the plan.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from . import ir
from .backward import backward_op
from .forward import check_input, forward_op
from .recipe import (
    Recipe,
    check_plan_recipe,
    lr_factor_q15,
    per_sample_lr,
    plan_recipe,
    scaled_lr,
)
from .update import lr_mant_exp, recipe_update, update_op

UPDATE_OPS = frozenset({ir.OpType.CONV2D_UPDATE, ir.OpType.EMBEDDING_UPDATE})


@dataclass
class StepStats:
    """Result of one training step: mean float loss, correct predictions, samples."""

    loss: float
    correct: int
    n: int


@dataclass
class Trace:
    """Every value of one step: tensor id -> batch-first array, gradient id -> (N,) exponents."""

    values: dict[int, np.ndarray]
    exps: dict[int, np.ndarray]
    stats: StepStats


class Trainer:
    """Run a compiled training plan on batches: ``train_step``, ``predict``, ``evaluate``, state I/O.

    Parameters
    ----------
    plan : the ir.Plan to execute (its trainable tensors are copied; the plan is left untouched).
    update_weight, update_bias : global switches ANDed with every update op's own flags (e.g. to compare
        "bias only" against the plan's scheme without recompiling).
    recipe : optional :class:`~device_agent.engine.recipe.Recipe` (accumulation, momentum, weight residuals,
        lr schedule). A plan that carries a recipe (plan v2 RECIPE section, ``recipe.RecipePlan``) trains with
        it, as the firmware does; an explicit ``recipe`` is for plans without one (benchmarks), and one that
        differs from the plan's raises ValueError. No recipe anywhere: the plan's default step. With a recipe,
        a batch of N samples is N device steps at batch 1: samples accumulate, and every ``accum_steps``-th
        sample applies the update (a batch may cross that boundary; it is split there).
    """

    def __init__(self, plan: ir.Plan, update_weight: bool = True, update_bias: bool = True,
                 recipe: Recipe | None = None) -> None:
        self.plan = plan
        self.tensors = {t.id: t for t in plan.tensors}
        for t in plan.tensors:
            if t.kind in (ir.Kind.CONST, ir.Kind.TRAINABLE) and t.data is None:
                raise ValueError(f"plan tensor {t.id} ({t.name}) is {t.kind.name} but has no data")
        for op in plan.ops:
            op.check()
        self.consts = {t.id: t.data for t in plan.tensors if t.kind == ir.Kind.CONST and t.data is not None}
        self.params = {t.id: np.array(t.data, copy=True) for t in plan.tensors if t.kind == ir.Kind.TRAINABLE}
        self.update_weight = update_weight
        self.update_bias = update_bias
        self.step = 0  # uint32 update counter, seeds the stochastic rounding
        carried = plan_recipe(plan)
        if carried is not None:
            check_plan_recipe(plan)
            if recipe is not None and recipe.normalized() != carried.recipe.normalized():
                raise ValueError(f"plan {plan.name!r} carries the recipe {carried.recipe}; the explicit recipe "
                                 f"{recipe} conflicts with it (pass recipe=None to train with the plan's)")
            recipe = carried.recipe
        self.recipe = recipe if recipe is not None and recipe.active else None
        self.opt_state: dict[tuple[int, str], np.ndarray] = {}  # (tensor id, "acc"|"mom"|"frac") -> state
        self.pending = 0  # samples accumulated since the last applied update (recipe only)
        if self.recipe is not None and any(op.type == ir.OpType.EMBEDDING_UPDATE for op in plan.ops):
            raise ValueError("the training recipe supports CONV2D_UPDATE plans only (this plan has EMBEDDING_UPDATE)")

    # ---- execution -----------------------------------------------------------------------------------------

    def _store(self, x: np.ndarray) -> dict[int, np.ndarray]:
        store = dict(self.consts)
        store.update(self.params)
        store[self.plan.input_id] = check_input(self.tensors[self.plan.input_id], x)
        return store

    def _labels(self, y: np.ndarray, n: int) -> np.ndarray:
        y = np.asarray(y)
        k = self.tensors[self.plan.logits_id].shape[0]
        if y.shape not in ((n,), (n, 1)) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be integers of shape ({n},), got {y.dtype} {y.shape}")
        y = y.reshape(n).astype(np.int32)
        if n and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"labels must be class indices in [0, {k}), got range [{y.min()}, {y.max()}]")
        return y

    def trace_step(self, x: np.ndarray, y: np.ndarray, lr: float, _apply: bool | None = None) -> Trace:
        """One training step like :meth:`train_step`, returning every intermediate value (for test vectors)."""
        lr_mant_exp(lr)  # NOTE: reject a bad learning rate before any op runs
        if self.recipe is not None and _apply is None:
            if len(x) > self.recipe.accum_steps - self.pending:
                raise ValueError(f"trace_step with a recipe takes at most {self.recipe.accum_steps - self.pending} "
                                 f"samples (up to the next update), got {len(x)}; use train_step")
            _apply = self.pending + len(x) == self.recipe.accum_steps
        lr_me = None
        if self.recipe is not None:
            r = self.recipe
            lr_me = scaled_lr(*per_sample_lr(*lr_mant_exp(lr), r.accum_steps), lr_factor_q15(self.step, r))
        store = self._store(x)
        n = store[self.plan.input_id].shape[0]
        if n < 1:
            raise ValueError("train_step needs at least one sample, got an empty batch")
        labels = self._labels(y, n)
        store[self.plan.label_id] = labels.reshape(n, 1)
        exps: dict[int, np.ndarray] = {}
        loss, correct = np.zeros(n), np.zeros(n, bool)
        for op in self.plan.ops:
            if op.type in UPDATE_OPS and self.recipe is not None:
                recipe_update(op, self.tensors, store, exps, self.opt_state, self.recipe, lr_me, bool(_apply),
                              self.step, self.update_weight, self.update_bias)
            elif op.type in UPDATE_OPS:
                update_op(op, self.tensors, store, exps, lr, self.step, self.update_weight, self.update_bias)
            elif op.type in ir.BACKWARD_OPS:
                lo, ok = backward_op(op, self.tensors, store, exps, labels)
                if lo.size:
                    loss, correct = lo, ok
            else:
                forward_op(op, self.tensors, store)
        for tid in self.params:
            self.params[tid] = store[tid]
        if self.recipe is not None:
            self.pending = 0 if _apply else self.pending + n
        if self.recipe is None or _apply:
            self.step = (self.step + 1) & 0xFFFFFFFF
        return Trace(store, exps, StepStats(float(loss.mean()), int(correct.sum()), n))

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepStats:
        """Forward, loss, backward and update on one batch; N = 1 is the device's step bit for bit.

        Parameters
        ----------
        x : (N, *input shape) int8 (or int32 token ids); y : (N,) int class labels.
        lr : learning rate (> 0); a batch of N applies ``lr / N`` to the aligned sum of per-sample gradients.

        Returns
        -------
        StepStats with the mean loss, the number of correct predictions (before the update) and N.
        """
        if self.recipe is None:
            return self.trace_step(x, y, lr).stats
        i, n, loss, correct = 0, len(x), 0.0, 0
        while i < n:  # NOTE: chunks end at accumulation boundaries; weights are fixed within a chunk
            j = min(n, i + self.recipe.accum_steps - self.pending)
            st = self.trace_step(x[i:j], np.asarray(y)[i:j], lr, self.pending + j - i == self.recipe.accum_steps).stats
            loss, correct, i = loss + st.loss * st.n, correct + st.correct, j
        return StepStats(loss / max(n, 1), correct, n)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward only with the current weights: (N, *input shape) -> (N, K, 1, 1) int8."""
        store = self._store(x)
        for op in self.plan.forward_ops:
            forward_op(op, self.tensors, store)
        return store[self.plan.logits_id]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted classes (N,) int64: argmax of the int8 logits (first max wins, as on the device)."""
        lg = self.logits(x)
        return lg.reshape(lg.shape[0], -1).argmax(axis=1)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
        """Accuracy in [0, 1] over (x, y), computed ``batch`` samples at a time."""
        n = len(x)
        labels = self._labels(y, n)
        if n == 0:
            raise ValueError("evaluate needs at least one sample, got none")
        hits = sum(int((self.predict(x[i:i + batch]) == labels[i:i + batch]).sum()) for i in range(0, n, batch))
        return hits / n

    # ---- state ---------------------------------------------------------------------------------------------

    def trainable_state(self) -> dict[int, np.ndarray]:
        """Copies of the trainable tensors by id."""
        return {tid: v.copy() for tid, v in self.params.items()}

    def load_trainable(self, state: dict[int, np.ndarray]) -> None:
        """Replace trainable tensors (a subset is fine); ids, shapes and dtypes must match the plan. Resets the
        recipe's optimizer state (a new model version)."""
        for tid, v in state.items():
            if tid not in self.params:
                raise KeyError(f"tensor {tid} is not trainable in plan {self.plan.name!r} "
                               f"(trainable ids: {sorted(self.params)})")
            want = self.params[tid]
            v = np.asarray(v)
            if v.shape != want.shape or v.dtype != want.dtype:
                raise ValueError(f"tensor {tid} ({self.tensors[tid].name}) expects {want.dtype} {want.shape}, "
                                 f"got {v.dtype} {v.shape}")
        for tid, v in state.items():
            self.params[tid] = np.array(v, copy=True)
        # NOTE: a recipe's momentum, accumulated samples and residuals belong to the old values (the firmware
        # zeroes its optimizer region on a model update too); the update counter keeps counting.
        self.opt_state.clear()
        self.pending = 0

    def state_hash(self) -> str:
        """sha256 (hex) over the trainable tensors in id order, each as little-endian bytes."""
        h = hashlib.sha256()
        for tid in sorted(self.params):
            v = self.params[tid]
            h.update(np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("<")).tobytes())
        return h.hexdigest()
