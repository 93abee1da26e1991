/* CONV2D forward, spatial kernels called by tf_conv2d_s8.c: KxK with stride and zero-point padding and the 3x3
 * depthwise case (__SMLAD paths for stride 1 and 2; small planes through a padded copy), one output channel per
 * call (the first conv's patch path: tf_conv2d_patch_s8.c). It does no 1x1 convs and keeps every result identical to
 * the reference (device_agent/engine). Over 400 lines: the portable and __SMLAD forms of each window shape stay beside
 * each other. */
#include "tf_conv_rq.h"
#include "tf_dsp.h"

/* sum x * w over a K x K window fully inside x (no padding): rows iw_n apart, cin channels plane apart. */
static inline int32_t window(const int8_t *x, const int8_t *w, int32_t cin, int32_t plane, int32_t iw_n, int32_t kh_n,
                             int32_t kw_n) {
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

/* The fast requantization (rqf_t, tf_conv_rq.h) takes acc + bias: the kernels below start acc at the bias. */

/* tf_sat8, tf_mmla: tf_conv_rq.h */

/* Writes y[i] (and mask bit i) from acc: s8 (rqf: acc includes the bias), fast and has_mask are constants
 * per instance. */
static TF_AI void put8(const rq_t *r, const rqf_t *q, int8_t *y, uint8_t *mask, uint32_t *bits, int32_t i, int32_t acc,
                       int s8, int fast, int has_mask) {
    if (!s8) {
        putf(r, y, mask, bits, i, acc, fast, has_mask);
        return;
    }
    const int32_t pre = tf_mmla(acc, q->mult, q->k) >> q->t, yv = tf_sat8(pre);
    y[i] = (int8_t)yv;
    if (has_mask) {
        *bits |= (uint32_t)(yv == pre) << (i & 7);
        if ((i & 7) == 7) {
            mask[i >> 3] = (uint8_t)*bits;
            *bits = 0;
        }
    }
}

/* put8 of outputs i and i + 1: with a mask, both bits join the byte in one step. */
static TF_AI void put8x2(const rq_t *r, const rqf_t *q, int8_t *y, uint8_t *mask, uint32_t *bits, int32_t i, int32_t a0,
                         int32_t a1, int s8, int fast, int has_mask) {
    if (!s8 || !has_mask) {
        put8(r, q, y, mask, bits, i, a0, s8, fast, has_mask);
        put8(r, q, y, mask, bits, i + 1, a1, s8, fast, has_mask);
        return;
    }
    const int32_t p0 = tf_mmla(a0, q->mult, q->k) >> q->t, p1 = tf_mmla(a1, q->mult, q->k) >> q->t;
    const int32_t y0 = tf_sat8(p0), y1 = tf_sat8(p1);
    const uint32_t k = (uint32_t)i & 7;
    y[i] = (int8_t)y0;
    y[i + 1] = (int8_t)y1;
    if (k != 7) {
        *bits |= ((uint32_t)(y0 == p0) | (uint32_t)(y1 == p1) << 1) << k;
        if (k == 6) {
            mask[i >> 3] = (uint8_t)*bits;
            *bits = 0;
        }
    } else {
        mask[i >> 3] = (uint8_t)(*bits | (uint32_t)(y0 == p0) << 7);
        *bits = (uint32_t)(y1 == p1);
    }
}

#if TF_USE_DSP
/* The second output row of a 2 x 2 step (s8 only): y[i], y[i + 1] written, their mask bits kept in bw at bit j
 * (j even: both in one word) until the first row's bits are in the stream (put_bits). */
static TF_AI void put8x2_b(const rqf_t *q, int8_t *y, int32_t i, int32_t a0, int32_t a1, uint32_t *bw, int32_t j,
                           int has_mask) { /* j < 32 */
    const int32_t p0 = tf_mmla(a0, q->mult, q->k) >> q->t, p1 = tf_mmla(a1, q->mult, q->k) >> q->t;
    const int32_t y0 = tf_sat8(p0), y1 = tf_sat8(p1);
    y[i] = (int8_t)y0;
    y[i + 1] = (int8_t)y1;
    if (has_mask) {
        *bw |= ((uint32_t)(y0 == p0) | (uint32_t)(y1 == p1) << 1) << j;
    }
}

/* put8x2_b of one output */
static TF_AI void put8_b(const rqf_t *q, int8_t *y, int32_t i, int32_t a0, uint32_t *bw, int32_t j, int has_mask) {
    const int32_t p0 = tf_mmla(a0, q->mult, q->k) >> q->t, y0 = tf_sat8(p0);
    y[i] = (int8_t)y0;
    if (has_mask) {
        *bw |= (uint32_t)(y0 == p0) << j;
    }
}

/* Appends the n <= 24 mask bits of v (bit 0 first, zero above n) to the stream at output i. */
static TF_AI void put_bits(uint8_t *mask, uint32_t *bits, int32_t i, uint32_t v, int32_t n) {
    int32_t t = (i & 7) + n;
    uint32_t acc = *bits | v << (i & 7);
    for (uint8_t *d = mask + (i >> 3); t >= 8; t -= 8, acc >>= 8) {
        *d++ = (uint8_t)acc;
    }
    *bits = acc;
}
#endif

/* Instantiates impl (last parameters s8, fast, has_mask) for the rqf cases and the two general putf cases.
 * NOTE: channels without the rqf form are rare, so they share putf's general form (fast 0: rq_pre tests the
 * shift itself, the same numbers): two instances fewer of each kernel, ~8 KB of flash the plan store keeps
 * (MCUNet's 99kb rung needs all of it). rp: unused, kept for the call sites' symmetry with TF_DISPATCH. */
#define TF_DISPATCH8(impl, s8, rp, mask, ...)                                                                          \
    ((s8) ? ((mask) ? impl(__VA_ARGS__, 1, 1, 1) : impl(__VA_ARGS__, 1, 1, 0))                                         \
          : ((mask) ? impl(__VA_ARGS__, 0, 0, 1) : impl(__VA_ARGS__, 0, 0, 0)))

/* One 3-tap kernel row at stride 2 for two neighbouring outputs: x[0..2] (a0) and x[2..4] (a1); w02 = (w0, w2)
 * as int16 halves, w1 in the low half. NOTE: one word gives (x0, x2) and (x1, x3) after sxtb16: 9 instructions
 * for 6 MACs (the scalar row is a load and a MAC per tap). */
static TF_AI void row3s2(const int8_t *x, uint32_t w02, uint32_t w1, int32_t *a0, int32_t *a1) {
#if TF_USE_DSP
    const uint32_t v = tf_load_u32(x), e = tf_sxtb16(v), o = tf_sxtb16_ror8(v);
    const int32_t x4 = x[4];
    *a0 = tf_smlad(e, w02, *a0);             /* x0 w0 + x2 w2 */
    *a0 = tf_smlabb(o, w1, *a0);             /* x1 w1 */
    *a1 = tf_smlatb(e, w02, *a1);            /* x2 w0 */
    *a1 = tf_smlatb(o, w1, *a1);             /* x3 w1 */
    *a1 = tf_smlabt((uint32_t)x4, w02, *a1); /* x4 w2 */
#else
    const int32_t w0 = (int16_t)(w02 & 0xFFFFu), w2 = (int16_t)(w02 >> 16), w1s = (int16_t)(w1 & 0xFFFFu);
    *a0 += x[0] * w0 + x[1] * w1s + x[2] * w2;
    *a1 += x[2] * w0 + x[3] * w1s + x[4] * w2;
#endif
}

/* sum (x + off) w over the taps of a 3-wide window at column iw inside the row (the others are padding). */
static TF_AI int32_t edge3(const int8_t *x, const int8_t *w, int32_t iw, int32_t iw_n, int32_t off) {
    int32_t acc = 0;
    for (int32_t kw = 0; kw < 3; kw++) {
        if (iw + kw >= 0 && iw + kw < iw_n) {
            acc += (x[iw + kw] + off) * w[kw];
        }
    }
    return acc;
}

#if TF_USE_DSP
/* Depthwise 3x3 stride 1, a 2 x 2 block of outputs: input rows x0 .. x3 (columns 0..3 each) give out[0], out[1]
 * (the output row of x0) and out[2], out[3] (the next row), each started at woff. NOTE: the two
 * middle rows serve both output rows: 4 loads and 8 unpacks for 4 outputs (the 2-output step: 3 and 6 for 2). */
static TF_AI void dw3x2x2(const int8_t *x0, const int8_t *x1, const int8_t *x2, const int8_t *x3, uint32_t w02,
                          uint32_t w35, uint32_t w68, uint32_t w14, uint32_t w7p, int32_t woff, int32_t out[4]) {
    uint32_t v = tf_load_u32(x0), e = tf_sxtb16(v), o = tf_sxtb16_ror8(v);
    int32_t a0 = tf_smlad(e, w02, woff), a1 = tf_smlad(o, w02, woff);
    a0 = tf_smlabb(o, w14, a0);
    a1 = tf_smlatb(e, w14, a1);
    v = tf_load_u32(x1), e = tf_sxtb16(v), o = tf_sxtb16_ror8(v);
    a0 = tf_smlad(e, w35, a0);
    a1 = tf_smlad(o, w35, a1);
    a0 = tf_smlabt(o, w14, a0);
    a1 = tf_smlatt(e, w14, a1);
    int32_t b0 = tf_smlad(e, w02, woff), b1 = tf_smlad(o, w02, woff);
    b0 = tf_smlabb(o, w14, b0);
    b1 = tf_smlatb(e, w14, b1);
    v = tf_load_u32(x2), e = tf_sxtb16(v), o = tf_sxtb16_ror8(v);
    a0 = tf_smlad(e, w68, a0);
    a1 = tf_smlad(o, w68, a1);
    a0 = tf_smlabb(o, w7p, a0);
    a1 = tf_smlatb(e, w7p, a1);
    b0 = tf_smlad(e, w35, b0);
    b1 = tf_smlad(o, w35, b1);
    b0 = tf_smlabt(o, w14, b0);
    b1 = tf_smlatt(e, w14, b1);
    v = tf_load_u32(x3), e = tf_sxtb16(v), o = tf_sxtb16_ror8(v);
    b0 = tf_smlad(e, w68, b0);
    b1 = tf_smlad(o, w68, b1);
    b0 = tf_smlabb(o, w7p, b0);
    b1 = tf_smlatb(e, w7p, b1);
    out[0] = a0;
    out[1] = a1;
    out[2] = b0;
    out[3] = b1;
}
#endif

/* Depthwise 3x3 for one channel: rows outside x read a row of zero points (x - zx = 0 there), so only the
 * left and right edge columns need bounds; every window uses sum x * w + off * sum w. */
static TF_AI int32_t dw3_impl(const rq_t *rp, const rqf_t *qp, const tf_conv_params *p, const int8_t *xc,
                              const int8_t *wc, int32_t ih_n, int32_t iw_n, int32_t oh_n, int32_t ow_n, int32_t woff,
                              int8_t *y, uint8_t *mask, uint32_t *bitsp, int32_t out_i, int s8, int fast,
                              int has_mask) {
    const rq_t rl = *rp, *r = &rl; /* NOTE: local copies, as in pointwise() */
    const rqf_t ql = *qp, *q = &ql;
    uint32_t bv = *bitsp, *bits = &bv;
    int8_t zrow[TF_DW_ROW];
    const int32_t sh = p->stride_h, sw = p->stride_w, off = p->input_offset, pw = p->pad_w;
    const int32_t b0 = s8 ? q->bias : 0; /* rqf takes acc + bias */
    for (int32_t i = 0; i < iw_n; i++) {
        zrow[i] = (int8_t)-off;
    }
    woff += b0;
    const int32_t w0 = wc[0], w1 = wc[1], w2 = wc[2], w3 = wc[3], w4 = wc[4], w5 = wc[5], w6 = wc[6], w7 = wc[7],
                  w8 = wc[8];
    const uint32_t w02 = TF_PACK16(w0, w2), w35 = TF_PACK16(w3, w5), w68 = TF_PACK16(w6, w8);
#if TF_USE_DSP
    const uint32_t w14 = TF_PACK16(w1, w4), w7p = TF_PACK16(w7, 0);
#endif
    /* NOTE: the edge windows of pad 1 miss one column: left (iw = -1) column 0, right (iw = iw_n - 2) column 2 */
    const int32_t woffl = woff - off * (w0 + w3 + w6), woffr = woff - off * (w2 + w5 + w8);
    int32_t ow_lo = (pw + sw - 1) / sw, ow_hi = iw_n - 3 + pw >= 0 ? (iw_n - 3 + pw) / sw + 1 : 0;
    ow_hi = ow_hi > ow_n ? ow_n : ow_hi;
    ow_lo = ow_lo > ow_hi ? ow_hi : ow_lo;
    for (int32_t oh = 0; oh < oh_n; oh++) {
        const int32_t ih0 = oh * sh - p->pad_h;
        const int8_t *r0 = ih0 >= 0 && ih0 < ih_n ? xc + ih0 * iw_n : zrow;
        const int8_t *r1 = ih0 + 1 >= 0 && ih0 + 1 < ih_n ? xc + (ih0 + 1) * iw_n : zrow;
        const int8_t *r2 = ih0 + 2 >= 0 && ih0 + 2 < ih_n ? xc + (ih0 + 2) * iw_n : zrow;
        int32_t ow = 0;
        for (int32_t end = ow_lo;; end = ow_n) { /* edge columns: [0, ow_lo), then [ow_hi, ow_n) */
            for (; ow < end; ow++, out_i++) {
                const int32_t iw = ow * sw - pw;
                int32_t acc;
                if (iw == -1 && iw_n >= 2) {
                    acc = woffl + r0[0] * w1 + r0[1] * w2 + r1[0] * w4 + r1[1] * w5 + r2[0] * w7 + r2[1] * w8;
                } else if (iw == iw_n - 2 && iw >= 0) {
                    acc = woffr + r0[iw] * w0 + r0[iw + 1] * w1 + r1[iw] * w3 + r1[iw + 1] * w4 + r2[iw] * w6 +
                          r2[iw + 1] * w7;
                } else {
                    acc = b0 + edge3(r0, wc, iw, iw_n, off) + edge3(r1, wc + 3, iw, iw_n, off) +
                          edge3(r2, wc + 6, iw, iw_n, off);
                }
                put8(r, q, y, mask, bits, out_i, acc, s8, fast, has_mask);
            }
            if (end == ow_n) {
                break;
            }
            int32_t i = ow * sw - pw;
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
                    put8x2(r, q, y, mask, bits, out_i, a0, a1, s8, fast, has_mask);
                }
            }
#endif
            if (sw == 2) { /* two outputs per step from x[i..i+4] of each row */
                for (; ow + 1 < ow_hi; ow += 2, out_i += 2, i += 4) {
                    int32_t a0 = woff, a1 = woff;
                    row3s2(r0 + i, w02, (uint32_t)w1, &a0, &a1);
                    row3s2(r1 + i, w35, (uint32_t)w4, &a0, &a1);
                    row3s2(r2 + i, w68, (uint32_t)w7, &a0, &a1);
                    put8x2(r, q, y, mask, bits, out_i, a0, a1, s8, fast, has_mask);
                }
            }
            for (; ow < ow_hi; ow++, out_i++, i += sw) {
                const int32_t acc = woff + r0[i] * w0 + r0[i + 1] * w1 + r0[i + 2] * w2 + r1[i] * w3 + r1[i + 1] * w4 +
                                    r1[i + 2] * w5 + r2[i] * w6 + r2[i + 1] * w7 + r2[i + 2] * w8;
                put8(r, q, y, mask, bits, out_i, acc, s8, fast, has_mask);
            }
        }
    }
    *bitsp = bv;
    return out_i;
}

