"""Training recipe (opt-in): gradient accumulation at batch 1, fixed-point momentum, weight residuals, lr schedule.

The default engine step (``Trainer(recipe=None)``) is untouched: golden vectors and firmware keep matching. A
:class:`Recipe` adds per-trainable-element optimizer state held in SRAM beside the weights (never in the arena),
all integer (docs/engine.md, "Training recipe"):

- one int32 buffer per trained element: per-sample fixed-point updates summed over ``accum_steps`` samples (a
  mini-batch at N = 1); with momentum it is the heavy-ball buffer itself: after each applied update it keeps
  ``v = (v * beta_q15 + 2**14) >> 15`` (``beta_q15 = round(beta 2**15)``), so ``v = beta v_prev + sum d``;
- ``frac`` int8/int16: the sub-LSB part of each trained int8 weight (``frac_bits`` 8 or 16), so tiny updates are
  kept instead of rounded away (the weight is ``w + frac 2**-frac_bits`` in LSBs, deterministically rounded);
- an lr schedule (linear warm-up, then cosine to ``lr_min``) evaluated from integers with a 65-entry Q15 table;
  each sample adds with the task's rate divided by ``accum_steps`` in integers (:func:`per_sample_lr`).

It refuses float state: floats appear only in :meth:`Recipe.__post_init__`-style conversions done once on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import ir
from .qmath import WEIGHT_MAX, WEIGHT_MIN, rng_u32, rshift_round, stochastic_shift

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
ACC_BITS_W = 16  # weight acc/mom units: 2**-16 weight LSB (int32: +-32768 LSB)
ACC_BITS_B = 12  # bias acc/mom units: 2**-12 bias LSB (per-sample bias steps are often < 1 LSB; int32 still holds
# +-524288 LSB, far above any bias step; docs/engine.md "Diagnosis at 10k")
# Bits of a per-sample sum (tf_recipe.h): weights |sum g (x - zx)| <= 32768 px x 128 x 255 < 2**30, bias
# |sum g| <= 2**22; fixed_delta refuses a shift that could take sum x mult past 2**62 (keyed by ACC_BITS_*)
ACC_MAX_BITS = {ACC_BITS_W: 30, ACC_BITS_B: 22}
# 0.5 (1 + cos(pi i / 64)) in Q15, i = 0..64: the device's cosine table (generated here, copied to C verbatim)
COS_Q15 = tuple(round(32768 * 0.5 * (1 + math.cos(math.pi * i / 64))) for i in range(65))


@dataclass(frozen=True)
class Recipe:
    """Optimizer options; every field is an integer or converts to one on the host.

    Parameters
    ----------
    accum_steps : samples per update (B >= 1); each sample's update is ``lr / B`` scaled.
    momentum : heavy-ball beta in [0, 1) (0: no momentum buffer).
    frac_bits : 0 (stochastic rounding to int8, the default engine's rule), 8 or 16 (weight residual bits).
    warmup : update steps of linear warm-up (0: none).
    total : update steps of the cosine decay after warm-up ends at ``total`` (0: constant lr after warm-up).
    lr_min_q15 : floor of the schedule as a Q15 fraction of the peak lr.
    """

    accum_steps: int = 1
    momentum: float = 0.0
    frac_bits: int = 0
    warmup: int = 0
    total: int = 0
    lr_min_q15: int = 0

    def __post_init__(self) -> None:
        errs = []
        if not (isinstance(self.accum_steps, int) and 1 <= self.accum_steps <= 65535):
            errs.append(f"accum_steps: must be an int in [1, 65535], got {self.accum_steps!r}")
        if not (0.0 <= float(self.momentum) < 1.0):
            errs.append(f"momentum: must be in [0, 1), got {self.momentum!r}")
        if self.frac_bits not in (0, 8, 16):
            errs.append(f"frac_bits: must be 0, 8 or 16, got {self.frac_bits!r}")
        if self.warmup < 0 or self.total < 0 or (self.total and self.total <= self.warmup):
            errs.append(f"warmup/total: need 0 <= warmup < total (or total = 0), got {self.warmup}/{self.total}")
        if not 0 <= self.lr_min_q15 <= 32768:
            errs.append(f"lr_min_q15: must be in [0, 32768], got {self.lr_min_q15}")
        if 0.0 <= float(self.momentum) < 1.0 and round(float(self.momentum) * 32768) > 32767:
            errs.append(f"momentum: rounds to 1.0 in Q15 (beta_q15 = 32768), use at most 0.99997, got {self.momentum!r}")
        if self.warmup > 2**32 - 1 or self.total > 2**32 - 1:
            errs.append(f"warmup/total: must fit uint32, got {self.warmup}/{self.total}")
        if errs:
            raise ValueError("; ".join(errs))

    @property
    def beta_q15(self) -> int:
        return round(float(self.momentum) * 32768)

    @property
    def stateful(self) -> bool:
        """True when updates go through optimizer state (anything but the default engine step)."""
        return self.accum_steps > 1 or self.beta_q15 > 0 or self.frac_bits > 0

    def normalized(self) -> Recipe:
        """The same options with ``momentum = beta_q15 / 2**15``: what a plan carries (equal recipes compare equal)."""
        return Recipe(self.accum_steps, self.beta_q15 / 32768, self.frac_bits, self.warmup, self.total,
                      self.lr_min_q15)

    @property
    def active(self) -> bool:
        """False for ``Recipe()``-like options that change nothing: the default engine step applies then."""
        return self.stateful or bool(self.warmup or self.total)

    def state_bytes(self, n_weight: int, n_bias: int) -> int:
        """SRAM bytes of optimizer state for ``n_weight`` trained int8 weights and ``n_bias`` int32 biases.

        >>> Recipe(accum_steps=4, momentum=0.9, frac_bits=8).state_bytes(100, 10)
        540
        """
        per = 4 * (self.accum_steps > 1 or self.beta_q15 > 0)  # one int32 buffer (B = 1, no momentum: transient)
        return (per + self.frac_bits // 8) * n_weight + per * n_bias


def lr_factor_q15(u: int, r: Recipe) -> int:
    """Schedule factor in Q15 at update step ``u`` (0-based): warm-up ``(u+1) 2**15 // warmup``, then cosine.

    Cosine phase: ``p = (u - warmup) 2**16 // (total - warmup)`` (capped at 2**16), ``i = p >> 10``,
    ``c = COS[i] + (((COS[i+1] - COS[i]) (p & 1023) + 512) >> 10)``, factor ``lr_min + ((2**15 - lr_min) c + 2**14)
    >> 15``. Integer only.

    >>> lr_factor_q15(0, Recipe(warmup=4, total=12)), lr_factor_q15(4, Recipe(warmup=4, total=12))
    (8192, 32768)
    """
    if u < r.warmup:
        return ((u + 1) << 15) // r.warmup
    if not r.total:
        return 32768
    p = min(((u - r.warmup) << 16) // (r.total - r.warmup), 1 << 16)
    i, f = p >> 10, p & 1023
    c = COS_Q15[i] if i == 64 else COS_Q15[i] + (((COS_Q15[i + 1] - COS_Q15[i]) * f + 512) >> 10)
    return r.lr_min_q15 + (((32768 - r.lr_min_q15) * c + (1 << 14)) >> 15)


def scaled_lr(lr_m: int, lr_e: int, f_q15: int) -> tuple[int, int] | None:
    """``(lr_m, lr_e)`` times a Q15 factor, renormalised to a mantissa in [2**14, 2**15]; None when the factor is 0.

    >>> scaled_lr(16384, -14, 16384)
    (16384, -15)
    """
    if f_q15 <= 0:
        return None
    m = lr_m * f_q15
    sh = m.bit_length() - 15
    m = int(rshift_round(m, sh))
    return m, lr_e - 15 + sh


def per_sample_lr(lr_m: int, lr_e: int, accum_steps: int) -> tuple[int, int]:
    """The per-sample rate ``(lr_m, lr_e) / B`` in integers, renormalised to a 15-bit mantissa.

    A device receives the task's rate as ``mant_exp(lr)`` (as for the default step) and divides it here:
    ``q = (lr_m 2**15 + B // 2) // B``, ``sh = bitlen(q) - 15``, ``(rshift_round(q, sh), lr_e - 15 + sh)``.

    >>> per_sample_lr(20000, -20, 1), per_sample_lr(16384, -14, 4)
    ((20000, -20), (16384, -16))
    """
    q = ((lr_m << 15) + accum_steps // 2) // accum_steps
    sh = q.bit_length() - 15
    return int(rshift_round(q, sh)), lr_e - 15 + sh


def fixed_delta(acc: np.ndarray, mult: np.ndarray, exp: np.ndarray, bits: int) -> np.ndarray:
    """One sample's update ``acc * mult * 2**exp`` in units of ``2**-bits`` LSB, round half up, saturated to int32.

    ``acc`` int64 per-sample sums (|acc| < 2**40), ``mult`` < 2**16, all broadcast.
    """
    exp = np.asarray(exp, np.int64)
    m_bits = np.frexp(np.abs(np.asarray(mult, np.int64)).astype(np.float64))[1]  # bit_length (mult < 2**53)
    reach = exp + bits + ACC_MAX_BITS[bits] + m_bits
    if reach.size and int(reach.max()) > 62:
        raise ValueError(f"recipe update: a per-sample sum x mult shifted left by exponent + {bits} bits could pass "
                         "2**62 (int64; the firmware refuses it too)")
    v = np.clip(np.asarray(acc, np.int64) * np.asarray(mult, np.int64), -(1 << 56), 1 << 56)
    return np.clip(rshift_round(v, -(exp + bits)), INT32_MIN, INT32_MAX)


def sat_add32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int32 saturating add (int64 in, int64 out)."""
    return np.clip(np.asarray(a, np.int64) + np.asarray(b, np.int64), INT32_MIN, INT32_MAX)


def momentum_decay(v: np.ndarray, beta_q15: int) -> np.ndarray:
    """After an applied update: ``v = rshift_round(v * beta_q15, 15)`` (``beta = 0``: the accumulator empties)."""
    return rshift_round(np.asarray(v, np.int64) * beta_q15, 15)


def apply_weight(w: np.ndarray, frac: np.ndarray | None, v: np.ndarray, frac_bits: int, step: int,
                 tensor_id: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Subtract ``v`` (units ``2**-ACC_BITS_W`` LSB) from int8 weights with their residual.

    ``frac_bits = 0``: ``w - stochastic_shift(v, 16, rng_u32(step, tensor_id, flat_index))``, clamped to
    [-127, 127]. ``frac_bits = F > 0``: ``t = (w << 16) + (frac << (16 - F)) - v``; ``w' = clamp(rshift_round(t,
    16))``; ``frac' = clamp(rshift_round(t - (w' << 16), 16 - F), -2**(F-1), 2**(F-1) - 1)``.
    """
    w64 = np.asarray(w, np.int64)
    v = np.asarray(v, np.int64)
    if frac_bits == 0:
        rnd = rng_u32(step, tensor_id, np.arange(w64.size, dtype=np.int64).reshape(w64.shape))
        return np.clip(w64 - stochastic_shift(v, ACC_BITS_W, rnd), WEIGHT_MIN, WEIGHT_MAX).astype(np.int8), None
    t = (w64 << ACC_BITS_W) + (np.asarray(frac, np.int64) << (ACC_BITS_W - frac_bits)) - v
    w_new = np.clip(rshift_round(t, ACC_BITS_W), WEIGHT_MIN, WEIGHT_MAX)
    half = 1 << (frac_bits - 1)
    f_new = np.clip(rshift_round(t - (w_new << ACC_BITS_W), ACC_BITS_W - frac_bits), -half, half - 1)
    return w_new.astype(np.int8), f_new.astype(np.int8 if frac_bits == 8 else np.int16)


def apply_bias(b: np.ndarray, v: np.ndarray, bits: int = ACC_BITS_B) -> np.ndarray:
    """``b - rshift_round(v, bits)`` saturated to int32 (``bits``: the spec's ``ACC_BITS_B``)."""
    return np.clip(np.asarray(b, np.int64) - rshift_round(v, bits), INT32_MIN, INT32_MAX).astype(np.int32)


# ---- the recipe in the plan (docs/engine.md "Training recipe", plan v2 RECIPE section) ---------------------


@dataclass(frozen=True)
class OptSlot:
    """Where one CONV2D_UPDATE keeps its optimizer state: byte offsets into the optimizer region, -1 when absent.

    ``wbuf_off``: int32 per trained weight; ``bbuf_off``: int32 per bias (``C_out``); ``frac_off``: int8/int16
    residual per trained weight. Trained weights are stored compactly in C order of ``(c, j < k_c, kh, kw)``.
    """

    op_index: int
    wbuf_off: int = -1
    bbuf_off: int = -1
    frac_off: int = -1


@dataclass(frozen=True)
class PlanRecipe:
    """What a plan's RECIPE section carries: the options, the optimizer region's size and one slot per update op."""

    recipe: Recipe
    optimizer_bytes: int
    slots: tuple[OptSlot, ...] = ()


@dataclass(eq=True)
class RecipePlan(ir.Plan):
    """An :class:`ir.Plan` that carries a training recipe (plan v2 RECIPE section); the Trainer runs it with it.

    NOTE: a subclass, not a field of ``ir.Plan``, so that plans without a recipe stay exactly what they were.
    """

    recipe: PlanRecipe | None = field(default=None)


def plan_recipe(plan: ir.Plan) -> PlanRecipe | None:
    """The recipe a plan carries (None for a plain plan)."""
    return getattr(plan, "recipe", None)


def trained_weights(op: ir.Op, w_shape: tuple[int, ...]) -> int:
    """Trained int8 weights of one CONV2D_UPDATE: ``KH KW sum_c min(max(k - g(c) C_in/G, 0), C_in/G)``."""
    k = int(op.attrs["k"])
    if not (op.attrs["update_weight"] and k > 0):
        return 0
    c_out, cin_g, kh, kw = w_shape
    per_group = c_out // int(op.attrs["groups"])
    return kh * kw * sum(min(max(k - (c // per_group) * cin_g, 0), cin_g) for c in range(c_out))


def layout_optimizer(plan: ir.Plan, recipe: Recipe) -> PlanRecipe:
    """The canonical optimizer region of ``plan`` under ``recipe`` (the compiler's layout; runtimes check it).

    Update ops in plan order; per op: the weight buffer (4 B per trained weight, when ``B > 1`` or momentum),
    the bias buffer (4 B per bias, same condition, when the op updates biases), the weight residuals (F / 8 B
    per trained weight, when F > 0), each padded to 4 bytes. For example, one 1x1 conv of 10 outputs on 4 trained
    inputs with biases, B = 4, momentum and F = 8: wbuf at 0 (160 B), bbuf at 160 (40 B), frac at 200 (40 B),
    240 bytes in all (= ``Recipe.state_bytes(40, 10)``).
    """
    if any(op.type == ir.OpType.EMBEDDING_UPDATE for op in plan.ops) and recipe.active:
        raise ValueError("the training recipe supports CONV2D_UPDATE plans only (this plan has EMBEDDING_UPDATE)")
    buf = recipe.accum_steps > 1 or recipe.beta_q15 > 0
    off, slots = 0, []
    for i, op in enumerate(plan.ops):
        if op.type != ir.OpType.CONV2D_UPDATE:
            continue
        nw = trained_weights(op, plan.tensors[op.inputs[2]].shape)
        nb = plan.tensors[op.inputs[3]].shape[0] if op.attrs["update_bias"] else 0
        offs = []
        for present, size in ((buf and nw > 0, 4 * nw), (buf and nb > 0, 4 * nb),
                              (recipe.frac_bits > 0 and nw > 0, nw * recipe.frac_bits // 8)):
            offs.append(off if present else -1)
            off += (size + 3) // 4 * 4 if present else 0
        slots.append(OptSlot(i, *offs))
    return PlanRecipe(recipe, off, tuple(slots))


def with_recipe(plan: ir.Plan, recipe: Recipe | None) -> ir.Plan:
    """``plan`` carrying ``recipe`` (a :class:`RecipePlan` sharing its tensors and ops); ``plan`` itself for None
    or an inactive recipe (:attr:`Recipe.active`), which is the default step exactly."""
    if recipe is None or not recipe.active:
        return plan
    fields = {f: getattr(plan, f) for f in ("tensors", "ops", "input_id", "label_id", "logits_id", "arena_bytes",
                                            "scheme", "name")}
    return RecipePlan(**fields, recipe=layout_optimizer(plan, recipe.normalized()))


def check_plan_recipe(plan: ir.Plan) -> None:
    """Raise ValueError unless the plan's recipe slots are the canonical layout (what a runtime accepts)."""
    pr = plan_recipe(plan)
    if pr is None:
        return
    want = layout_optimizer(plan, pr.recipe)
    if want != pr:
        raise ValueError(f"plan {plan.name!r}: optimizer layout {pr.slots} / {pr.optimizer_bytes} B differs from "
                         f"the canonical {want.slots} / {want.optimizer_bytes} B: recompile with `tinyfleet compile`")


def optimizer_region(plan: ir.Plan, state: dict) -> bytes:
    """The device's optimizer region (``optimizer_bytes``, little-endian) holding a Trainer's recipe state
    (``Trainer.opt_state``): per slot the trained elements of each buffer, compact in C order; b"" without a
    recipe. What a board's region holds after the same samples (tests/firmware compare it byte for byte)."""
    from .update import channel_mask

    pr = plan_recipe(plan)
    if pr is None:
        return b""
    buf = "mom" if pr.recipe.beta_q15 else "acc"
    out = bytearray(pr.optimizer_bytes)
    for sl in pr.slots:
        op = plan.ops[sl.op_index]
        w, b = plan.tensors[op.inputs[2]], plan.tensors[op.inputs[3]]
        k = int(op.attrs["k"])
        mask = np.broadcast_to(channel_mask(w.shape, int(op.attrs["groups"]), k)[:, :, None, None], w.shape)
        fdt = "<i1" if pr.recipe.frac_bits == 8 else "<i2"
        for off, key, dt, sel, shape in ((sl.wbuf_off, (w.id, buf), "<i4", mask, w.shape),
                                         (sl.bbuf_off, (b.id, buf), "<i4", None, b.shape),
                                         (sl.frac_off, (w.id, "frac"), fdt, mask, w.shape)):
            if off < 0:
                continue
            arr = np.asarray(state.get(key, np.zeros(shape, np.int64)))
            raw = (arr[sel] if sel is not None else arr.reshape(-1)).astype(dt).tobytes()
            out[off:off + len(raw)] = raw
    return bytes(out)
