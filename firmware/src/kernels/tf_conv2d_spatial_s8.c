/* CONV2D forward, spatial kernels (KxK with stride and zero-point padding; the 3x3 depthwise case with an
 * __SMLAD path for stride 1): one output channel per call, called by tf_conv2d_s8.c. */
#include "tf_conv_rq.h"
#include "tf_dsp.h"

/* sum x * w over a K x K window fully inside x (no padding): rows iw_n apart, cin channels plane apart. */
static inline int32_t window(const int8_t *x, const int8_t *w, int32_t cin, int32_t plane, int32_t iw_n,
                             int32_t kh_n, int32_t kw_n) {
    int32_t acc = 0;
    if (kh_n == 3 && kw_n == 3) {
        for (int32_t ci = 0; ci < cin; ci++, x += plane, w += 9) {
            const int8_t *r0 = x, *r1 = x + iw_n, *r2 = r1 + iw_n;
            acc += r0[0] * w[0] + r0[1] * w[1] + r0[2] * w[2] + r1[0] * w[3] + r1[1] * w[4] + r1[2] * w[5] +
                   r2[0] * w[6] + r2[1] * w[7] + r2[2] * w[8];
        }
        return acc;
    }
    for (int32_t ci = 0; ci < cin; ci++, x += plane) {
        for (int32_t kh = 0; kh < kh_n; kh++) {
            const int8_t *xr = x + kh * iw_n;
            for (int32_t kw = 0; kw < kw_n; kw++) {
                acc += xr[kw] * *w++;
            }
        }
    }
    return acc;
}

#if TF_USE_DSP
#define TF_PACK16(a, b) (((uint32_t)(a) & 0xFFFFu) | ((uint32_t)(b) << 16))
/* One 3-tap kernel row at stride 2 for two neighbouring outputs: x[0..2] (a0) and x[2..4] (a1); w02 = (w0, w2)
 * as int16 halves, w1 in the low half. NOTE: one word gives (x0, x2) and (x1, x3) after sxtb16: 9 instructions
 * for 6 MACs (the scalar row is 3 loads and 3 MACs per output). */
static inline __attribute__((always_inline)) void row3s2(const int8_t *x, uint32_t w02, uint32_t w1, int32_t *a0,
                                                         int32_t *a1) {
    const uint32_t v = tf_load_u32(x), e = tf_sxtb16(v), o = tf_sxtb16_ror8(v);
    const int32_t x4 = x[4];
    *a0 = tf_smlad(e, w02, *a0);                /* x0 w0 + x2 w2 */
    *a0 = tf_smlabb(o, w1, *a0);                /* x1 w1 */
    *a1 = tf_smlatb(e, w02, *a1);               /* x2 w0 */
    *a1 = tf_smlatb(o, w1, *a1);                /* x3 w1 */
    *a1 = tf_smlabt((uint32_t)x4, w02, *a1);    /* x4 w2 */
}
#endif

/* Depthwise 3x3 for one channel: rows outside x read a row of zero points (x - zx = 0 there), so only the
 * left and right edge columns need bounds; every window uses sum x * w + off * sum w. */