/* row pitch of the padded plane of small depthwise layers (a 16 x 16 input: 18 x 20): five words */
#define TF_DW_PITCH 20
#define TF_DW_PAD (TF_DW_PITCH * 20) /* its bytes */

/* Depthwise 3x3 for one small channel: x copied once into a plane already padded with zero points (hp rows of
 * wp <= TF_DW_PITCH used bytes), so every window is interior: no edge columns, no per-row pointer choice.
 * NOTE: on 8 x 8 and 4 x 4 planes the edges and per-row set-up of dw3_impl cost more than the windows; the
 * constant pitch makes the three rows of a window immediate offsets of one pointer (fewer registers). */
static TF_AI int32_t dw3p_impl(const rq_t *rp, const rqf_t *qp, const tf_conv_params *p, const int8_t *xc,
                               const int8_t *wc, int32_t ih_n, int32_t iw_n, int32_t oh_n, int32_t ow_n, int32_t hp,
                               int32_t wp, int32_t woff, int8_t *y, uint8_t *mask, uint32_t *bitsp, int32_t out_i,
                               int s8, int fast, int has_mask) {
    const rq_t rl = *rp, *r = &rl;
    const rqf_t ql = *qp, *q = &ql;
    uint32_t bv = *bitsp, *bits = &bv;
    uint32_t buf32[TF_DW_PAD / 4];
    int8_t *buf = (int8_t *)buf32;
    const int32_t sh = p->stride_h, sw = p->stride_w, off = p->input_offset;
    const uint32_t z4 = ((uint32_t)-off & 0xFFu) * 0x01010101u;
    for (uint32_t *row = buf32, *end = buf32 + hp * (TF_DW_PITCH / 4); row < end; row += TF_DW_PITCH / 4) {
        row[0] = z4; /* NOTE: a row per turn (five words, strd + strd + str), not a word */
        row[1] = z4;
        row[2] = z4;
        row[3] = z4;
        row[4] = z4;
    }
    /* input rows and columns that some window reads (the others are never read) */
    const int32_t nh = ih_n < hp - p->pad_h ? ih_n : hp - p->pad_h, nw = iw_n < wp - p->pad_w ? iw_n : wp - p->pad_w;
    for (int32_t ih = 0; ih < nh; ih++) {
        const int8_t *src = xc + ih * iw_n;
        int8_t *dst = buf + (ih + p->pad_h) * TF_DW_PITCH + p->pad_w;
        int32_t k = 0;
        for (; k + 4 <= nw; k += 4) {
            uint32_t v;
            __builtin_memcpy(&v, src + k, 4);
            __builtin_memcpy(dst + k, &v, 4);
        }
        for (; k < nw; k++) {
            dst[k] = src[k];
        }
    }
    woff += s8 ? q->bias : 0; /* rqf takes acc + bias */
    const int32_t w0 = wc[0], w1 = wc[1], w2 = wc[2], w3 = wc[3], w4 = wc[4], w5 = wc[5], w6 = wc[6], w7 = wc[7],
                  w8 = wc[8];
    const uint32_t w02 = TF_PACK16(w0, w2), w35 = TF_PACK16(w3, w5), w68 = TF_PACK16(w6, w8);
#if TF_USE_DSP
    const uint32_t w14 = TF_PACK16(w1, w4), w7p = TF_PACK16(w7, 0);
#endif
    int32_t oh = 0;
#if TF_USE_DSP
    if (sw == 1 && sh == 1 && (s8 || !has_mask)) { /* two output rows at a time (mask bits per row: ba, bb) */
        for (; oh + 1 < oh_n; oh += 2, out_i += ow_n) {
            const int8_t *r0 = buf + oh * TF_DW_PITCH;
            uint32_t ba = 0, bb = 0; /* the two rows' mask bits (ow_n <= TF_DW_PITCH - 3) */
            int32_t ow = 0;
            for (; ow + 1 < ow_n; ow += 2, out_i += 2) {
                int32_t a[4];
                dw3x2x2(r0 + ow, r0 + ow + TF_DW_PITCH, r0 + ow + 2 * TF_DW_PITCH, r0 + ow + 3 * TF_DW_PITCH, w02, w35,
                        w68, w14, w7p, woff, a);
                if (s8) {
                    put8x2_b(q, y, out_i, a[0], a[1], &ba, ow, has_mask);
                    put8x2_b(q, y, out_i + ow_n, a[2], a[3], &bb, ow, has_mask);
                } else {
                    put8x2(r, q, y, mask, bits, out_i, a[0], a[1], s8, fast, 0);
                    put8x2(r, q, y, mask, bits, out_i + ow_n, a[2], a[3], s8, fast, 0);
                }
            }
            for (; ow < ow_n; ow++, out_i++) {
                for (int32_t k = 0; k < 2; k++) {
                    const int8_t *x0 = r0 + k * TF_DW_PITCH + ow, *x1 = x0 + TF_DW_PITCH, *x2 = x1 + TF_DW_PITCH;
                    const int32_t acc = woff + x0[0] * w0 + x0[1] * w1 + x0[2] * w2 + x1[0] * w3 + x1[1] * w4 +
                                        x1[2] * w5 + x2[0] * w6 + x2[1] * w7 + x2[2] * w8;
                    if (s8) {
                        put8_b(q, y, out_i + k * ow_n, acc, k ? &bb : &ba, ow, has_mask);
                    } else {
                        put8(r, q, y, mask, bits, out_i + k * ow_n, acc, s8, fast, 0);
                    }
                }
            }
            if (has_mask) {
                put_bits(mask, bits, out_i - ow_n, ba, ow_n);
                put_bits(mask, bits, out_i, bb, ow_n);
            }
        }
    }
#endif
    for (; oh < oh_n; oh++) {
        const int8_t *r0 = buf + oh * sh * TF_DW_PITCH, *r1 = r0 + TF_DW_PITCH, *r2 = r1 + TF_DW_PITCH;
        int32_t ow = 0, i = 0;
#if TF_USE_DSP
        if (sw == 1) { /* as in dw3_impl */
            for (; ow + 1 < ow_n; ow += 2, out_i += 2, i += 2) {
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
                put8x2(r, q, y, mask, bits, out_i, a0, a1, s8, fast, has_mask);
            }
        }
#endif
        if (sw == 2) {
            for (; ow + 1 < ow_n; ow += 2, out_i += 2, i += 4) {
                int32_t a0 = woff, a1 = woff;
                row3s2(r0 + i, w02, (uint32_t)w1, &a0, &a1);
                row3s2(r1 + i, w35, (uint32_t)w4, &a0, &a1);
                row3s2(r2 + i, w68, (uint32_t)w7, &a0, &a1);
                put8x2(r, q, y, mask, bits, out_i, a0, a1, s8, fast, has_mask);
            }
        }
        for (; ow < ow_n; ow++, out_i++, i += sw) {
            const int32_t acc = woff + r0[i] * w0 + r0[i + 1] * w1 + r0[i + 2] * w2 + r1[i] * w3 + r1[i + 1] * w4 +
                                r1[i + 2] * w5 + r2[i] * w6 + r2[i + 1] * w7 + r2[i + 2] * w8;
            put8(r, q, y, mask, bits, out_i, acc, s8, fast, has_mask);
        }
    }
    *bitsp = bv;
    return out_i;
}

