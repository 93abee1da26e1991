"""Write the golden kernel vectors the C firmware tests read (firmware/tests/vectors/kernel_vectors.h).

Random inputs per op go through the Python reference kernels (device_agent/engine), and the inputs plus every
expected output byte land in one generated C header. The same header feeds the host test binary and the board's
SELFTEST command. This script never computes an expected value itself: it only draws inputs and calls the spec.

Usage: ``python tests/firmware/gen_kernel_vectors.py [--out PATH] [--seed N]``. The per-op parameter layout is
documented in firmware/tests/selftest.c (``P_*`` indices); the two must change together.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_agent.engine import attrs as A
from device_agent.engine import backward as B
from device_agent.engine import forward as F
from device_agent.engine import ir, qmath
from device_agent.engine import update as U
from device_agent.engine.conv import ConvGeom, conv_acc
from device_agent.wire import frames

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "firmware" / "tests" / "vectors" / "kernel_vectors.h"

# Self-test-only op ids for the qmath atoms (the plan's op ids are ir.OpType values, all < 100).
OP_RNG_U32, OP_SCALED_UPDATE, OP_DYN_REQUANT, OP_FRAME = 100, 101, 102, 110


@dataclass
class Case:
    name: str
    op: int
    params: list[int]
    bufs: list[tuple[str, np.ndarray]] = field(default_factory=list)  # inputs, then expected outputs


def _packbits(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask.reshape(-1).astype(np.uint8), bitorder="little")


def _i8(rng, shape, lo=-128, hi=127) -> np.ndarray:
    return rng.integers(lo, hi + 1, size=shape).astype(np.int8)


def _geom_case(rng, kind: str) -> tuple[int, int, int, int, int, int, int, int]:
    """(c_in, c_out, groups, h, w, k, stride, pad) for a conv of the given kind."""
    k = int(rng.choice([1, 3, 5]))
    stride, pad = int(rng.integers(1, 3)), int(rng.integers(0, k // 2 + 2))
    h, w = int(rng.integers(k, 10)), int(rng.integers(k, 10))
    if kind == "depthwise":
        c = int(rng.integers(2, 9))
        return c, c, c, h, w, k, stride, pad
    if kind == "grouped":
        g = int(rng.choice([2, 4]))
        return g * int(rng.integers(1, 4)), g * int(rng.integers(1, 4)), g, h, w, k, stride, pad
    if kind == "linear":
        return int(rng.integers(4, 70)), int(rng.integers(2, 12)), 1, 1, 1, 1, 1, 0
    if kind == "pointwise":
        return int(rng.integers(2, 12)), int(rng.integers(2, 12)), 1, h, w, 1, 1, 0
    return int(rng.integers(1, 6)), int(rng.integers(1, 8)), 1, h, w, k, stride, pad


KINDS = ("standard", "depthwise", "grouped", "linear", "pointwise")


def conv2d_case(rng, i: int) -> Case:
    kind = KINDS[i % len(KINDS)]
    return _conv2d(rng, i, kind, *_geom_case(rng, kind))


def dw_wide_case(rng, i: int) -> Case:
    """Depthwise 3x3 on planes too wide for the padded copy (the row-pointer path and its 2 x 2 steps, stride 1
    and 2, pads 0-2, odd and even sizes)."""
    c, h, w = int(rng.integers(2, 4)), int(rng.integers(3, 8)), int(rng.integers(18, 27))
    return _conv2d(rng, i, "dw_wide", c, c, c, h, w, 3, 1 + i % 2 * (i > 2), int(rng.integers(0, 3)))


def _conv2d(rng, i: int, kind: str, cin: int, cout: int, g: int, h: int, w: int, k: int, s: int, p: int) -> Case:
    geom = ConvGeom(s, s, p, p, g)
    oh, ow = geom.out_hw(h, w, k, k)
    x, wt = _i8(rng, (1, cin, h, w)), _i8(rng, (cout, cin // g, k, k), -127, 127)
    zx, zy = int(rng.integers(-128, 128)), int(rng.integers(-20, 21))
    b = rng.integers(-5000, 5000, size=cout).astype(np.int32)
    spread = float(np.abs(conv_acc(x.astype(np.int64) - zx, wt, geom)).max() + 1)
    reals = rng.uniform(20, 300, size=cout) / spread
    q = [qmath.quantize_multiplier(float(r)) for r in reals]
    mult, shift = np.array([m for m, _ in q], np.int32), np.array([t for _, t in q], np.int32)
    lo, hi = [(-128, 127), (zy, 127), (zy, min(127, zy + 60))][i % 3]
    y, mask = F.conv2d(x, zx, wt, b, zy, geom, mult, shift, lo, hi)
    params = [cin, h, w, cout, k, k, oh, ow, s, s, p, p, g, zx, zy, lo, hi]
    return Case(f"conv2d_{kind}_{i}", ir.OpType.CONV2D, params,
                [("x", x), ("w", wt), ("b", b), ("mult", mult), ("shift", shift), ("y", y), ("mask", _packbits(mask))])


def add_case(rng, i: int) -> Case:
    n = int(rng.integers(1, 200))
    a, b = _i8(rng, (1, n, 1, 1)), _i8(rng, (1, n, 1, 1))
    za, zb, zy = (int(v) for v in rng.integers(-128, 128, 3))
    at = A.add_requant(float(rng.uniform(0.01, 1)), float(rng.uniform(0.01, 1)), float(rng.uniform(0.01, 1)))
    lo, hi = [(-128, 127), (zy // 2, 127)][i % 2]
    y, mask = F.add(a, za, b, zb, zy, at["mult_a"], at["mult_b"], at["shift"], lo, hi)
    return Case(f"add_{i}", ir.OpType.ADD, [n, za, zb, zy, at["mult_a"], at["mult_b"], at["shift"], lo, hi],
                [("a", a), ("b", b), ("y", y), ("mask", _packbits(mask))])


def avgpool_case(rng, i: int) -> Case:
    c, h, w = (int(v) for v in rng.integers(1, 12, 3))
    x = _i8(rng, (1, c, h, w))
    zx, zy = int(rng.integers(-128, 128)), int(rng.integers(-128, 128))
    at = A.avgpool_requant(float(rng.uniform(0.01, 1)), float(rng.uniform(0.005, 1)), h, w)
    y = F.avgpool(x, zx, zy, at["mult"], at["shift"])
    return Case(f"avgpool_{i}", ir.OpType.AVGPOOL, [c, h, w, zx, zy, at["mult"], at["shift"]], [("x", x), ("y", y)])


def clamp_case(rng, i: int) -> Case:
    n = int(rng.integers(1, 100))
    x = _i8(rng, (1, n))
    lo = int(rng.integers(-128, 0))
    hi = int(rng.integers(lo, 128))
    y, mask = F._clamp_mask(x.astype(np.int64), lo, hi)
    return Case(f"clamp_{i}", ir.OpType.CLAMP, [n, lo, hi], [("x", x), ("y", y), ("mask", _packbits(mask))])


def softmax_ce_case(rng, i: int) -> Case:
    k = int(rng.integers(2, 40))
    scale = float(rng.uniform(0.01, 0.5))
    logits = _i8(rng, (1, k, 1, 1), -128 + i * 10 % 100, 127 - i * 7 % 100)
    label = int(rng.integers(0, k))
    lut = A.exp_lut(scale)
    g, e, _, ok = B.softmax_ce(logits, np.array([label]), lut, scale)
    d = int(logits.max()) - logits.reshape(-1).astype(np.int64)  # P_label for the board's loss report
    s = lut.astype(np.int64)[d].sum()
    p_label = int((int(lut[d[label]]) * (1 << 15) + s // 2) // s)
    return Case(f"softmax_ce_{i}", ir.OpType.SOFTMAX_CE, [k, label, int(e[0]), p_label, int(ok[0])],
                [("logits", logits), ("exp_lut", lut), ("g", g)])


def apply_mask_case(rng, i: int) -> Case:
    n = int(rng.integers(1, 100))
    g, mask = _i8(rng, (1, n)), rng.integers(0, 2, size=(1, n)).astype(bool)
    return Case(f"apply_mask_{i}", ir.OpType.APPLY_MASK, [n],
                [("g", g), ("mask", _packbits(mask)), ("out", B.apply_mask(g, mask))])


def grad_accum_case(rng, i: int) -> Case:
    n = int(rng.integers(1, 100))
    g1, g2 = _i8(rng, (1, n)), _i8(rng, (1, n))
    e1, e2 = int(rng.integers(-30, 5)), int(rng.integers(-30, 5))
    if i % 3 == 0:
        e2 = e1
    g, e = B.grad_accum(g1, np.array([e1]), g2, np.array([e2]))
    return Case(f"grad_accum_{i}", ir.OpType.GRAD_ACCUM, [n, e1, e2, int(e[0])], [("g1", g1), ("g2", g2), ("g", g)])


def avgpool_bwd_case(rng, i: int) -> Case:
    c, h, w = int(rng.integers(1, 12)), int(rng.integers(1, 9)), int(rng.integers(1, 9))
    gy = _i8(rng, (1, c, 1, 1))
    ey = int(rng.integers(-20, 0))
    inv = A.inv_hw(h, w)
    gx, ex = B.avgpool_bwd(gy, np.array([ey]), inv, (h, w))
    return Case(f"avgpool_bwd_{i}", ir.OpType.AVGPOOL_BWD, [c, h, w, inv, ey, int(ex[0])], [("g_y", gy), ("g_x", gx)])


def conv_bwd_input_case(rng, i: int) -> Case:
    kind = KINDS[i % len(KINDS)]
    cin, cout, g, h, w, k, s, p = _geom_case(rng, kind)
    geom = ConvGeom(s, s, p, p, g)
    oh, ow = geom.out_hw(h, w, k, k)
    gy, wt = _i8(rng, (1, cout, oh, ow)), _i8(rng, (cout, cin // g, k, k), -127, 127)
    ws = A.wscale(rng.uniform(0.001, 0.05, size=cout))
    ey = int(rng.integers(-20, 0))
    gx, ex = B.conv_bwd_input(gy, np.array([ey]), wt, geom, (h, w), ws["wscale_q"], int(ws["wscale_p"]))
    params = [cin, h, w, cout, k, k, oh, ow, s, s, p, p, g, int(ws["wscale_p"]), ey, int(ex[0])]
    return Case(f"conv_bwd_input_{kind}_{i}", ir.OpType.CONV2D_BWD_INPUT, params,
                [("g_y", gy), ("w", wt), ("wscale_q", ws["wscale_q"]), ("g_x", gx)])


def conv_update_case(rng, i: int) -> Case:
    kind = KINDS[i % len(KINDS)]
    cin, cout, g, h, w, k, s, p = _geom_case(rng, kind)
    geom = ConvGeom(s, s, p, p, g)
    oh, ow = geom.out_hw(h, w, k, k)
    ksave = int(rng.integers(0, cin + 1)) if i % 4 else cin
    x_saved = _i8(rng, (1, ksave, h, w))
    gy = _i8(rng, (1, cout, oh, ow))
    wt = _i8(rng, (cout, cin // g, k, k), -127, 127)
    b = rng.integers(-100000, 100000, size=cout).astype(np.int32)
    zx = int(rng.integers(-128, 128))
    qas = A.qas(float(rng.uniform(0.01, 0.1)), rng.uniform(0.001, 0.05, size=cout))
    lr = float(rng.choice([0.1, 0.01, 0.003, 1e-4]))
    lr_m, lr_e = U.lr_mant_exp(lr)
    ey = int(rng.integers(-24, -4))
    step, w_id, b_id = int(rng.integers(0, 2**32)), int(rng.integers(0, 300)), int(rng.integers(0, 300))
    uw, ub = (1, 1) if i % 3 == 0 else (int(rng.integers(0, 2)), int(rng.integers(0, 2)))
    uw = uw and ksave > 0
    w2, b2 = U.conv_update(gy, np.array([ey]), x_saved if uw else None, zx, wt, b, geom, ksave, (h, w), qas, lr,
                           step, w_id, b_id, bool(uw), bool(ub))
    params = [cin, h, w, cout, k, k, oh, ow, s, s, p, p, g, ksave, int(uw), int(ub), zx, lr_m, lr_e, step, w_id,
              b_id, ey]
    bufs = [("g_y", gy), ("x_saved", x_saved), ("w", wt), ("b", b)]
    bufs += [(n, qas[n]) for n in ("qas_w_m", "qas_w_e", "qas_b_m", "qas_b_e")]
    bufs += [("w_new", w2), ("b_new", b2)]
    return Case(f"conv_update_{kind}_{i}", ir.OpType.CONV2D_UPDATE, params, bufs)


def rng_case(rng, i: int) -> Case:
    n = 64
    idx = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    step, tid = int(rng.integers(0, 2**32)), int(rng.integers(0, 2**32))
    return Case(f"rng_u32_{i}", OP_RNG_U32, [n, step, tid], [("idx", idx), ("out", qmath.rng_u32(step, tid, idx))])


def scaled_update_case(rng, i: int) -> Case:
    n = 64
    acc = (rng.integers(-(2**39), 2**39, size=n) >> rng.integers(0, 39, size=n)).astype(np.int64)
    mult = rng.integers(0, 2**16, size=n).astype(np.int32)
    exp = rng.integers(-70, 25, size=n).astype(np.int32)
    rnd = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    limit = [255, 2**31 - 1][i % 2]
    out = qmath.scaled_update(acc, mult, exp, rnd, limit).astype(np.int64)
    return Case(f"scaled_update_{i}", OP_SCALED_UPDATE, [n, int(limit == 255)],
                [("acc", acc), ("mult", mult), ("exp", exp), ("rnd", rnd), ("out", out)])


def dyn_requant_case(rng, i: int) -> Case:
    n = int(rng.integers(1, 80))
    acc = (rng.integers(-(2**31), 2**31, size=(1, n)) >> int(rng.integers(0, 31))).astype(np.int32)
    e_in = int(rng.integers(-30, 10))
    g, e = qmath.dyn_requant(acc, np.array([e_in]))
    return Case(f"dyn_requant_{i}", OP_DYN_REQUANT, [n, e_in, int(e[0])], [("acc", acc), ("g", g)])


def dyn_requant_tie_case(rng, i: int) -> Case:
    """Every value an exact tie at the dynamic shift ``s`` (odd multiples of ``2**(s-1)``, |v| / 2**s <= 126.5):
    half to even and half up disagree on about half of them, and ``s`` up to 30 exercises the 32-bit path."""
    n, s = int(rng.integers(8, 80)), int(rng.integers(1, 25))
    acc = ((2 * rng.integers(-127, 127, size=(1, n)) + 1) << (s - 1)).astype(np.int32)
    acc[0, 0] = 253 << (s - 1)
    e_in = int(rng.integers(-30, 10))
    g, e = qmath.dyn_requant(acc, np.array([e_in]))
    return Case(f"dyn_requant_tie_{i}", OP_DYN_REQUANT, [n, e_in, int(e[0])], [("acc", acc), ("g", g)])


def frame_case(rng, i: int) -> Case:
    """A UART frame as device_agent.wire.frames encodes it (COBS edge cases: 253-255 byte runs, zeros)."""
    n = [0, 1, 251, 252, 253, 254, 300, frames.MAX_PAYLOAD][i % 8]
    payload = rng.integers(1, 256, size=n).astype(np.uint8)
    if i % 3 == 1:
        payload[rng.integers(0, max(n, 1), size=n // 50)] = 0
    f = frames.Frame(int(rng.integers(0, 2**16)), int(rng.integers(0, 256)), payload.tobytes())
    enc = frames.encode_frame(f)[:-1]
    raw = frames.cobs_decode(enc)
    return Case(f"frame_{i}", OP_FRAME, [len(raw), frames.crc16_ccitt(raw[:-2])],
                [("raw", np.frombuffer(raw, np.uint8)), ("encoded", np.frombuffer(enc, np.uint8))])


GENERATORS = [(conv2d_case, 15), (add_case, 4), (avgpool_case, 4), (clamp_case, 3), (softmax_ce_case, 6),
              (apply_mask_case, 3), (grad_accum_case, 6), (avgpool_bwd_case, 4), (conv_bwd_input_case, 15),
              (conv_update_case, 20), (rng_case, 2), (scaled_update_case, 4), (dyn_requant_case, 6), (frame_case, 8),
              (dyn_requant_tie_case, 4), (dw_wide_case, 6)]

_CTYPE = {np.dtype(np.int8): "int8_t", np.dtype(np.uint8): "uint8_t", np.dtype(np.int32): "int32_t",
          np.dtype(np.uint32): "uint32_t", np.dtype(np.int64): "int64_t"}


def _c_array(name: str, a: np.ndarray) -> str:
    a = np.ascontiguousarray(a).reshape(-1)
    ctype = _CTYPE[a.dtype]
    suffix = {"int64_t": "LL", "uint32_t": "u"}.get(ctype, "")
    vals = [f"{int(v)}{suffix}" if not (ctype == "int64_t" and int(v) == -(2**63)) else "INT64_MIN" for v in a]
    if ctype == "int32_t":
        vals = [v if int(v) != -(2**31) else "INT32_MIN" for v in vals]
    vals = vals or ["0"]
    lines = [",".join(vals[i:i + 16]) for i in range(0, len(vals), 16)]
    return f"static const {ctype} {name}[] __attribute__((aligned(8))) = {{\n" + ",\n".join(lines) + "\n};\n"


def render(cases: list[Case], script: str) -> str:
    out = [f"/* generated by {script} — do not edit */",
           "/* Golden kernel vectors from device_agent/engine; layout of params: firmware/tests/selftest.c. */",
           "#ifndef TF_KERNEL_VECTORS_H", "#define TF_KERNEL_VECTORS_H", "", '#include "tf_vectors.h"', ""]
    for ci, c in enumerate(cases):
        out.append(_c_array(f"v{ci}_params", np.asarray(c.params, np.int64).astype(np.int32)))
        names = []
        for bi, (bname, arr) in enumerate(c.bufs):
            arr = np.asarray(arr)
            if arr.dtype == np.bool_:
                arr = arr.astype(np.uint8)
            out.append(_c_array(f"v{ci}_b{bi}", arr))
            names.append((bname, f"v{ci}_b{bi}", arr.nbytes))
        bufs = ", ".join(f'{{"{n}", {v}, {nb}}}' for n, v, nb in names)
        out.append(f"static const tf_vec_buf v{ci}_bufs[] = {{{bufs}}};\n")
    out.append("static const tf_vec_case tf_kernel_vectors[] = {")
    for ci, c in enumerate(cases):
        out.append(f'    {{"{c.name}", {int(c.op)}, {len(c.params)}, v{ci}_params, {len(c.bufs)}, v{ci}_bufs}},')
    out += ["};", f"#define TF_KERNEL_VECTORS_N {len(cases)}", "", "#endif /* TF_KERNEL_VECTORS_H */", ""]
    return "\n".join(out)


def generate(seed: int = 20260101) -> list[Case]:
    rng = np.random.default_rng(seed)
    return [gen(rng, i) for gen, n in GENERATORS for i in range(n)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=20260101)
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cases = generate(args.seed)
    args.out.write_text(render(cases, "tests/firmware/gen_kernel_vectors.py"))
    print(f"{len(cases)} cases -> {args.out}")


if __name__ == "__main__":
    main()
