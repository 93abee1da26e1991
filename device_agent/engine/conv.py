"""Integer convolution cores: forward sums, their exact adjoint, and weight-gradient sums (no requantization).

All three walk the KH x KW kernel taps (never pixels) and do one float64 matmul per tap. Operands are small
integers, so every float64 sum is exact while it stays below 2**53 (see docs/engine.md); results come back as
int64. This module refuses anything but integer-valued inputs and does no rounding of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvGeom:
    """Geometry of one conv: strides, paddings and groups (as in the CONV2D op attributes)."""

    stride_h: int = 1
    stride_w: int = 1
    pad_h: int = 0
    pad_w: int = 0
    groups: int = 1

    @classmethod
    def from_attrs(cls, attrs: dict, prefix: str = "") -> ConvGeom:
        """Read ``stride_h, stride_w, pad_h, pad_w[, groups]`` (optionally prefixed) from op attributes."""
        return cls(int(attrs[prefix + "stride_h"]), int(attrs[prefix + "stride_w"]), int(attrs[prefix + "pad_h"]),
                   int(attrs[prefix + "pad_w"]), int(attrs.get(prefix + "groups", 1)))

    def out_hw(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        """Output spatial size for an ``h x w`` input and a ``kh x kw`` kernel (a pad is at most the kernel)."""
        if not (0 <= self.pad_h <= kh and 0 <= self.pad_w <= kw):
            raise ValueError(f"conv pad {self.pad_h}x{self.pad_w} with a {kh}x{kw} kernel: each pad must be >= 0 "
                             "and at most the kernel size (a larger one only adds outputs that see padding alone)")
        oh = (h + 2 * self.pad_h - kh) // self.stride_h + 1
        ow = (w + 2 * self.pad_w - kw) // self.stride_w + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"conv of a {h}x{w} input with a {kh}x{kw} kernel, stride "
                             f"{self.stride_h}x{self.stride_w}, pad {self.pad_h}x{self.pad_w} has no output")
        return oh, ow


def _check(x_c: int, w: np.ndarray, geom: ConvGeom) -> tuple[int, int]:
    """Validate channel counts against groups; return (C_in per group, C_out per group)."""
    c_out, cin_g = w.shape[0], w.shape[1]
    g = geom.groups
    if g < 1 or c_out % g or cin_g * g != x_c:
        raise ValueError(f"conv weights (C_out={c_out}, C_in/groups={cin_g}) with groups={g} expect "
                         f"{cin_g * g} input channels and C_out divisible by groups, got {x_c} input channels")
    return cin_g, c_out // g


def _tap(xp: np.ndarray, i: int, j: int, oh: int, ow: int, geom: ConvGeom) -> np.ndarray:
    """The strided (N, C, oh, ow) view of padded input ``xp`` seen by kernel tap (i, j)."""
    return xp[:, :, i:i + geom.stride_h * (oh - 1) + 1:geom.stride_h, j:j + geom.stride_w * (ow - 1) + 1:geom.stride_w]


def conv_acc(xc: np.ndarray, w: np.ndarray, geom: ConvGeom) -> np.ndarray:
    """Forward sums ``acc[n,c,p] = sum (x - zx) * w`` with zero padding of the centred input.

    Parameters
    ----------
    xc : (N, C_in, H, W) integer array, already centred (``x - zx``), so padding is 0.
    w : (C_out, C_in/groups, KH, KW) integer weights.
    geom : strides, paddings, groups.

    Returns
    -------
    (N, C_out, OH, OW) int64.
    """
    n, c, h, wd = xc.shape
    c_out, _, kh, kw = w.shape
    cin_g, cout_g = _check(c, w, geom)
    g = geom.groups
    oh, ow = geom.out_hw(h, wd, kh, kw)
    xp = np.pad(xc.astype(np.float64), ((0, 0), (0, 0), (geom.pad_h, geom.pad_h), (geom.pad_w, geom.pad_w)))
    wf = w.astype(np.float64).reshape(g, cout_g, cin_g, kh, kw)
    out = np.zeros((n, g, cout_g, oh * ow), np.float64)
    for i in range(kh):
        for j in range(kw):
            xt = _tap(xp, i, j, oh, ow, geom).reshape(n, g, cin_g, oh * ow)  # (N, G, Cg, P)
            if cin_g == 1 and cout_g == 1:  # NOTE: depthwise: elementwise beats G tiny matmuls
                out += wf[None, :, :, 0, i, j, None] * xt
            else:
                out += np.matmul(np.ascontiguousarray(wf[None, :, :, :, i, j]), xt)  # (G,Cog,Cg) @ (N,G,Cg,P)
    return out.reshape(n, c_out, oh, ow).astype(np.int64)


def conv_transpose_acc(gy: np.ndarray, w: np.ndarray, geom: ConvGeom, in_hw: tuple[int, int]) -> np.ndarray:
    """The exact adjoint of :func:`conv_acc`: ``acc[n,i,q] = sum_{c,p} g[n,c,p] * w[c,i,tap(p,q)]``.

    Parameters
    ----------
    gy : (N, C_out, OH, OW) integer gradient.
    w : (C_out, C_in/groups, KH, KW) integer weights.
    geom : the forward conv's strides, paddings, groups.
    in_hw : (H, W) of the forward input (strides may make it ambiguous).

    Returns
    -------
    (N, C_in, H, W) int64.
    """
    n, c_out, oh, ow = gy.shape
    _, cin_g, kh, kw = w.shape
    g = geom.groups
    h, wd = in_hw
    if c_out != w.shape[0] or geom.out_hw(h, wd, kh, kw) != (oh, ow):
        raise ValueError(f"gradient {gy.shape[1:]} does not match a conv of weights {w.shape} on a {h}x{wd} input "
                         f"(expected {(w.shape[0], *geom.out_hw(h, wd, kh, kw))})")
    cout_g = c_out // g
    gf = gy.astype(np.float64).reshape(n, g, cout_g, oh * ow)
    wt = np.swapaxes(w.astype(np.float64).reshape(g, cout_g, cin_g, kh, kw), 1, 2)  # (G, Cg, Cog, KH, KW)
    xp = np.zeros((n, g * cin_g, h + 2 * geom.pad_h, wd + 2 * geom.pad_w), np.float64)
    for i in range(kh):
        for j in range(kw):
            if cin_g == 1 and cout_g == 1:
                contrib = wt[None, :, :, 0, i, j, None] * gf
            else:
                contrib = np.matmul(np.ascontiguousarray(wt[None, :, :, :, i, j]), gf)  # (N, G, Cg, P)
            # NOTE: one tap's view has no repeated positions, so += on the strided view is a true scatter-add.
            _tap(xp, i, j, oh, ow, geom)[...] += contrib.reshape(n, g * cin_g, oh, ow)
    out = xp[:, :, geom.pad_h:geom.pad_h + h, geom.pad_w:geom.pad_w + wd]
    return out.astype(np.int64)


def conv_weight_acc(gy: np.ndarray, xc: np.ndarray, w_shape: tuple[int, ...], geom: ConvGeom) -> np.ndarray:
    """Per-sample weight-gradient sums ``acc[n,c,i,kh,kw] = sum_p g[n,c,p] * (x - zx)[n,i,p']``.

    Parameters
    ----------
    gy : (N, C_out, OH, OW) integer gradient.
    xc : (N, C_in, H, W) centred input (channels not saved must be 0).
    w_shape : (C_out, C_in/groups, KH, KW).
    geom : strides, paddings, groups.

    Returns
    -------
    (N, C_out, C_in/groups, KH, KW) int64, one sum per sample (the mini-batch rule aligns them later).
    """
    n, c_out, oh, ow = gy.shape
    _, cin_g, kh, kw = w_shape
    cin_g, cout_g = _check(xc.shape[1], np.empty((c_out, cin_g, 0, 0)), geom)
    g = geom.groups
    if geom.out_hw(xc.shape[2], xc.shape[3], kh, kw) != (oh, ow):
        raise ValueError(f"gradient spatial size {(oh, ow)} does not match input {xc.shape[2:]} with kernel {kh}x{kw}")
    xp = np.pad(xc.astype(np.float64), ((0, 0), (0, 0), (geom.pad_h, geom.pad_h), (geom.pad_w, geom.pad_w)))
    gf = gy.astype(np.float64).reshape(n, g, cout_g, oh * ow)
    out = np.zeros((n, g, cout_g, cin_g, kh, kw), np.float64)
    for i in range(kh):
        for j in range(kw):
            xt = _tap(xp, i, j, oh, ow, geom).reshape(n, g, cin_g, oh * ow)
            if cin_g == 1 and cout_g == 1:
                out[:, :, 0, 0, i, j] = np.einsum("ngp,ngp->ng", gf[:, :, 0], xt[:, :, 0])
            else:
                out[..., i, j] = np.matmul(gf, np.ascontiguousarray(np.swapaxes(xt, 2, 3)))  # (N,G,Cog,P) @ (N,G,P,Cg)
    return out.reshape(n, c_out, cin_g, kh, kw).astype(np.int64)