int32_t tf_conv_dw3(const rq_t *rp, const tf_conv_params *p, const int8_t *xc, const int8_t *wc, int32_t ih_n,
                    int32_t iw_n, int32_t oh_n, int32_t ow_n, int32_t woff, int8_t *y, uint8_t *mask, uint32_t *bitsp,
                    int32_t out_i) {
    rqf_t q = {0, 0, 0, 0};
    const int s8 = rqf_of(&q, p, rp, 9);
    /* padded plane: every window's rows and columns, + 1 column read by the two-output steps, rounded to words */
    const int32_t hp = (oh_n - 1) * p->stride_h + 3, wp = ((ow_n - 1) * p->stride_w + 4 + 3) & ~3;
    if (wp <= TF_DW_PITCH && hp * TF_DW_PITCH <= TF_DW_PAD) {
        return TF_DISPATCH8(dw3p_impl, s8, rp, mask, rp, &q, p, xc, wc, ih_n, iw_n, oh_n, ow_n, hp, wp, woff, y, mask,
                            bitsp, out_i);
    }
    return TF_DISPATCH8(dw3_impl, s8, rp, mask, rp, &q, p, xc, wc, ih_n, iw_n, oh_n, ow_n, woff, y, mask, bitsp, out_i);
}

#define TF_S2_CIN 4 /* most input channels of the 3x3 stride-2 path (the first conv has 3) */