static inline __attribute__((always_inline)) int32_t dw3_impl(const rq_t *rp, const tf_conv_params *p,
                                                              const int8_t *xc, const int8_t *wc, int32_t ih_n,
                                                              int32_t iw_n, int32_t oh_n, int32_t ow_n, int32_t woff,
                                                              int8_t *y, uint8_t *mask, uint32_t *bitsp,
                                                              int32_t out_i, int fast, int has_mask) {
    const rq_t rl = *rp, *r = &rl; /* NOTE: local copies, as in pointwise() */
    uint32_t bv = *bitsp, *bits = &bv;
    int8_t zrow[TF_DW_ROW];
    const int32_t sh = p->stride_h, sw = p->stride_w, off = p->input_offset;
    for (int32_t i = 0; i < iw_n; i++) {
        zrow[i] = (int8_t)-off;
    }
    const int32_t w0 = wc[0], w1 = wc[1], w2 = wc[2], w3 = wc[3], w4 = wc[4], w5 = wc[5], w6 = wc[6], w7 = wc[7],
                  w8 = wc[8];
#if TF_USE_DSP
    const uint32_t w02 = TF_PACK16(w0, w2), w35 = TF_PACK16(w3, w5), w68 = TF_PACK16(w6, w8);
    const uint32_t w14 = TF_PACK16(w1, w4), w7p = TF_PACK16(w7, 0);
#endif
    int32_t ow_lo = (p->pad_w + sw - 1) / sw, ow_hi = iw_n - 3 + p->pad_w >= 0 ? (iw_n - 3 + p->pad_w) / sw + 1 : 0;
    ow_hi = ow_hi > ow_n ? ow_n : ow_hi;
    ow_lo = ow_lo > ow_hi ? ow_hi : ow_lo;
    for (int32_t oh = 0; oh < oh_n; oh++) {
        const int32_t ih0 = oh * sh - p->pad_h;
        const int8_t *r0 = ih0 >= 0 && ih0 < ih_n ? xc + ih0 * iw_n : zrow;
        const int8_t *r1 = ih0 + 1 >= 0 && ih0 + 1 < ih_n ? xc + (ih0 + 1) * iw_n : zrow;
        const int8_t *r2 = ih0 + 2 >= 0 && ih0 + 2 < ih_n ? xc + (ih0 + 2) * iw_n : zrow;
        for (int32_t ow = 0; ow < ow_n; ow++, out_i++) {
            const int32_t iw0 = ow * sw - p->pad_w;
            if (ow == ow_lo) {
                int32_t i = iw0;
#if TF_USE_DSP
                if (sw == 1) { /* two outputs per step: x[i..i+3] of a row as (x0, x2) and (x1, x3) */
                    for (; ow + 1 < ow_hi; ow += 2, out_i += 2, i += 2) {
                        uint32_t v = tf_load_u32(r0 + i), e = tf_sxtb16(v), o = tf_sxtb16_ror8(v);
                        int32_t a0 = tf_smlad(e, w02, woff), a1 = tf_smlad(o, w02, woff);
                        a0 = tf_smlabb(o, w14, a0);
                        a1 = tf_smlatb(e, w14, a1);
                        v = tf_load_u32(r1 + i), e = tf_sxtb16(v), o = tf_sxtb16_ror8(v);
                        a0 = tf_smlad(e, w35, a0);
                        a1 = tf_smlad(o, w35, a1);
                        a0 = tf_smlabt(o, w14, a0);
                        a1 = tf_smlatt(e, w14, a1);
                        v = tf_load_u32(r2 + i), e = tf_sxtb16(v), o = tf_sxtb16_ror8(v);
                        a0 = tf_smlad(e, w68, a0);
                        a1 = tf_smlad(o, w68, a1);
                        a0 = tf_smlabb(o, w7p, a0);
                        a1 = tf_smlatb(e, w7p, a1);
                        putf(r, y, mask, bits, out_i, a0, fast, has_mask);
                        putf(r, y, mask, bits, out_i + 1, a1, fast, has_mask);
                    }
                } else if (sw == 2) { /* two outputs per step from x[i..i+4] of each row */
                    for (; ow + 1 < ow_hi; ow += 2, out_i += 2, i += 4) {
                        int32_t a0 = woff, a1 = woff;
                        row3s2(r0 + i, w02, (uint32_t)w1, &a0, &a1);
                        row3s2(r1 + i, w35, (uint32_t)w4, &a0, &a1);
                        row3s2(r2 + i, w68, (uint32_t)w7, &a0, &a1);
                        putf(r, y, mask, bits, out_i, a0, fast, has_mask);
                        putf(r, y, mask, bits, out_i + 1, a1, fast, has_mask);
                    }
                }
#endif
                for (; ow < ow_hi; ow++, out_i++, i += sw) {
                    const int32_t acc = woff + r0[i] * w0 + r0[i + 1] * w1 + r0[i + 2] * w2 + r1[i] * w3 +
                                        r1[i + 1] * w4 + r1[i + 2] * w5 + r2[i] * w6 + r2[i + 1] * w7 + r2[i + 2] * w8;
                    putf(r, y, mask, bits, out_i, acc, fast, has_mask);
                }
                if (ow >= ow_n) {
                    break;
                }
            }
            const int32_t iw = ow * sw - p->pad_w;
            int32_t acc = 0;
            for (int32_t kw = 0; kw < 3; kw++) {
                if (iw + kw >= 0 && iw + kw < iw_n) {
                    const int32_t wa = wc[kw], wb = wc[3 + kw], wd = wc[6 + kw];
                    acc += (r0[iw + kw] + off) * wa + (r1[iw + kw] + off) * wb + (r2[iw + kw] + off) * wd;
                }
            }
            putf(r, y, mask, bits, out_i, acc, fast, has_mask);
        }
    }
    *bitsp = bv;
    return out_i;
}

