"""Personalization methods compared on one fleet run, new users, and continual (prequential) evaluation.

The fleet run records the global model after every round; this module replays, per device, what each
personalization method (device_agent/engine/personal.py, the same code a device runs) would have built on
that sequence of global models from the device's own samples, so every method is measured on the same
federated run. Four measurements:

- :func:`compare_methods` — final held-out accuracy per device for ``global``, ``local`` (the device alone)
  and each method, the buffer holding the device's whole training slice from round 1 (as in the fleet run);
- :func:`new_users` — devices that never joined the fleet get the final global model and personalize for N
  steps; compared with N local steps from the initial model and with the global model alone;
- :func:`select_per_device` — each device picks global, local-only or a method by its own validation data
  (host-only: the boards run one configured method);
- :func:`prequential` — each device's training slice is a stream in time order, one chunk per round: each
  chunk is first predicted by the model the device holds (test), then added to its buffer (train), then the
  device personalizes on the next global model. Optionally with drift: halfway, the stream switches to
  another user's data; forgetting is the accuracy lost on the first user's held-out data.

NOTE (simplification, stated in docs/personalization.md): the global models come from the fleet run, whose
devices held their whole slice from round 1; only the local and personal models see the stream as a stream.
This module trains and evaluates on the host engine; it does no I/O and knows nothing of MQTT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from device_agent.buffer import SampleBuffer
from device_agent.engine.personal import Personalizer, PersonalSpec
from device_agent.engine.trainer import Trainer


@dataclass
class Plain:
    """What the comparison needs of the fleet config (fleet/sim/config.py fills it)."""

    local_steps: int
    lr: float
    steps: int  # personalization steps after each update
    personal_lr: float
    lam_q15: int
    seed: int
    lr_by: dict[str, float] = field(default_factory=dict)  # lr per model ("local" or a method) chosen by tune_lr
    lr_grid: tuple[float, ...] = ()  # tune_lr's multipliers (with_tuned_lr); (): the configured lrs as they are
    validation: str = "last"  # which samples a device holds back for tune_lr and select (validation_indices)
    validation_gap: int = 0  # samples dropped before each held-back tail (validation_indices)

    def lr_of(self, model: str) -> float:
        """The lr ``model`` ("local" or a method) trains with: tune_lr's choice, else the configured one."""
        return self.lr_by.get(model, self.lr if model == "local" else self.personal_lr)


def _acc(trainer: Trainer, state: dict, x: np.ndarray, y: np.ndarray) -> float | None:
    if not len(y):
        return None
    trainer.load_trainable(state)
    return trainer.evaluate(x, y)


class _Device:
    """One device's models under every method, advanced one global model at a time."""

    def __init__(self, trainer: Trainer, initial: dict, methods: Sequence[str], p: Plain, index: int, buf):
        self.t, self.p, self.i, self.buf = trainer, p, index, buf
        self.local = dict(initial)
        self.pers = {m: Personalizer(trainer.plan, PersonalSpec(m, p.steps, p.lr_of(m), p.lam_q15))
                     for m in methods}
        self.glob = dict(initial)

    def models(self) -> dict[str, dict]:
        out = {"global": self.glob, "local": self.local}
        out.update({m: pz.model(self.glob) for m, pz in self.pers.items()})
        return out

    def advance(self, r: int, reference: dict) -> None:
        """Round ``r``: the local model trains ``local_steps``; each method personalizes on ``reference``."""
        self.glob = reference
        if len(self.buf) == 0:
            return
        rng = np.random.default_rng([self.p.seed + self.i, r])
        self.t.load_trainable(self.local)
        for _ in range(self.p.local_steps):
            self.t.train_step(*self.buf.batch(1, rng), self.p.lr_of("local"))
        self.local = self.t.trainable_state()
        for k, (_m, pz) in enumerate(self.pers.items()):
            prng = np.random.default_rng([self.p.seed + self.i, r, k + 1])
            pz.update(self.t, reference, lambda _s, g=prng: self.buf.batch(1, g))


def compare_methods(plan, initial: dict, globals_: Sequence[dict], slices, methods: Sequence[str],
                    p: Plain) -> dict[str, list[float | None]]:
    """Final held-out accuracy per device for global, local and each method (whole slice buffered).

    Parameters
    ----------
    initial : every trainable tensor of the plan's initial model (id -> values).
    globals_ : the full trainable state after each round (shared from the fleet, personal from ``initial``).
    slices : fleet/sim/baselines.DeviceSlice per device.
    """
    t = Trainer(plan)
    out: dict[str, list[float | None]] = {k: [] for k in ("global", "local", *methods)}
    for i, d in enumerate(slices):
        buf = SampleBuffer(max(1, len(d.y_train)), tuple(d.x_train.shape[1:]), d.x_train.dtype, seed=p.seed + i)
        if len(d.y_train):
            buf.add(d.x_train, d.y_train)
        dev = _Device(t, initial, methods, p, i, buf)
        for r, g in enumerate(globals_, start=1):
            dev.advance(r, g)
        for name, state in dev.models().items():
            out[name].append(_acc(t, state, d.x_test, d.y_test))
    return out