/* 3x3 stride-2 conv, cin <= TF_S2_CIN input channels, for one output channel (the first conv): the cin x 3
 * kernel rows of an output row are pointers (a row of zero points above and below x, as in dw3_impl), two
 * outputs per step (row3s2); only the padded edge columns take the per-tap path. */
static TF_AI int32_t conv3s2_impl(const rq_t *rp, const rqf_t *qp, const tf_conv_params *p, const int8_t *xg,
                                  const int8_t *wc, int32_t cin, int32_t ih_n, int32_t iw_n, int32_t oh_n, int32_t ow_n,
                                  int32_t woff, int8_t *y, uint8_t *mask, uint32_t *bitsp, int32_t out_i, int s8,
                                  int fast, int has_mask) {
    const rq_t rl = *rp, *r = &rl;
    const rqf_t ql = *qp, *q = &ql;
    uint32_t bv = *bitsp, *bits = &bv;
    int8_t zrow[TF_DW_ROW];
    const int8_t *row[TF_S2_CIN * 3]; /* (cin, 3) row pointers of the current output row */
    uint32_t wp[TF_S2_CIN * 3][2];    /* (cin, 3) kernel rows as ((w0, w2) int16 pair, w1) */
    const int32_t sh = p->stride_h, off = p->input_offset, pw = p->pad_w, nr = cin * 3, plane = ih_n * iw_n;
    const int32_t b0 = s8 ? q->bias : 0; /* rqf takes acc + bias */
    woff += b0;
    for (int32_t i = 0; i < iw_n; i++) {
        zrow[i] = (int8_t)-off;
    }
    for (int32_t k = 0; k < nr; k++) {
        wp[k][0] = TF_PACK16(wc[3 * k], wc[3 * k + 2]);
        wp[k][1] = (uint32_t)(int32_t)wc[3 * k + 1];
    }
    int32_t ow_lo = (pw + 1) / 2, ow_hi = iw_n - 3 + pw >= 0 ? (iw_n - 3 + pw) / 2 + 1 : 0;
    ow_hi = ow_hi > ow_n ? ow_n : ow_hi;
    ow_lo = ow_lo > ow_hi ? ow_hi : ow_lo;
    for (int32_t oh = 0; oh < oh_n; oh++) {
        const int32_t ih0 = oh * sh - p->pad_h;
        for (int32_t k = 0; k < nr; k++) {
            const int32_t ih = ih0 + k % 3;
            row[k] = ih >= 0 && ih < ih_n ? xg + (k / 3) * plane + ih * iw_n : zrow;
        }
        int32_t ow = 0;
        for (int32_t end = ow_lo;; end = ow_n) { /* edge columns (and an odd last one): [0, ow_lo), [.., ow_n) */
            for (; ow < end; ow++, out_i++) {
                const int32_t iw = ow * 2 - pw;
                int32_t acc = b0;
                for (int32_t k = 0; k < nr; k++) {
                    acc += edge3(row[k], wc + 3 * k, iw, iw_n, off);
                }
                put8(r, q, y, mask, bits, out_i, acc, s8, fast, has_mask);
            }
            if (end == ow_n) {
                break;
            }
            for (int32_t i = ow * 2 - pw; ow + 1 < ow_hi; ow += 2, out_i += 2, i += 4) {
                int32_t a0 = woff, a1 = woff;
                for (int32_t k = 0; k < nr; k += 3) {
                    row3s2(row[k] + i, wp[k][0], wp[k][1], &a0, &a1);
                    row3s2(row[k + 1] + i, wp[k + 1][0], wp[k + 1][1], &a0, &a1);
                    row3s2(row[k + 2] + i, wp[k + 2][0], wp[k + 2][1], &a0, &a1);
                }
                put8x2(r, q, y, mask, bits, out_i, a0, a1, s8, fast, has_mask);
            }
        }
    }
    *bitsp = bv;
    return out_i;
}