int32_t tf_conv_dw3(const rq_t *rp, const tf_conv_params *p, const int8_t *xc, const int8_t *wc, int32_t ih_n,
                    int32_t iw_n, int32_t oh_n, int32_t ow_n, int32_t woff, int8_t *y, uint8_t *mask,
                    uint32_t *bitsp, int32_t out_i) {
    return TF_DISPATCH(dw3_impl, rp, mask, rp, p, xc, wc, ih_n, iw_n, oh_n, ow_n, woff, y, mask, bitsp, out_i);
}

/* KH x KW (stride, padding) for one output channel: interior windows without bounds checks. */
int32_t tf_conv_spatial(const rq_t *rp, const tf_conv_params *p, const int8_t *xg, const int8_t *wc, int32_t cin_g,
                        int32_t ih_n, int32_t iw_n, int32_t kh_n, int32_t kw_n, int32_t oh_n, int32_t ow_n,
                        int32_t woff, int8_t *y, uint8_t *mask, uint32_t *bitsp, int32_t out_i) {
    const rq_t rl = *rp, *r = &rl; /* NOTE: local copies, as in pointwise() */
    uint32_t bv = *bitsp, *bits = &bv;
    const int32_t sh = p->stride_h, sw = p->stride_w, off = p->input_offset, plane = ih_n * iw_n;
    const int dw3 = cin_g == 1 && kh_n == 3 && kw_n == 3;
    /* interior columns: iw0 = ow * sw - pad_w >= 0 and iw0 + kw_n <= iw_n */
    int32_t ow_lo = (p->pad_w + sw - 1) / sw, ow_hi = iw_n - kw_n + p->pad_w >= 0 ? (iw_n - kw_n + p->pad_w) / sw + 1 : 0;
    ow_hi = ow_hi > ow_n ? ow_n : ow_hi;
    ow_lo = ow_lo > ow_hi ? ow_hi : ow_lo;
    for (int32_t oh = 0; oh < oh_n; oh++) {
        const int32_t ih0 = oh * sh - p->pad_h;
        const int row_in = ih0 >= 0 && ih0 + kh_n <= ih_n;
        for (int32_t ow = 0; ow < ow_n; ow++, out_i++) {
            const int32_t iw0 = ow * sw - p->pad_w;
            int32_t acc;
            if (row_in && ow == ow_lo && ow_lo < ow_hi) {
                const int8_t *xw = xg + ih0 * iw_n + iw0;
                if (dw3) {
                    const int32_t w0 = wc[0], w1 = wc[1], w2 = wc[2], w3 = wc[3], w4 = wc[4], w5 = wc[5],
                                  w6 = wc[6], w7 = wc[7], w8 = wc[8];
                    for (; ow < ow_hi; ow++, out_i++, xw += sw) {
                        const int8_t *r1 = xw + iw_n, *r2 = r1 + iw_n;
                        put(r, y, mask, bits, out_i,
                            woff + xw[0] * w0 + xw[1] * w1 + xw[2] * w2 + r1[0] * w3 + r1[1] * w4 + r1[2] * w5 +
                                r2[0] * w6 + r2[1] * w7 + r2[2] * w8);
                    }
                } else {
                    for (; ow < ow_hi; ow++, out_i++, xw += sw) {
                        put(r, y, mask, bits, out_i, woff + window(xw, wc, cin_g, plane, iw_n, kh_n, kw_n));
                    }
                }
                ow--, out_i--; /* the for loop's increment */
                continue;
            }
            /* a window over the padding: padded x is zx, so only the taps inside count */
            const int32_t kh_lo = ih0 < 0 ? -ih0 : 0, kh_hi = ih_n - ih0 < kh_n ? ih_n - ih0 : kh_n;
            const int32_t kw_lo = iw0 < 0 ? -iw0 : 0, kw_hi = iw_n - iw0 < kw_n ? iw_n - iw0 : kw_n;
            acc = 0;
            for (int32_t ci = 0; ci < cin_g; ci++) {
                const int8_t *xc = xg + ci * plane;
                const int8_t *wk = wc + ci * kh_n * kw_n;
                for (int32_t kh = kh_lo; kh < kh_hi; kh++) {
                    const int8_t *xr = xc + (ih0 + kh) * iw_n + iw0;
                    const int8_t *wr = wk + kh * kw_n;
                    for (int32_t kw = kw_lo; kw < kw_hi; kw++) {
                        acc += ((int32_t)xr[kw] + off) * wr[kw];
                    }
                }
            }
            put(r, y, mask, bits, out_i, acc);
        }
    }
    *bitsp = bv;
    return out_i;
}