def stream_order(times: np.ndarray | None, n: int) -> np.ndarray:
    """The storage indices of a device's ``n`` training samples in time order (``times``: each one's place in the
    stream, ``DeviceData.t_train``; None: storage order is time order)."""
    return np.arange(n) if times is None else np.argsort(np.asarray(times), kind="stable")


VALIDATION_RULES = ("last", "per_label", "stored")  # personalization.validation (fleet/schema.py)


def validation_indices(y: np.ndarray, times: np.ndarray | None, fraction: float, rule: str = "last",
                       gap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Which of a device's training samples it holds back as validation: ``(kept, held back)`` storage indices.

    ``times``: each sample's place in the device's stream (smaller = earlier; None: storage order is time order).
    Rules:

    - ``last``: the last ``k = max(1, round(n * fraction))`` samples in time order;
    - ``per_label``: per label, the last ``floor(n_c * fraction + 0.5)`` of that label's samples in time order,
      at most ``n_c - 1`` (a label keeps a training sample); its validation then holds every label the device
      trains on, in about its training proportions, each label's latest samples (one time boundary per label, so
      overlapping windows leak across it only once);
    - ``stored``: the last ``k`` in storage order (sessions 8-9: the built-in scenarios store a device's stream
      shuffled, so this is a random holdout, whose overlapping neighbours sit on both sides).

    ``gap``: for ``last`` and ``per_label``, the samples just before each held-back tail (time order) are in
    neither part, as the scenarios drop the windows that overlap their train/test cut (watch: 1); a label keeps
    at least one training sample, so a small label drops fewer. A device with fewer than 4 samples holds none
    back. Both index arrays are ascending.
    """
    if rule not in VALIDATION_RULES:
        raise ValueError(f"validation rule: expected one of {', '.join(VALIDATION_RULES)}, got {rule!r}")
    n = len(y)
    if times is not None and len(times) != n:
        raise ValueError(f"times: expected one per sample ({n}), got {len(times)}")
    if n < 4:
        return np.arange(n), np.zeros(0, np.int64)
    seq = np.arange(n) if rule == "stored" else stream_order(times, n)
    held, dropped = [], []
    for part in ([seq[y[seq] == c] for c in np.unique(y)] if rule == "per_label" else [seq]):
        if rule == "per_label":  # part: one label's samples in time order
            k = min(int(np.floor(len(part) * fraction + 0.5)), len(part) - 1)
        else:
            k = max(1, round(n * fraction))
        g = 0 if rule == "stored" else max(0, min(gap, len(part) - k - 1))
        held.append(part[len(part) - k:])
        dropped.append(part[len(part) - k - g:len(part) - k])
    val = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(n), np.concatenate([val, *dropped])), val


def validation_split(slices, fraction: float, rule: str = "last", times: Sequence | None = None,
                     gap: int = 0) -> list:
    """Each device's held-back validation data (:func:`validation_indices`; ``times`` per device, None: storage
    order is time order) as the slice's test part, the rest its training part (kept in storage order); the device's
    real test slice is not in it. A device with fewer than 4 training samples has no validation data (its accuracy
    is then None)."""
    from fleet.sim.baselines import DeviceSlice

    out = []
    for i, d in enumerate(slices):
        keep, val = validation_indices(d.y_train, None if times is None else times[i], fraction, rule, gap)
        out.append(DeviceSlice(d.device_id, d.x_train[keep], d.y_train[keep], d.x_train[val], d.y_train[val]))
    return out


def tune_lr(plan, initial: dict, globals_: Sequence[dict], slices, methods: Sequence[str], p: Plain,
            grid: Sequence[float], fraction: float = 0.25, times: Sequence | None = None) -> tuple[
                dict[str, float], dict[str, list], dict[str, list]]:
    """The lr grid rule, the same for local-only and every method: replay each on the devices' validation split
    (:func:`validation_split` by ``p.validation``, ``times`` per device) with every lr in ``grid`` (multiples of
    its configured lr) and keep, per model, the one with the best mean per-device validation accuracy (ties: the
    smaller lr). Test slices are never read.

    Returns
    -------
    (lr per model: "local" and each method; validation accuracy per model, one per grid entry; validation accuracy
    per model and device at the chosen lr, "global" included: what :func:`select_per_device` chooses from).
    """
    if not grid or any(not g > 0 for g in grid):
        raise ValueError(f"lr grid: expected multipliers > 0, got {list(grid)}")
    val = validation_split(slices, fraction, p.validation, times, p.validation_gap)
    names = ("local", *methods)
    scores: dict[str, list] = {k: [] for k in names}
    per_grid = []
    for g in grid:
        q = replace(p, lr=p.lr * g, personal_lr=p.personal_lr * g, lr_by={}, lr_grid=())
        got = compare_methods(plan, initial, globals_, val, methods, q)
        per_grid.append(got)
        for k in names:
            accs = [a for a in got[k] if a is not None]
            scores[k].append(round(float(np.mean(accs)), 4) if accs else None)
    chosen, per_device = {}, {"global": per_grid[0]["global"]}
    for k in names:
        best = max(range(len(grid)), key=lambda i, k=k: (scores[k][i] or 0.0, -grid[i]))
        chosen[k] = (p.lr if k == "local" else p.personal_lr) * grid[best]
        per_device[k] = per_grid[best][k]
    return chosen, scores, per_device


def with_tuned_lr(plan, initial: dict, globals_: Sequence[dict], slices, methods: Sequence[str], p: Plain,
                  fraction: float = 0.25, times: Sequence | None = None) -> tuple[Plain, dict[str, list],
                                                                                   dict[str, list]]:
    """``p`` with ``lr_by`` chosen by :func:`tune_lr` over ``p.lr_grid`` for local-only and every method (the same
    rule for all; new users then train with the lrs chosen on the fleet's devices), the grid's mean validation
    scores and the per-device validation accuracies at the chosen lrs. No grid: ``p`` unchanged and the
    per-device validation accuracies at the configured lrs (one replay on the validation split)."""
    if not p.lr_grid:
        val = validation_split(slices, fraction, p.validation, times, p.validation_gap)
        return p, {}, compare_methods(plan, initial, globals_, val, methods, p)
    chosen, scores, per_device = tune_lr(plan, initial, globals_, slices, methods, p, p.lr_grid, fraction, times)
    return replace(p, lr_by=chosen), scores, per_device


# what select_per_device prefers on a validation tie: the cheapest on a device first (keep the global model)
SELECT_ORDER = ("global", "bias", "head", "finetune", "ditto", "local")


def select_per_device(validation: dict[str, list]) -> list[str | None]:
    """Device-side model selection (host-only today): each device keeps the model ("global", "local" or a
    method) with the best accuracy on its own validation data (:func:`tune_lr`'s per-device numbers; test data
    is not an input), ties broken toward the cheaper end of ``SELECT_ORDER``; None where it has no validation
    data (such a device keeps the global model: see :func:`selected_accuracy`)."""
    names = [k for k in SELECT_ORDER if k in validation] + sorted(k for k in validation if k not in SELECT_ORDER)
    n = len(next(iter(validation.values()))) if validation else 0
    out: list[str | None] = []
    for i in range(n):
        have = [(validation[k][i], -j, k) for j, k in enumerate(names) if validation[k][i] is not None]
        out.append(max(have)[2] if have else None)
    return out


def selected_accuracy(choice: Sequence[str | None], test: dict[str, list]) -> list[float | None]:
    """Each device's test accuracy of the model it selected (the global model where it could not select)."""
    return [test[c or "global"][i] for i, c in enumerate(choice)]


def new_users(plan, initial: dict, final: dict, slices, methods: Sequence[str], steps: int, p: Plain) -> dict[
        str, list[float | None]]:
    """Held-out users: ``global`` (final model as is), ``local`` (``steps`` from the initial model) and each
    method (``steps`` of personalization on top of the final global model), on each user's test slice."""
    t = Trainer(plan)
    out: dict[str, list[float | None]] = {k: [] for k in ("global", "local", *methods)}
    for i, d in enumerate(slices):
        out["global"].append(_acc(t, final, d.x_test, d.y_test))
        if not len(d.y_train):
            for k in ("local", *methods):
                out[k].append(None)
            continue
        buf = SampleBuffer(len(d.y_train), tuple(d.x_train.shape[1:]), d.x_train.dtype, seed=p.seed + i)
        buf.add(d.x_train, d.y_train)
        rng = np.random.default_rng([p.seed + i, 0])
        t.load_trainable(initial)
        for _ in range(steps):
            t.train_step(*buf.batch(1, rng), p.lr_of("local"))
        out["local"].append(_acc(t, t.trainable_state(), d.x_test, d.y_test))
        for k, m in enumerate(methods):
            pz = Personalizer(plan, PersonalSpec(m, steps, p.lr_of(m), p.lam_q15))
            prng = np.random.default_rng([p.seed + i, 0, k + 1])
            pz.update(t, final, lambda _s, g=prng, b=buf: b.batch(1, g))
            out[m].append(_acc(t, pz.model(final), d.x_test, d.y_test))
    return out


def _other(slices, subjects: Sequence[int], i: int) -> int:
    """The device whose stream device ``i`` drifts to: the next one (cyclic) of another subject."""
    n = len(slices)
    for k in range(1, n):
        j = (i + k) % n
        if subjects[j] != subjects[i] and len(slices[j].y_train):
            return j
    return (i + 1) % n


def prequential(plan, initial: dict, globals_: Sequence[dict], slices, subjects: Sequence[int],
                methods: Sequence[str], p: Plain, policy: str = "fifo", capacity: int = 0,
                drift: bool = False, times: Sequence | None = None) -> dict:
    """Test-then-train accuracy per round, pooled over devices, for global, local and each method.

    Each device's training slice is its stream in time order (``times``: per device, each sample's place in the
    stream, ``DeviceData.t_train``; None, or None for a device: storage order is time order), one chunk per round.

    Returns
    -------
    {"prequential": {model: [acc per round]}, "heldout": {model: [acc per round]}} and, with ``drift``,
    "drift_round" (first round on the new stream), "forgetting" {model: accuracy on the first user's held-out
    data just before the drift minus at the end}, "recovery_rounds" {model: rounds after the drift until
    prequential accuracy is back within 0.05 of its mean over the rounds before the drift, None: never}.
    """
    t = Trainer(plan)
    rounds = len(globals_)
    cut = rounds // 2 if drift else rounds
    names = ("global", "local", *methods)
    hits = {k: np.zeros(rounds) for k in names}
    seen = np.zeros(rounds)
    held = {k: np.zeros(rounds) for k in names}
    held_n = np.zeros(rounds)
    before = {k: 0.0 for k in names}
    after = {k: 0.0 for k in names}
    first_n = 0
    for i, d in enumerate(slices):
        if not len(d.y_train):
            continue
        own = np.array_split(stream_order(None if times is None else times[i], len(d.y_train)), rounds)
        j = _other(slices, subjects, i) if drift else i
        oth = np.array_split(stream_order(None if times is None else times[j], len(slices[j].y_train)), rounds)
        cap = capacity or len(d.y_train) + (len(slices[j].y_train) if drift else 0)
        buf = SampleBuffer(cap, tuple(d.x_train.shape[1:]), d.x_train.dtype, policy=policy, seed=p.seed + i)
        dev = _Device(t, initial, methods, p, i, buf)
        for r in range(rounds):
            src, idx = (d, own[r]) if r < cut else (slices[j], oth[r])
            xs, ys = src.x_train[idx], src.y_train[idx]
            test = d if r < cut else slices[j]
            models = dev.models()
            for k, st in models.items():
                if len(ys):
                    t.load_trainable(st)
                    hits[k][r] += np.sum(t.predict(xs) == ys)
            seen[r] += len(ys)
            if len(ys):
                buf.add(xs, ys)
            dev.advance(r + 1, globals_[r])
            if len(test.y_test):
                for k, st in dev.models().items():
                    held[k][r] += _acc(t, st, test.x_test, test.y_test) * len(test.y_test)
                held_n[r] += len(test.y_test)
            if drift and len(d.y_test) and r in (cut - 1, rounds - 1):
                for k, st in dev.models().items():
                    (before if r == cut - 1 else after)[k] += _acc(t, st, d.x_test, d.y_test) * len(d.y_test)
                first_n += len(d.y_test) if r == cut - 1 else 0
    res: dict = {
        "policy": policy, "capacity": capacity,
        "prequential": {k: [round(float(h / s), 4) if s else None for h, s in zip(hits[k], seen)] for k in names},
        "heldout": {k: [round(float(h / s), 4) if s else None for h, s in zip(held[k], held_n)] for k in names},
    }
    if drift and first_n:
        res["drift_round"] = cut + 1
        res["forgetting"] = {k: round((before[k] - after[k]) / first_n, 4) for k in names}
        res["recovery_rounds"] = {k: _recovery(res["prequential"][k], cut) for k in names}
    return res


def _recovery(curve: list, cut: int) -> int | None:
    pre = [a for a in curve[:cut] if a is not None]
    if not pre:
        return None
    level = float(np.mean(pre)) - 0.05
    for k, a in enumerate(curve[cut:]):
        if a is not None and a >= level:
            return k
    return None