/* KH x KW (stride, padding) for one output channel: interior windows without bounds checks. */
static TF_AI int32_t spatial_impl(const rq_t *rp, const rqf_t *qp, const tf_conv_params *p, const int8_t *xg,
                                  const int8_t *wc, int32_t cin_g, int32_t ih_n, int32_t iw_n, int32_t kh_n,
                                  int32_t kw_n, int32_t oh_n, int32_t ow_n, int32_t woff, int8_t *y, uint8_t *mask,
                                  uint32_t *bitsp, int32_t out_i, int s8, int fast, int has_mask) {
    const rq_t rl = *rp, *r = &rl; /* NOTE: local copies, as in pointwise() */
    const rqf_t ql = *qp, *q = &ql;
    uint32_t bv = *bitsp, *bits = &bv;
    const int32_t b0 = s8 ? q->bias : 0; /* rqf takes acc + bias */
    woff += b0;
    const int32_t sh = p->stride_h, sw = p->stride_w, off = p->input_offset, plane = ih_n * iw_n;
    const int dw3 = cin_g == 1 && kh_n == 3 && kw_n == 3;
    /* interior columns: iw0 = ow * sw - pad_w >= 0 and iw0 + kw_n <= iw_n */
    int32_t ow_lo = (p->pad_w + sw - 1) / sw,
            ow_hi = iw_n - kw_n + p->pad_w >= 0 ? (iw_n - kw_n + p->pad_w) / sw + 1 : 0;
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
                    const int32_t w0 = wc[0], w1 = wc[1], w2 = wc[2], w3 = wc[3], w4 = wc[4], w5 = wc[5], w6 = wc[6],
                                  w7 = wc[7], w8 = wc[8];
                    for (; ow < ow_hi; ow++, out_i++, xw += sw) {
                        const int8_t *r1 = xw + iw_n, *r2 = r1 + iw_n;
                        put8(r, q, y, mask, bits, out_i,
                             woff + xw[0] * w0 + xw[1] * w1 + xw[2] * w2 + r1[0] * w3 + r1[1] * w4 + r1[2] * w5 +
                                 r2[0] * w6 + r2[1] * w7 + r2[2] * w8,
                             s8, fast, has_mask);
                    }
                } else {
                    for (; ow < ow_hi; ow++, out_i++, xw += sw) {
                        put8(r, q, y, mask, bits, out_i, woff + window(xw, wc, cin_g, plane, iw_n, kh_n, kw_n), s8,
                             fast, has_mask);
                    }
                }
                ow--, out_i--; /* the for loop's increment */
                continue;
            }
            /* a window over the padding: padded x is zx, so only the taps inside count */
            const int32_t kh_lo = ih0 < 0 ? -ih0 : 0, kh_hi = ih_n - ih0 < kh_n ? ih_n - ih0 : kh_n;
            const int32_t kw_lo = iw0 < 0 ? -iw0 : 0, kw_hi = iw_n - iw0 < kw_n ? iw_n - iw0 : kw_n;
            acc = b0;
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
            put8(r, q, y, mask, bits, out_i, acc, s8, fast, has_mask);
        }
    }
    *bitsp = bv;
    return out_i;
}

int32_t tf_conv_spatial(const rq_t *rp, const tf_conv_params *p, const int8_t *xg, const int8_t *wc, int32_t cin_g,
                        int32_t ih_n, int32_t iw_n, int32_t kh_n, int32_t kw_n, int32_t oh_n, int32_t ow_n,
                        int32_t woff, int8_t *y, uint8_t *mask, uint32_t *bitsp, int32_t out_i) {
    rqf_t q = {0, 0, 0, 0};
    const int s8 = rqf_of(&q, p, rp, cin_g * kh_n * kw_n);
    if (kh_n == 3 && kw_n == 3 && p->stride_w == 2 && cin_g <= TF_S2_CIN && iw_n <= TF_DW_ROW) {
        return TF_DISPATCH8(conv3s2_impl, s8, rp, mask, rp, &q, p, xg, wc, cin_g, ih_n, iw_n, oh_n, ow_n, woff, y, mask,
                            bitsp, out_i);
    }
    return TF_DISPATCH8(spatial_impl, s8, rp, mask, rp, &q, p, xg, wc, cin_g, ih_n, iw_n, kh_n, kw_n, oh_n, ow_n, woff,
                        y, mask, bitsp, out_i);
}
