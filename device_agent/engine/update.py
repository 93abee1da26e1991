"""Weight updates: QAS-scaled SGD with stochastic rounding (CONV2D_UPDATE, EMBEDDING_UPDATE).

Per-sample sums are aligned to the batch's largest exponent, added, and applied once with ``lr / N``
(docs/engine.md, "Mini-batches"); with N = 1 this is the device's step exactly. Integer arithmetic only; this
module refuses float learning rates past the single ``mant_exp`` conversion.
"""

from __future__ import annotations

import math

import numpy as np

from . import ir
from .conv import ConvGeom, conv_weight_acc
from .qmath import WEIGHT_MAX, WEIGHT_MIN, check_exps, mant_exp, rng_u32, rshift_round, scaled_update

INT32_MAX = (1 << 31) - 1


def lr_mant_exp(lr: float, n: int = 1) -> tuple[int, int]:
    """The learning rate a device receives: ``mant_exp(lr / n)`` (n = batch size)."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate must be a finite number > 0, got {lr!r}")
    return mant_exp(float(lr) / n)


def align_sum(acc: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-sample sums (N, ...) with exponents (N,) -> ``sum_n rshift_round(acc_n, e_max - e_n)`` and ``e_max``."""
    e = np.asarray(e, dtype=np.int64)
    e_max = int(e.max())
    sh = (e_max - e).reshape(-1, *([1] * (acc.ndim - 1)))
    return rshift_round(acc, sh).sum(axis=0), e_max


def _mult_exp(lr_m: int, lr_e: int, qas_m, qas_e, e_y: int) -> tuple[np.ndarray, np.ndarray]:
    """``M = rshift_round(lr_m * qas_m, 15)``, ``E = lr_e + qas_e + 15 + e_y``."""
    check_exps("learning rate", lr_e)
    check_exps("qas exponent", qas_e)
    m = rshift_round(np.int64(lr_m) * np.asarray(qas_m, np.int64), 15)
    return m, lr_e + np.asarray(qas_e, np.int64) + 15 + e_y


def channel_mask(w_shape: tuple[int, ...], groups: int, k: int) -> np.ndarray:
    """(C_out, C_in/groups) bool: weight ``[c, j]`` reads input channel ``(c // (C_out/groups)) * C_in/g + j < k``."""
    c_out, cin_g = w_shape[:2]
    grp = np.arange(c_out) // (c_out // groups)
    return grp[:, None] * cin_g + np.arange(cin_g)[None, :] < k


