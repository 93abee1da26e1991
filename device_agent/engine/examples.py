"""Hand-built training plans and a matching synthetic dataset, for tests that must not depend on the compiler.

:func:`tiny_plan` builds a small int8 classifier (frozen conv, strided conv, depthwise conv, residual add, global
pool, flatten, linear) with the backward/update ops a compiler would emit for a sparse scheme. Scales come from
calibration on :func:`tiny_dataset`; every integer attribute is derived from float32 scales by ``attrs.py``.
It refuses to be a compiler: the op list is fixed, only sizes, seed and the weight ratio vary.
"""

from __future__ import annotations

import math

import numpy as np

from . import attrs as A
from . import ir
from .conv import ConvGeom, conv_acc
from .forward import add, avgpool, conv2d, embedding
from .qmath import mant_exp

IN_SCALE = 1.0 / 32  # input real range about [-4, 4]
IN_ZP = 0
LOGIT_SCALE = 1.0 / 16  # logits real range about [-8, 8]


def tiny_dataset(n: int, seed: int = 0, in_shape: tuple[int, int, int] = (3, 8, 8), n_classes: int = 4,
                 task_seed: int = 0, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Separable synthetic images quantized like :func:`tiny_plan`'s input.

    Each class has a fixed prototype (per-channel offset + spatial pattern, drawn from ``task_seed``); a sample is
    its class prototype plus Gaussian noise (std ``noise``), quantized with ``IN_SCALE`` / ``IN_ZP``.

    Returns
    -------
    x : (n, C, H, W) int8, y : (n,) int32 labels (balanced, shuffled).
    """
    trng = np.random.default_rng(10_000 + task_seed)
    c = in_shape[0]
    proto = 0.8 * trng.standard_normal((n_classes, c, 1, 1)) + 0.6 * trng.standard_normal((n_classes, *in_shape))
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % n_classes).astype(np.int32)
    xf = proto[y] + noise * rng.standard_normal((n, *in_shape))
    x = np.clip(np.round(xf / IN_SCALE) + IN_ZP, -128, 127).astype(np.int8)
    return x, y


class _Builder:
    """Tensor/op bookkeeping plus a calibration batch pushed through each layer as it is added."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.tensors: list[ir.Tensor] = []
        self.ops: list[ir.Op] = []
        self.cal: dict[int, np.ndarray] = {}
        self.rng = rng

    def tensor(self, name: str, shape, kind: ir.Kind, dtype: ir.DType = ir.DType.INT8, scale=1.0, zp: int = 0,
               data=None) -> int:
        t = ir.Tensor(len(self.tensors), name, tuple(shape), dtype, kind, A.f32(scale), zp, data)
        self.tensors.append(t)
        return t.id

    def op(self, t: ir.OpType, ins: list[int], outs: list[int], name: str, **at) -> None:
        op = ir.Op(t, ins, outs, at, name)
        op.check()
        self.ops.append(op)

    def t(self, i: int) -> ir.Tensor:
        return self.tensors[i]

    def _out_quant(self, real: np.ndarray, relu: bool) -> tuple[float, int]:
        """ReLU outputs: [0, max] -> zp -128; otherwise the fixed logit scale with zp 0."""
        if not relu:
            return LOGIT_SCALE, 0
        top = float(np.percentile(real, 99.9)) if real.size else 1.0
        return float(A.f32(max(top, 1e-3) / 255.0)[0]), -128

    def conv(self, x: int, c_out: int, k: int, stride: int, pad: int, groups: int, trainable: bool,
             relu: bool, mask: bool, name: str) -> tuple[int, int, int, int | None, ConvGeom]:
        """Add a CONV2D calibrated on ``self.cal``; returns ids (y, w, b, mask or None) and its geometry."""
        tx = self.t(x)
        c_in, h, wd = tx.shape
        fan_in = c_in // groups * k * k
        wf = self.rng.standard_normal((c_out, c_in // groups, k, k)) * math.sqrt(2.0 / fan_in)
        wq, s_w = A.quantize_weights(wf)
        kind = ir.Kind.TRAINABLE if trainable else ir.Kind.CONST
        w = self.tensor(f"{name}.w", wq.shape, kind, scale=s_w, data=wq)
        b = self.tensor(f"{name}.b", (c_out,), kind, ir.DType.INT32, scale=tx.scale[0] * s_w,
                        data=np.zeros(c_out, np.int32))
        geom = ConvGeom(stride, stride, pad, pad, groups)
        oh, ow = geom.out_hw(h, wd, k, k)
        real = conv_acc(self.cal[x].astype(np.int64) - tx.zero_point, wq, geom) * (tx.scale[0] * s_w)[None, :, None, None]
        s_y, zy = self._out_quant(np.maximum(real, 0), relu)
        y = self.tensor(f"{name}.y", (c_out, oh, ow), ir.Kind.ACTIVATION, scale=s_y, zp=zy)
        m = self.tensor(f"{name}.mask", (c_out, oh, ow), ir.Kind.MASK, ir.DType.MASK) if mask else None
        rq = A.conv_requant(tx.scale[0], s_w, self.t(y).scale[0])
        lo = zy if relu else -128
        self.op(ir.OpType.CONV2D, [x, w, b], [y] + ([m] if mask else []), name, stride_h=stride, stride_w=stride,
                pad_h=pad, pad_w=pad, groups=groups, act_min=lo, act_max=127, **rq)
        self.cal[y] = conv2d(self.cal[x], tx.zero_point, wq, np.zeros(c_out, np.int32), zy, geom, rq["mult"],
                             rq["shift"], lo, 127)[0]
        return y, w, b, m, geom

    def save(self, x: int, k: int, name: str) -> int:
        c, h, w = self.t(x).shape
        if k == 0:
            return -1  # NOTE: bias-only update: nothing saved, CONV2D_UPDATE gets x_saved = -1
        if k >= c:
            return x  # NOTE: ratio 1 saves the tensor itself; no copy op
        s = self.tensor(name, (k, h, w), ir.Kind.ACTIVATION, scale=self.t(x).scale, zp=self.t(x).zero_point)
        self.op(ir.OpType.SAVE_CHANNELS, [x], [s], name, k=k)
        return s

    def grad(self, like: int, name: str) -> int:
        return self.tensor(name, self.t(like).shape, ir.Kind.GRADIENT)

    def bwd_input(self, g: int, w: int, geom: ConvGeom, like: int, name: str) -> int:
        gx = self.grad(like, f"{name}.gx")
        self.op(ir.OpType.CONV2D_BWD_INPUT, [g, w], [gx], f"{name}.bwd", stride_h=geom.stride_h,
                stride_w=geom.stride_w, pad_h=geom.pad_h, pad_w=geom.pad_w, groups=geom.groups,
                **A.wscale(self.t(w).scale))
        return gx

    def update(self, g: int, x_saved: int, x: int, w: int, b: int, geom: ConvGeom, k: int, name: str) -> None:
        self.op(ir.OpType.CONV2D_UPDATE, [g, x_saved, w, b], [], f"{name}.update", stride_h=geom.stride_h,
                stride_w=geom.stride_w, pad_h=geom.pad_h, pad_w=geom.pad_w, groups=geom.groups, k=k,
                update_weight=1 if k > 0 else 0, update_bias=1, **A.qas(self.t(x).scale[0], self.t(w).scale))


def tiny_plan(seed: int = 0, in_shape: tuple[int, int, int] = (3, 8, 8), n_classes: int = 4, width: int = 8,
              ratio: float = 0.5) -> ir.Plan:
    """A small int8 training plan exercising every training op except the embedding ones.

    Forward: conv0 3x3 (frozen) -> SAVE_CHANNELS -> conv1 3x3 stride 2 (+mask) -> SAVE_CHANNELS -> conv2
    depthwise 3x3 (+mask) -> ADD(conv1, conv2) (+mask) -> AVGPOOL -> RESHAPE -> fc (1x1 conv, logits).
    Backward: SOFTMAX_CE, fc BWD_INPUT + UPDATE (all channels), RESHAPE_BWD, AVGPOOL_BWD, APPLY_MASK, conv2
    BWD_INPUT + UPDATE (first ``k`` channels), GRAD_ACCUM (residual), APPLY_MASK, conv1 UPDATE (first ``k``).

    Parameters
    ----------
    seed : weight initialisation seed (weights are deterministic per seed).
    in_shape : (C, H, W) of one sample; n_classes : logits K; width : channels of the hidden convs.
    ratio : fraction of input channels whose weights train in conv1 / conv2 (``k = ceil(ratio * width)``).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    bld = _Builder(np.random.default_rng(seed))
    x = bld.tensor("input", in_shape, ir.Kind.INPUT, scale=IN_SCALE, zp=IN_ZP)
    label = bld.tensor("label", (1,), ir.Kind.LABEL, ir.DType.INT32)
    bld.cal[x] = tiny_dataset(256, seed=999, in_shape=in_shape, n_classes=n_classes)[0]
    k = math.ceil(ratio * width)
    a0, *_ = bld.conv(x, width, 3, 1, 1, 1, False, True, False, "conv0")
    a0s = bld.save(a0, k, "conv0.y.saved")
    a1, w1, b1, m1, g1 = bld.conv(a0, width, 3, 2, 1, 1, True, True, True, "conv1")
    a1s = bld.save(a1, k, "conv1.y.saved")
    a2, w2, b2, m2, g2 = bld.conv(a1, width, 3, 1, 1, width, True, True, True, "conv2")
    # residual ADD with ReLU, calibrated on the real sum
    ta1, ta2 = bld.t(a1), bld.t(a2)
    real = ta1.scale[0] * (bld.cal[a1].astype(np.float64) - ta1.zero_point) \
        + ta2.scale[0] * (bld.cal[a2].astype(np.float64) - ta2.zero_point)
    s_r, z_r = bld._out_quant(real, True)
    r = bld.tensor("add.y", ta1.shape, ir.Kind.ACTIVATION, scale=s_r, zp=z_r)
    mr = bld.tensor("add.mask", ta1.shape, ir.Kind.MASK, ir.DType.MASK)
    ra = A.add_requant(ta1.scale[0], ta2.scale[0], s_r)
    bld.op(ir.OpType.ADD, [a1, a2], [r, mr], "add", act_min=z_r, act_max=127, **ra)
    bld.cal[r] = add(bld.cal[a1], ta1.zero_point, bld.cal[a2], ta2.zero_point, z_r, ra["mult_a"], ra["mult_b"],
                     ra["shift"], z_r, 127)[0]
    # global pool + flatten
    _, h, w = ta1.shape
    mean = s_r * (bld.cal[r].astype(np.float64) - z_r).mean(axis=(2, 3))
    s_p, z_p = bld._out_quant(mean, True)
    p = bld.tensor("pool.y", (width, 1, 1), ir.Kind.ACTIVATION, scale=s_p, zp=z_p)
    pq = A.avgpool_requant(s_r, s_p, h, w)
    bld.op(ir.OpType.AVGPOOL, [r], [p], "pool", **pq)
    bld.cal[p] = avgpool(bld.cal[r], z_r, z_p, pq["mult"], pq["shift"])
    f = bld.tensor("flatten.y", (width, 1, 1), ir.Kind.ACTIVATION, scale=s_p, zp=z_p)
    bld.op(ir.OpType.RESHAPE, [p], [f], "flatten")
    bld.cal[f] = bld.cal[p]
    logits, wf, bf, _, gf = bld.conv(f, n_classes, 1, 1, 0, 1, True, False, False, "fc")
    # backward
    gl = bld.grad(logits, "logits.g")
    bld.op(ir.OpType.SOFTMAX_CE, [logits, label], [gl], "loss", exp_lut=A.exp_lut(bld.t(logits).scale[0]))
    gfx = bld.bwd_input(gl, wf, gf, f, "fc")
    bld.update(gl, f, f, wf, bf, gf, width, "fc")
    gp = bld.grad(p, "pool.g")
    bld.op(ir.OpType.RESHAPE_BWD, [gfx], [gp], "flatten.bwd")
    gr = bld.grad(r, "add.g")
    bld.op(ir.OpType.AVGPOOL_BWD, [gp], [gr], "pool.bwd", inv_hw=A.inv_hw(h, w))
    bld.op(ir.OpType.APPLY_MASK, [gr, mr], [gr], "add.mask.apply")
    g2y = bld.grad(a2, "conv2.g")
    bld.op(ir.OpType.APPLY_MASK, [gr, m2], [g2y], "conv2.mask.apply")
    g1b = bld.bwd_input(g2y, w2, g2, a1, "conv2")
    bld.update(g2y, a1s, a1, w2, b2, g2, k, "conv2")
    g1y = bld.grad(a1, "conv1.g")
    bld.op(ir.OpType.GRAD_ACCUM, [gr, g1b], [g1y], "add.bwd")
    bld.op(ir.OpType.APPLY_MASK, [g1y, m1], [g1y], "conv1.mask.apply")
    bld.update(g1y, a0s, a0, w1, b1, g1, k, "conv1")
    scheme = ir.SparseScheme("tiny", n_bias_update=2, weight_ratio={1: ratio, 2: ratio} if k else {})
    return ir.Plan(bld.tensors, bld.ops, input_id=x, label_id=label, logits_id=logits, scheme=scheme,
                   name=f"tiny-{in_shape[0]}x{in_shape[1]}x{in_shape[2]}-k{n_classes}")


def tiny_text_dataset(n: int, seed: int = 0, vocab: int = 16, length: int = 6,
                      n_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences whose class is told by which class-keyword tokens they contain.

    Tokens ``0 .. n_classes-1`` are keywords; a sample of class c holds keyword c twice among random filler.

    Returns
    -------
    ids : (n, length) int32 in [0, vocab), y : (n,) int32.
    """
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % n_classes).astype(np.int32)
    ids = rng.integers(n_classes, vocab, (n, length)).astype(np.int32)
    pos = np.argsort(rng.random((n, length)), axis=1)[:, :2]
    ids[np.arange(n)[:, None], pos] = y[:, None]
    return ids, y


def tiny_text_plan(seed: int = 0, vocab: int = 16, dim: int = 8, length: int = 6, n_classes: int = 3) -> ir.Plan:
    """Embedding (trainable) -> AVGPOOL over the sequence -> fc: exercises EMBEDDING and EMBEDDING_UPDATE.

    Backward: SOFTMAX_CE, fc BWD_INPUT + UPDATE, AVGPOOL_BWD, EMBEDDING_UPDATE (QAS ``1 / s_table``).
    """
    bld = _Builder(np.random.default_rng(seed))
    ids = bld.tensor("ids", (length,), ir.Kind.INPUT, ir.DType.INT32)
    label = bld.tensor("label", (1,), ir.Kind.LABEL, ir.DType.INT32)
    tq, s_t = A.quantize_weights(bld.rng.standard_normal((1, vocab * dim)) * 0.5)
    table = bld.tensor("emb.table", (vocab, dim), ir.Kind.TRAINABLE, scale=s_t, data=tq.reshape(vocab, dim))
    emb = bld.tensor("emb.y", (dim, 1, length), ir.Kind.ACTIVATION, scale=s_t)
    bld.op(ir.OpType.EMBEDDING, [ids, table], [emb], "emb")
    bld.cal[emb] = embedding(tiny_text_dataset(128, 999, vocab, length, n_classes)[0], bld.t(table).data)
    s_p = float(A.f32(s_t[0] * 0.5)[0])  # the mean of L values spans about half the table's range
    p = bld.tensor("pool.y", (dim, 1, 1), ir.Kind.ACTIVATION, scale=s_p)
    pq = A.avgpool_requant(s_t[0], s_p, 1, length)
    bld.op(ir.OpType.AVGPOOL, [emb], [p], "pool", **pq)
    bld.cal[p] = avgpool(bld.cal[emb], 0, 0, pq["mult"], pq["shift"])
    logits, wf, bf, _, gf = bld.conv(p, n_classes, 1, 1, 0, 1, True, False, False, "fc")
    gl = bld.grad(logits, "logits.g")
    bld.op(ir.OpType.SOFTMAX_CE, [logits, label], [gl], "loss", exp_lut=A.exp_lut(bld.t(logits).scale[0]))
    gp = bld.bwd_input(gl, wf, gf, p, "fc")
    bld.update(gl, p, p, wf, bf, gf, dim, "fc")
    ge = bld.grad(emb, "emb.g")
    bld.op(ir.OpType.AVGPOOL_BWD, [gp], [ge], "pool.bwd", inv_hw=A.inv_hw(1, length))
    qm, qe = mant_exp(1.0 / float(s_t[0]))
    bld.op(ir.OpType.EMBEDDING_UPDATE, [ge, ids, table], [], "emb.update", qas_m=qm, qas_e=qe)
    return ir.Plan(bld.tensors, bld.ops, input_id=ids, label_id=label, logits_id=logits,
                   scheme=ir.SparseScheme("tiny-text"), name=f"tiny-text-v{vocab}-d{dim}-l{length}")
