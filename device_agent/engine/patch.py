"""PATCH: a frozen high-resolution prefix (convs, fused conv + depthwise pairs, residual adds) run tile by tile.

The op's output is split into ``tiles_h x tiles_w`` tiles; for each tile the rows/columns every layer must
produce are found backwards from the tile (the receptive field, halos recomputed by neighbouring tiles), then
the layers run forwards over those regions only, each into its buffer at ``buf_off`` in the op's scratch (the
last layer writes the tile of ``y``). A layer with ``fused`` set is produced one channel at a time, each channel
consumed at once by the depthwise conv after it. The numbers are exactly those of the unpatched ops: every output
is the same integer sum and the same requantization (:func:`device_agent.engine.forward.conv2d` / ``add``).
This module holds the tile geometry shared by compiler, reference and firmware, and the reference kernel; it
refuses stages that read a region another layer did not produce (a wrong layout raises, never reads garbage).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ir
from .conv import ConvGeom
from .forward import add, conv2d

KIND_CONV, KIND_ADD = 0, 1
INT32_MAX = 2**31 - 1
MAX_LAYERS = 16  # the firmware's fixed layer table (tf_kernels.h TF_PATCH_MAX_LAYERS)
LAYER_ATTRS = ("kind", "in_a", "in_b", "stride_h", "stride_w", "pad_h", "pad_w", "groups", "act_min", "act_max",
               "zero_point", "add_mult_a", "add_mult_b", "add_shift", "fused", "buf_off")

Rect = tuple[int, int, int, int]  # rows [r0, r1), columns [c0, c1)


@dataclass(frozen=True)
class Layer:
    """One layer of a PATCH stage. ``in_a`` / ``in_b`` are refs: 0 = the stage input, ``j + 1`` = layer ``j``."""

    kind: int
    in_a: int
    in_b: int
    geom: ConvGeom
    act_min: int
    act_max: int
    zero_point: int
    add_mult_a: int
    add_mult_b: int
    add_shift: int
    fused: int
    buf_off: int
    shape: tuple[int, int, int]  # output (C, H, W)
    kernel: tuple[int, int, int]  # (C_in/groups, KH, KW); (0, 1, 1) for an add


def layers_of(op: ir.Op, tensors) -> list[Layer]:
    """The layer table of a PATCH op, validated against its tensors; raises ValueError with what is wrong."""
    a = op.attrs
    kinds = np.asarray(a["kind"]).reshape(-1)
    n = kinds.size
    name = op.name or "PATCH"
    if not 1 <= n <= MAX_LAYERS:
        raise ValueError(f"{name}: {n} layers, expected 1..{MAX_LAYERS}")
    cols = {k: np.asarray(a[k]).reshape(-1) for k in LAYER_ATTRS}
    bad = [k for k, v in cols.items() if v.size != n]
    if bad:
        raise ValueError(f"{name}: attrs {bad} must have one value per layer ({n})")
    n_conv = int((kinds == KIND_CONV).sum())
    if len(op.inputs) != 1 + 2 * n_conv or len(op.outputs) != 1:
        raise ValueError(f"{name}: {1 + 2 * n_conv} inputs (x, then w, b per conv) and 1 output expected, "
                         f"got {len(op.inputs)} / {len(op.outputs)}")
    shapes = [tuple(tensors[op.inputs[0]].shape)]
    if len(shapes[0]) != 3:
        raise ValueError(f"{name}: input must be (C, H, W), got {shapes[0]}")
    out: list[Layer] = []
    wi = 1
    for i in range(n):
        v = {k: int(cols[k][i]) for k in LAYER_ATTRS}
        for ref in ("in_a",) + (("in_b",) if v["kind"] == KIND_ADD else ()):
            if not 0 <= v[ref] <= i:
                raise ValueError(f"{name}: layer {i} {ref} = {v[ref]} must name the input (0) or an earlier layer")
        if (v["kind"] == KIND_CONV and v["in_b"] != -1) or v["fused"] not in (0, 1) or v["buf_off"] < -1:
            raise ValueError(f"{name}: layer {i} needs in_b -1 for a conv, fused 0/1, buf_off >= -1")
        if not -128 <= v["act_min"] <= v["act_max"] <= 127 or not -128 <= v["zero_point"] <= 127:
            raise ValueError(f"{name}: layer {i} activation range / zero point outside int8")
        src = shapes[v["in_a"]]
        geom = ConvGeom(v["stride_h"], v["stride_w"], v["pad_h"], v["pad_w"], max(v["groups"], 1))
        if v["kind"] == KIND_CONV:
            w = tensors[op.inputs[wi]]
            if len(w.shape) != 4 or v["groups"] < 1 or w.shape[0] % v["groups"] or w.shape[1] * v["groups"] != src[0]:
                raise ValueError(f"{name}: layer {i} weights {w.shape} with groups {v['groups']} do not fit input {src}")
            if min(v["stride_h"], v["stride_w"]) < 1 or min(v["pad_h"], v["pad_w"]) < 0:
                raise ValueError(f"{name}: layer {i} strides must be >= 1 and pads >= 0")
            shape = (w.shape[0], *geom.out_hw(src[1], src[2], w.shape[2], w.shape[3]))
            kernel = (w.shape[1], w.shape[2], w.shape[3])
            wi += 2
        elif v["kind"] == KIND_ADD:
            if shapes[v["in_b"]] != src or not 1 <= v["add_shift"] <= 62:
                raise ValueError(f"{name}: layer {i} adds {src} and {shapes[v['in_b']]} (same shape, shift 1..62)")
            shape, kernel = src, (0, 1, 1)
        else:
            raise ValueError(f"{name}: layer {i} kind {v['kind']} is not conv (0) or add (1)")
        shapes.append(shape)
        out.append(Layer(v["kind"], v["in_a"], v["in_b"], geom, v["act_min"], v["act_max"], v["zero_point"],
                         v["add_mult_a"], v["add_mult_b"], v["add_shift"], v["fused"], v["buf_off"], shape, kernel))
    _check_fusion(out, name)
    if tuple(tensors[op.outputs[0]].shape) != out[-1].shape:
        raise ValueError(f"{name}: output {tensors[op.outputs[0]].shape} != last layer {out[-1].shape}")
    return out


def _check_fusion(layers: list[Layer], name: str) -> None:
    """A fused layer feeds only the depthwise conv right after it; the last layer is not fused."""
    for i, ly in enumerate(layers):
        if not ly.fused:
            continue
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        c = ly.shape[0]
        ok = (ly.kind == KIND_CONV and ly.fused == 1 and nxt is not None and nxt.kind == KIND_CONV
              and nxt.in_a == i + 1 and nxt.geom.groups == c == nxt.shape[0] and not (i and layers[i - 1].fused)
              and not any(o.in_a == i + 1 or (o.kind == KIND_ADD and o.in_b == i + 1) for o in layers[i + 2:]))
        if not ok:
            raise ValueError(f"{name}: layer {i} is fused but the next layer is not a depthwise conv reading only it")


def tile_span(n: int, tiles: int, i: int) -> tuple[int, int]:
    """Rows (or columns) ``[i * n // tiles, (i + 1) * n // tiles)`` of tile ``i`` of ``tiles``."""
    return i * n // tiles, (i + 1) * n // tiles


def regions(layers: list[Layer], tile: Rect) -> list[Rect | None]:
    """What each layer must produce for one output tile (clipped to the layer; None: nothing).

    Backwards from the last layer: a conv needs input rows ``[r0 s - p, (r1 - 1) s - p + K)`` (clipped to the
    input), an add needs the same region of both inputs; a layer read twice produces the bounding box.
    """
    need: list[Rect | None] = [None] * len(layers)
    need[-1] = tile
    for i in range(len(layers) - 1, -1, -1):
        ly, r = layers[i], need[i]
        if r is None:
            continue
        if ly.kind == KIND_CONV:
            src = layers[ly.in_a - 1].shape if ly.in_a else None
            g, (_, kh, kw) = ly.geom, ly.kernel
            want = (r[0] * g.stride_h - g.pad_h, (r[1] - 1) * g.stride_h - g.pad_h + kh,
                    r[2] * g.stride_w - g.pad_w, (r[3] - 1) * g.stride_w - g.pad_w + kw)
            refs = [(ly.in_a, want, src)]
        else:
            refs = [(ly.in_a, r, None), (ly.in_b, r, None)]
        for ref, (a0, a1, b0, b1), src in refs:
            if ref == 0:
                continue
            h, w = layers[ref - 1].shape[1:]
            a0, a1, b0, b1 = max(a0, 0), min(a1, h), max(b0, 0), min(b1, w)
            if a0 >= a1 or b0 >= b1:
                continue
            old = need[ref - 1]
            need[ref - 1] = (a0, a1, b0, b1) if old is None else (min(old[0], a0), max(old[1], a1),
                                                                   min(old[2], b0), max(old[3], b1))
    return need


def tiles(layers: list[Layer], tiles_h: int, tiles_w: int):
    """Yield every output tile (row-major) as a Rect of the last layer."""
    _, h, w = layers[-1].shape
    for ti in range(tiles_h):
        for tj in range(tiles_w):
            yield (*tile_span(h, tiles_h, ti), *tile_span(w, tiles_w, tj))


def _area(r: Rect | None) -> int:
    return 0 if r is None else (r[1] - r[0]) * (r[3] - r[2])


def stats(layers: list[Layer], tiles_h: int, tiles_w: int) -> tuple[list[int], int]:
    """Largest buffer of each layer over all tiles (``C x rows x cols``; a fused layer one channel; the last layer
    writes ``y``: 0) and the multiply-accumulates of one patched pass, halos included."""
    best = [0] * len(layers)
    total = 0
    for t in tiles(layers, tiles_h, tiles_w):
        for i, r in enumerate(regions(layers, t)):
            ly = layers[i]
            if ly.kind == KIND_CONV:
                total += _area(r) * ly.shape[0] * ly.kernel[0] * ly.kernel[1] * ly.kernel[2]
            if i < len(layers) - 1:
                best[i] = max(best[i], _area(r) * (1 if ly.fused else ly.shape[0]))
    return best, total


def buffer_bytes(layers: list[Layer], tiles_h: int, tiles_w: int) -> list[int]:
    """Largest buffer of each layer over all tiles (see :func:`stats`)."""
    return stats(layers, tiles_h, tiles_w)[0]


def macs(layers: list[Layer], tiles_h: int, tiles_w: int) -> int:
    """Multiply-accumulates of one patched pass, halos included (the unpatched ops: ``tiles_h = tiles_w = 1``)."""
    return stats(layers, tiles_h, tiles_w)[1]


def lifetimes(layers: list[Layer]) -> list[tuple[int, int]]:
    """Inclusive (first, last) layer step at which each layer's buffer is live within one tile.

    Layer ``i`` is written at step ``i`` (a fused layer at step ``i + 1``, channel by channel with its depthwise
    conv, which is also when that pair reads the fused layer's input) and read by its consumers' steps.
    """
    life = [(i + 1, i + 1) if ly.fused else (i, i) for i, ly in enumerate(layers)]
    for i, ly in enumerate(layers):
        step = i + 1 if ly.fused else i
        for ref in (ly.in_a, ly.in_b) if ly.kind == KIND_ADD else (ly.in_a,):
            if ref:
                a, b = life[ref - 1]
                life[ref - 1] = (a, max(b, step))
    return life


def scratch_bytes(layers: list[Layer], tiles_h: int, tiles_w: int) -> int:
    """Scratch the op needs: the end of the highest layer buffer (``buf_off + buffer_bytes``)."""
    return max([ly.buf_off + s for ly, s in zip(layers, buffer_bytes(layers, tiles_h, tiles_w)) if s] + [0])


def _read(store: dict, layers: list[Layer], ref: int, x: np.ndarray, zx: int, want: Rect, chans: slice) -> np.ndarray:
    """Channels ``chans`` of ref's values over ``want`` (rows/cols may leave the layer: filled with its zero
    point, i.e. the conv's padding); raises if an in-layer position was not produced."""
    if ref == 0:
        c, h, w = x.shape
        zp, src, at = zx, x, (0, h, 0, w)
    else:
        c, h, w = layers[ref - 1].shape
        zp = layers[ref - 1].zero_point
        src, at = store[ref]
    r0, r1, c0, c1 = want
    out = np.full((len(range(c)[chans]), r1 - r0, c1 - c0), zp, np.int64)
    a0, a1, b0, b1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    if a0 < a1 and b0 < b1:
        if a0 < at[0] or a1 > at[1] or b0 < at[2] or b1 > at[3]:
            raise ValueError(f"PATCH: layer ref {ref} read at rows {a0}:{a1} cols {b0}:{b1}, produced {at}")
        out[:, a0 - r0:a1 - r0, b0 - c0:b1 - c0] = src[chans, a0 - at[0]:a1 - at[0], b0 - at[2]:b1 - at[2]]
    return out


def _conv(store, layers, i, x, zx, r: Rect, w, b, mult, shift, chans: slice) -> np.ndarray:
    """Layer ``i`` (a conv) over region ``r`` for output channels ``chans``: int8 (len(chans), rows, cols)."""
    ly = layers[i]
    g, (cin_g, kh, kw) = ly.geom, ly.kernel
    want = (r[0] * g.stride_h - g.pad_h, (r[1] - 1) * g.stride_h - g.pad_h + kh,
            r[2] * g.stride_w - g.pad_w, (r[3] - 1) * g.stride_w - g.pad_w + kw)
    zs = zx if ly.in_a == 0 else layers[ly.in_a - 1].zero_point
    co = range(ly.shape[0])[chans]
    groups = g.groups
    if len(co) != ly.shape[0]:  # NOTE: a channel subset within one group reads only that group's inputs
        cout_g = ly.shape[0] // groups
        grp = co[0] // cout_g
        if co[-1] // cout_g != grp:
            raise ValueError(f"PATCH: layer {i} channels {co} span groups")
        src_ch, groups = slice(grp * cin_g, (grp + 1) * cin_g), 1
    else:
        src_ch = slice(None)
    win = _read(store, layers, ly.in_a, x, zx, want, src_ch)
    y, _ = conv2d(win[None], zs, w[chans], b[chans], ly.zero_point, ConvGeom(g.stride_h, g.stride_w, 0, 0, groups),
                  mult[chans], shift[chans], ly.act_min, ly.act_max)
    return y[0]


_Params = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # w, b, mult, shift of one conv layer


def _params(op: ir.Op, layers: list[Layer], consts) -> list[_Params | None]:
    """(w, b, mult, shift) per conv layer (None for an add) from the op's constants and concatenated attrs."""
    params: list[_Params | None] = []
    k = wi = 0
    mult, shift = np.asarray(op.attrs["mult"]).reshape(-1), np.asarray(op.attrs["shift"]).reshape(-1)
    for ly in layers:
        if ly.kind == KIND_CONV:
            c = ly.shape[0]
            params.append((consts[wi], consts[wi + 1], mult[k:k + c], shift[k:k + c]))
            k, wi = k + c, wi + 2
        else:
            params.append(None)
    if k != mult.size or k != shift.size:
        raise ValueError(f"{op.name or 'PATCH'}: mult/shift hold {mult.size}/{shift.size} values, convs need {k}")
    return params


def check_int32(layers: list[Layer], tiles_h: int, tiles_w: int, name: str = "PATCH") -> None:
    """The firmware computes tile bounds and buffer ends in int32 (tf_runtime.c run_patch refuses what would
    wrap): ``tiles x`` the output's H (W), and every buffer's ``buf_off`` + its whole layer (one channel when
    fused), must stay below 2^31. No MCU scratch comes near; a hostile plan is refused, on both sides."""
    _, h, w = layers[-1].shape
    if tiles_h * h > INT32_MAX or tiles_w * w > INT32_MAX:
        raise ValueError(f"{name}: tiles {tiles_h}x{tiles_w} over a {h}x{w} output pass int32 tile bounds")
    for i, ly in enumerate(layers[:-1]):
        c, lh, lw = ly.shape
        if ly.buf_off + (1 if ly.fused else c) * lh * lw > INT32_MAX:
            raise ValueError(f"{name}: layer {i} buffer at {ly.buf_off} of a {ly.shape} layer passes 2^31 bytes")


def patch_forward(op: ir.Op, tensors, x: np.ndarray, consts: list[np.ndarray], tiled: bool = False) -> np.ndarray:
    """PATCH: batch-first ``x`` (N, C, H, W) int8 -> ``y`` (N, *y shape) int8; ``consts`` = values of
    ``op.inputs[1:]`` (w, b per conv layer).

    The op's definition is its layers applied to whole tensors (``tiled=False``, what the host trainer runs).
    ``tiled=True`` is the execution the firmware performs, tile by tile, every layer buffer in one int8 scratch
    array at its ``buf_off`` (a bad layout corrupts the result, as it would on the board); both give the same
    bytes (tests/pure/test_patch.py).
    """
    layers = layers_of(op, tensors)
    params = _params(op, layers, consts)
    zx = tensors[op.inputs[0]].zero_point
    if not tiled:
        return _whole(layers, params, x, zx)
    th, tw = int(op.attrs["tiles_h"]), int(op.attrs["tiles_w"])
    _, h, w = layers[-1].shape
    if not (1 <= th <= h and 1 <= tw <= w):
        raise ValueError(f"{op.name or 'PATCH'}: tiles {th}x{tw} must be in 1..{h} x 1..{w}")
    check_int32(layers, th, tw, op.name or "PATCH")
    sizes = buffer_bytes(layers, th, tw)
    if any(s and ly.buf_off < 0 for ly, s in zip(layers, sizes)):
        raise ValueError(f"{op.name or 'PATCH'}: a layer buffer without an offset")
    scratch = np.zeros(scratch_bytes(layers, th, tw), np.int8)
    y = np.empty((x.shape[0], *layers[-1].shape), np.int8)
    for n in range(x.shape[0]):
        for t in tiles(layers, th, tw):
            _tile(layers, params, sizes, scratch, x[n], zx, t, y[n])
    return y


def _whole(layers: list[Layer], params, x: np.ndarray, zx: int) -> np.ndarray:
    """The layers over whole batch-first tensors (the unpatched ops' arithmetic)."""
    vals, zps = [x], [zx]
    for ly, p in zip(layers, params):
        if ly.kind == KIND_CONV:
            y, _ = conv2d(vals[ly.in_a], zps[ly.in_a], p[0], p[1], ly.zero_point, ly.geom, p[2], p[3], ly.act_min,
                          ly.act_max)
        else:
            y, _ = add(vals[ly.in_a], zps[ly.in_a], vals[ly.in_b], zps[ly.in_b], ly.zero_point, ly.add_mult_a,
                       ly.add_mult_b, ly.add_shift, ly.act_min, ly.act_max)
        vals.append(y)
        zps.append(ly.zero_point)
    return vals[-1]


def _tile(layers, params, sizes, scratch, x, zx, tile: Rect, y) -> None:
    """Run one output tile: every layer over its region, into scratch (the last layer into ``y``)."""
    need = regions(layers, tile)
    store: dict[int, tuple[np.ndarray, Rect]] = {}
    last = len(layers) - 1

    def dest(i: int, r: Rect, nch: int) -> np.ndarray:
        rows, cols = r[1] - r[0], r[3] - r[2]
        if nch * rows * cols > sizes[i]:
            raise ValueError(f"PATCH: layer {i} region {r} exceeds its buffer ({sizes[i]} bytes)")
        return scratch[layers[i].buf_off:layers[i].buf_off + nch * rows * cols].reshape(nch, rows, cols)

    for i, ly in enumerate(layers):
        r = need[i]
        if r is None or ly.fused:
            continue
        out = y[:, r[0]:r[1], r[2]:r[3]] if i == last else dest(i, r, ly.shape[0])
        if ly.kind == KIND_ADD:
            a = _read(store, layers, ly.in_a, x, zx, r, slice(None))
            b = _read(store, layers, ly.in_b, x, zx, r, slice(None))
            za = zx if ly.in_a == 0 else layers[ly.in_a - 1].zero_point
            zb = zx if ly.in_b == 0 else layers[ly.in_b - 1].zero_point
            out[...] = add(a, za, b, zb, ly.zero_point, ly.add_mult_a, ly.add_mult_b, ly.add_shift, ly.act_min,
                           ly.act_max)[0]
        elif i and layers[i - 1].fused:  # one channel of the fused layer, then its depthwise channel
            f, rf = i - 1, need[i - 1]
            one = _one(layers, f)
            for c in range(ly.shape[0]):
                if rf is not None:
                    buf = dest(f, rf, 1)
                    buf[...] = _conv(store, layers, f, x, zx, rf, *_of(params, f), slice(c, c + 1))
                    store[i] = (buf, rf)  # NOTE: ref i (layer f) holds channel c only, read as channel 0
                out[c:c + 1] = _conv(store, one, i, x, zx, r, *_slice(_of(params, i), c), slice(0, 1))
        else:
            out[...] = _conv(store, layers, i, x, zx, r, *_of(params, i), slice(None))
        if i != last:
            store[i + 1] = (out, r)


def _one(layers: list[Layer], f: int) -> list[Layer]:
    """The layer list as the depthwise conv after fused layer ``f`` sees it for one channel: ``f`` has one
    channel, the depthwise conv one group."""
    lf, ld = layers[f], layers[f + 1]
    one = list(layers)
    one[f] = Layer(**{**lf.__dict__, "shape": (1, *lf.shape[1:])})
    one[f + 1] = Layer(**{**ld.__dict__, "shape": (1, *ld.shape[1:]), "geom": ConvGeom(
        ld.geom.stride_h, ld.geom.stride_w, ld.geom.pad_h, ld.geom.pad_w, 1)})
    return one


def _of(params: list[_Params | None], i: int) -> _Params:
    p = params[i]
    if p is None:
        raise ValueError(f"PATCH: layer {i} is an add, it has no conv parameters")
    return p


def _slice(p: _Params, c: int) -> _Params:
    w, b, m, s = p
    return w[c:c + 1], b[c:c + 1], m[c:c + 1], s[c:c + 1]