def conv_update(g: np.ndarray, e: np.ndarray, x_saved: np.ndarray | None, zx: int, w: np.ndarray, b: np.ndarray,
                geom: ConvGeom, k: int, in_hw: tuple[int, int], qas: dict, lr: float, step: int, w_id: int,
                b_id: int, update_weight: bool = True, update_bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One QAS-SGD step of a conv's weights (first ``k`` input channels) and bias.

    Parameters
    ----------
    g : (N, C_out, OH, OW) int8 masked output gradient, e : (N,) exponents.
    x_saved : (N, k, H, W) int8 saved input channels (zero point ``zx``), or None when no weight trains.
    w : (C_out, C_in/groups, KH, KW) int8; b : (C_out,) int32.
    k : trained input channels (global index < k); in_hw : forward input (H, W).
    qas : ``qas_w_m, qas_w_e, qas_b_m, qas_b_e`` arrays (C_out,).
    step : update counter (uint32) seeding the stochastic rounding; w_id, b_id : tensor ids (rng streams).

    Returns
    -------
    New (w int8, b int32); the inputs are not modified.
    """
    n = g.shape[0]
    lr_m, lr_e = lr_mant_exp(lr, n)
    w_new, b_new = w, b
    if update_weight and k > 0:
        if x_saved is None or x_saved.shape[1] < k or x_saved.shape[2:] != tuple(in_hw):
            got = None if x_saved is None else x_saved.shape[1:]
            raise ValueError(f"CONV2D_UPDATE with k={k} needs x_saved of shape (N, >={k}, {in_hw[0]}, {in_hw[1]}), "
                             f"got {got}")
        c_in = w.shape[1] * geom.groups
        xc = np.zeros((n, c_in, *in_hw), np.int64)
        xc[:, :k] = x_saved[:, :k].astype(np.int64) - zx
        acc, e_max = align_sum(conv_weight_acc(g, xc, w.shape, geom), e)
        m, ex = _mult_exp(lr_m, lr_e, qas["qas_w_m"], qas["qas_w_e"], e_max)
        rnd = rng_u32(step, w_id, np.arange(w.size, dtype=np.int64).reshape(w.shape))
        dw = scaled_update(acc, m.reshape(-1, 1, 1, 1), ex.reshape(-1, 1, 1, 1), rnd, 255)
        upd = np.clip(w.astype(np.int64) - dw, WEIGHT_MIN, WEIGHT_MAX)
        w_new = np.where(channel_mask(w.shape, geom.groups, k)[:, :, None, None], upd, w).astype(np.int8)
    if update_bias:
        acc, e_max = align_sum(g.astype(np.int64).sum(axis=(2, 3)), e)
        m, ex = _mult_exp(lr_m, lr_e, qas["qas_b_m"], qas["qas_b_e"], e_max)
        db = scaled_update(acc, m, ex, rng_u32(step, b_id, np.arange(b.size, dtype=np.int64)), INT32_MAX)
        b_new = np.clip(b.astype(np.int64) - db, -INT32_MAX - 1, INT32_MAX).astype(np.int32)
    return w_new, b_new


def embedding_update(g: np.ndarray, e: np.ndarray, ids: np.ndarray, table: np.ndarray, qas_m: int, qas_e: int,
                     lr: float, step: int, table_id: int) -> np.ndarray:
    """QAS-SGD step of an embedding table: ``acc[ids[l], :] += g[:, 0, l]``.

    Parameters
    ----------
    g : (N, D, 1, L) int8 gradient, e : (N,) exponents; ids : (N, L) int token ids.
    table : (V, D) int8, scale ``s_table``; qas = 1 / s_table as (qas_m, qas_e).

    Returns
    -------
    New (V, D) int8 table.
    """
    n, d, _, length = g.shape
    if ids.shape != (n, length):
        raise ValueError(f"EMBEDDING_UPDATE expects ids of shape {(n, length)}, got {ids.shape}")
    acc_n = np.zeros((n, *table.shape), np.int64)
    rows = np.repeat(np.arange(n), length)
    np.add.at(acc_n, (rows, ids.reshape(-1).astype(np.int64)), g[:, :, 0, :].transpose(0, 2, 1).reshape(-1, d))
    acc, e_max = align_sum(acc_n, e)
    lr_m, lr_e = lr_mant_exp(lr, n)
    m, ex = _mult_exp(lr_m, lr_e, qas_m, qas_e, e_max)
    rnd = rng_u32(step, table_id, np.arange(table.size, dtype=np.int64).reshape(table.shape))
    dw = scaled_update(acc, m, ex, rnd, 255)
    return np.clip(table.astype(np.int64) - dw, WEIGHT_MIN, WEIGHT_MAX).astype(np.int8)


def update_op(op: ir.Op, tensors: dict[int, ir.Tensor], store: dict[int, np.ndarray], exps: dict[int, np.ndarray],
              lr: float, step: int, update_weight: bool = True, update_bias: bool = True) -> None:
    """Run one update op, replacing the trainable values in ``store`` (global flags AND the op's own flags)."""
    a, ins = op.attrs, op.inputs
    if op.type == ir.OpType.CONV2D_UPDATE:
        gid, xid, wid, bid = ins
        k = int(a["k"])
        uw = bool(a["update_weight"]) and update_weight and k > 0
        x_saved = store[xid] if uw else None
        zx = tensors[xid].zero_point if xid >= 0 else 0
        in_hw = tuple(x_saved.shape[2:]) if x_saved is not None else (0, 0)
        ub = bool(a["update_bias"]) and update_bias
        for tid in [t for t, on in ((wid, uw), (bid, ub)) if on]:  # a bias-only update leaves w in flash
            if tensors[tid].kind != ir.Kind.TRAINABLE:
                raise ValueError(f"op {op.name}: tensor {tensors[tid].name} is {tensors[tid].kind.name}, not TRAINABLE")
        store[wid], store[bid] = conv_update(
            store[gid], exps[gid], x_saved, zx, store[wid], store[bid], ConvGeom.from_attrs(a), k, in_hw, a, lr,
            step, wid, bid, uw, ub)
    elif op.type == ir.OpType.EMBEDDING_UPDATE:
        gid, iid, tid = ins
        if update_weight:
            store[tid] = embedding_update(store[gid], exps[gid], store[iid], store[tid], int(a["qas_m"]),
                                          int(a["qas_e"]), lr, step, tid)
    else:
        raise ValueError(f"op {op.name or op.type.name} is not an update op")


# ---- training recipe (opt-in, docs/engine.md "Training recipe") ----------------------------------------------


def _accumulate(state: dict, key: tuple, deltas: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Add per-sample deltas (N, ...) one sample at a time into the int32 accumulator ``state[key]`` (saturating)."""
    from .recipe import sat_add32

    a = np.asarray(state.get(key, np.zeros(shape, np.int32)), np.int64)
    for d in deltas:
        a = sat_add32(a, d)
    return a


def recipe_update(op: ir.Op, tensors: dict[int, ir.Tensor], store: dict[int, np.ndarray],
                  exps: dict[int, np.ndarray], state: dict, recipe, lr_me: tuple[int, int] | None, apply: bool,
                  step: int, update_weight: bool = True, update_bias: bool = True) -> None:
    """One CONV2D_UPDATE under a :class:`~device_agent.engine.recipe.Recipe`: accumulate, and at ``apply`` step.

    Per sample ``n``: ``d_n = rshift_round(acc_n * M, -(E_n + bits))`` (``M, E_n`` as in the default step with
    the per-sample lr ``lr_me``; ``bits`` 16 for weights, 12 for biases), added with int32 saturation into one
    buffer per tensor: the momentum buffer ``v`` when ``beta > 0`` (it already holds ``beta v_prev``), else the
    accumulator ``a``. At ``apply`` the parameter takes the buffer (``recipe.apply_weight`` / ``apply_bias``),
    then ``v = rshift_round(v * beta_q15, 15)`` (or ``a = 0``). ``lr_me = None`` (schedule factor 0): nothing is
    added. State arrays are full-shape in the reference; only trained elements count as device bytes.
    """
    from .recipe import ACC_BITS_B, ACC_BITS_W, apply_bias, apply_weight, fixed_delta, momentum_decay

    if op.type != ir.OpType.CONV2D_UPDATE:
        raise ValueError(f"the training recipe supports CONV2D_UPDATE only, got {op.name or op.type.name}")
    a = op.attrs
    gid, xid, wid, bid = op.inputs
    k = int(a["k"])
    uw = bool(a["update_weight"]) and update_weight and k > 0
    ub = bool(a["update_bias"]) and update_bias
    for tid in [t for t, on in ((wid, uw), (bid, ub)) if on]:
        if tensors[tid].kind != ir.Kind.TRAINABLE:
            raise ValueError(f"op {op.name}: tensor {tensors[tid].name} is {tensors[tid].kind.name}, not TRAINABLE")
    g, e = store[gid], np.asarray(exps[gid], np.int64)
    n = g.shape[0]
    geom = ConvGeom.from_attrs(a)
    buf = "mom" if recipe.beta_q15 else "acc"
    if uw:
        w = store[wid]
        x_saved = store[xid]
        c_in = w.shape[1] * geom.groups
        xc = np.zeros((n, c_in, *x_saved.shape[2:]), np.int64)
        xc[:, :k] = x_saved[:, :k].astype(np.int64) - tensors[xid].zero_point
        mask = channel_mask(w.shape, geom.groups, k)[:, :, None, None]
        d = np.zeros((0, *w.shape), np.int64)
        if lr_me is not None:
            acc = conv_weight_acc(g, xc, w.shape, geom)
            m, ex = _mult_exp(lr_me[0], lr_me[1], a["qas_w_m"], a["qas_w_e"], 0)
            d = fixed_delta(acc, m.reshape(1, -1, 1, 1, 1), (ex[None, :] + e[:, None]).reshape(n, -1, 1, 1, 1),
                            ACC_BITS_W) * mask
        v = _accumulate(state, (wid, buf), d, w.shape)
        if apply:
            w_new, f_new = apply_weight(w, state.get((wid, "frac"), np.zeros(w.shape, np.int64)), v * mask,
                                        recipe.frac_bits, step, wid)
            store[wid] = np.where(mask, w_new, w).astype(np.int8)
            if f_new is not None:
                state[(wid, "frac")] = f_new
            v = momentum_decay(v, recipe.beta_q15)
        state[(wid, buf)] = v.astype(np.int32)
    if ub:
        b = store[bid]
        d = np.zeros((0, *b.shape), np.int64)
        if lr_me is not None:
            acc = g.astype(np.int64).sum(axis=(2, 3))
            m, ex = _mult_exp(lr_me[0], lr_me[1], a["qas_b_m"], a["qas_b_e"], 0)
            d = fixed_delta(acc, m[None, :], ex[None, :] + e[:, None], ACC_BITS_B)
        v = _accumulate(state, (bid, buf), d, b.shape)
        if apply:
            store[bid] = apply_bias(b, v, ACC_BITS_B)
            v = momentum_decay(v, recipe.beta_q15)
        state[(bid, buf)] = v.astype(np.int32)
