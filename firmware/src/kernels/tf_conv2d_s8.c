/* CONV2D forward (standard, grouped, depthwise; stride; zero-point padding), optional ReLU mask.
 * Portable C always; on M4/M7 the 1x1 paths use __SMLAD (two input channels paired per instruction).
 * NOTE: sum (x + off) * w is computed as sum x * w + off * sum w (exact integers, same result): the offset
 * term is hoisted per output channel, and the bias and rounding constant are folded into one int64. */
#include "tf_dsp.h"
#include "tf_kernels.h"
#include "tf_qmath.h"

/* |x - zx| <= 255 and |w| <= 127: int32 sums of this many terms are exact. */
#define TF_CONV_MAX_TERMS 32768

tf_status tf_conv_check(const tf_dims *x, const tf_filter_dims *w, const tf_dims *y, int32_t groups,
                        int32_t stride_h, int32_t stride_w, int32_t pad_h, int32_t pad_w) {
    if (groups < 1 || stride_h < 1 || stride_w < 1 || pad_h < 0 || pad_w < 0) {
        return TF_ERR_ARG;
    }
    if (x->c % groups || w->n % groups || x->c / groups != w->c || y->c != w->n) {
        return TF_ERR_SHAPE;
    }
    if (y->h != (x->h + 2 * pad_h - w->h) / stride_h + 1 || y->w != (x->w + 2 * pad_w - w->w) / stride_w + 1 ||
        y->h < 1 || y->w < 1) {
        return TF_ERR_SHAPE;
    }
    return TF_OK;
}

/* Per output channel requantization: pre = ((acc + bias) * mult + 2^(shift-1)) >> shift, + zy. */
typedef struct {
    int64_t cb; /* bias * mult + 2^(shift-1) */
    int32_t mult, shift, out_off, lo, hi;
} rq_t;

static inline void rq_init(rq_t *r, const tf_conv_params *p, int32_t mult, int32_t shift, int32_t bias) {
    r->cb = (int64_t)bias * mult + TF_POW2_I64(shift - 1);
    r->mult = mult;
    r->shift = shift;
    r->out_off = p->output_offset;
    r->lo = p->act_min;
    r->hi = p->act_max;
}

/* NOTE: |acc + bias| < 2^32 and mult < 2^31, so v is exact in int64. For shift >= 33, floor(v / 2^shift) =
 * floor(floor(v / 2^32) / 2^(shift - 32)) and |v >> 32| < 2^31: the high word alone, |result| < 2^30. Other
 * shifts saturate to +-2^30, far outside any int8 activation range: same clamp, same mask. */
static inline int32_t rq_pre(const rq_t *r, int32_t acc) {
    const int64_t v = r->cb + (int64_t)acc * r->mult;
    if (r->shift >= 33) {
        return ((int32_t)(v >> 32) >> (r->shift - 32)) + r->out_off;
    }
    const int64_t q = v >> r->shift;
    const int64_t lim = TF_POW2_I64(30);
    return (int32_t)(q < -lim ? -lim : (q > lim ? lim : q)) + r->out_off;
}

/* Writes y[i] and mask bit i; mask bits collect in *bits and are stored a whole byte at a time. fast and
 * has_mask are constants where the callers below are instantiated (r->shift >= 33, mask != NULL). */
static inline __attribute__((always_inline)) void putf(const rq_t *r, int8_t *y, uint8_t *mask, uint32_t *bits,
                                                       int32_t i, int32_t acc, int fast, int has_mask) {
    int32_t pre;
    if (fast) {
        const int64_t v = r->cb + (int64_t)acc * r->mult;
        pre = ((int32_t)(v >> 32) >> (r->shift - 32)) + r->out_off;
    } else {
        pre = rq_pre(r, acc);
    }
    const int32_t yv = pre < r->lo ? r->lo : (pre > r->hi ? r->hi : pre);
    y[i] = (int8_t)yv;
    if (has_mask) {
        *bits |= (uint32_t)(yv == pre) << (i & 7);
        if ((i & 7) == 7) {
            mask[i >> 3] = (uint8_t)*bits;
            *bits = 0;
        }
    }
}

static inline void put(const rq_t *r, int8_t *y, uint8_t *mask, uint32_t *bits, int32_t i, int32_t acc) {
    putf(r, y, mask, bits, i, acc, r->shift >= 33, mask != NULL);
}

/* Instantiates name##_impl (always inline, last two parameters fast and has_mask) for the four cases. */
#define TF_DISPATCH(impl, rp, mask, ...)                                                                            \
    ((rp)->shift >= 33 ? ((mask) ? impl(__VA_ARGS__, 1, 1) : impl(__VA_ARGS__, 1, 0))                              \
                       : ((mask) ? impl(__VA_ARGS__, 0, 1) : impl(__VA_ARGS__, 0, 0)))

/* 1x1 stride 1: y[co, p] for all p of the plane; x (C_in/groups, plane) of this group, w (C_in/groups,). */
static inline __attribute__((always_inline)) int pointwise_impl(const rq_t *rp, const int8_t *x, const int8_t *w,
                                                                 int32_t cin, int32_t plane, int32_t woff,
                                                                 int8_t *y, uint8_t *mask, uint32_t *bitsp,
                                                                 int32_t out_i, int fast, int has_mask) {
    /* NOTE: local copies: int8 stores to y may alias anything reached through a pointer */
    const rq_t rl = *rp, *r = &rl;
    uint32_t bv = *bitsp, *bits = &bv;
    int32_t p = 0;
    for (; p + 4 <= plane; p += 4) {
        int32_t a0 = woff, a1 = woff, a2 = woff, a3 = woff, ci = 0;
        const int8_t *xp = x + p;
#if TF_USE_DSP
        const int8_t *wp2 = w, *wend = w + (cin & ~1);
        for (; wp2 < wend; wp2 += 2, xp += 2 * plane) {
            const uint32_t h = tf_load_u16(wp2);
            const uint32_t wp = tf_sxtb16(h | (h << 8)); /* (w[ci], w[ci+1]) as two int16 */
            const uint32_t va = tf_load_u32(xp), vb = tf_load_u32(xp + plane);
            const uint32_t ae = tf_sxtb16(va), be = tf_sxtb16(vb);           /* pixels 0, 2 */
            const uint32_t ao = tf_sxtb16_ror8(va), bo = tf_sxtb16_ror8(vb); /* pixels 1, 3 */
            a0 = tf_smlad(tf_pkhbt(ae, be), wp, a0);
            a2 = tf_smlad(tf_pkhtb(be, ae), wp, a2);
            a1 = tf_smlad(tf_pkhbt(ao, bo), wp, a1);
            a3 = tf_smlad(tf_pkhtb(bo, ao), wp, a3);
        }
        ci = cin & ~1;
#endif
        for (; ci < cin; ci++, xp += plane) {
            const int32_t wv = w[ci];
            a0 += xp[0] * wv;
            a1 += xp[1] * wv;
            a2 += xp[2] * wv;
            a3 += xp[3] * wv;
        }
        putf(r, y, mask, bits, out_i + p, a0, fast, has_mask);
        putf(r, y, mask, bits, out_i + p + 1, a1, fast, has_mask);
        putf(r, y, mask, bits, out_i + p + 2, a2, fast, has_mask);
        putf(r, y, mask, bits, out_i + p + 3, a3, fast, has_mask);
    }
    for (; p < plane; p++) {
        int32_t acc = woff;
        for (int32_t ci = 0; ci < cin; ci++) {
            acc += x[ci * plane + p] * w[ci];
        }
        putf(r, y, mask, bits, out_i + p, acc, fast, has_mask);
    }
    *bitsp = bv;
    return 0;
}

__attribute__((noinline)) static void pointwise(const rq_t *rp, const int8_t *x, const int8_t *w, int32_t cin,
                                                int32_t plane, int32_t woff, int8_t *y, uint8_t *mask,
                                                uint32_t *bitsp, int32_t out_i) {
    (void)TF_DISPATCH(pointwise_impl, rp, mask, rp, x, w, cin, plane, woff, y, mask, bitsp, out_i);
}

/* Two output channels of the 1x1 stride-1 case at once (the unpacked x pairs serve both): y[co0 + j, p] for
 * j < 2. Their outputs are oplane apart; each channel collects its own mask bits, so callers use it only where
 * every channel starts on a mask byte (plane % 8 == 0) or without a mask. */
static inline __attribute__((always_inline)) int pointwise2_impl(const rq_t *rp, const int8_t *x, const int8_t *w,
                                                                  int32_t cin, int32_t plane, int32_t woff0,
                                                                  int32_t woff1, int8_t *y, uint8_t *mask,
                                                                  int32_t out_i, int fast, int has_mask) {
    const rq_t r0l = rp[0], r1l = rp[1]; /* NOTE: local copies, as in pointwise() */
    uint32_t b0 = 0, b1 = 0;
    const int8_t *w1 = w + cin;
    int32_t p = 0;
    for (; p + 4 <= plane; p += 4) {
        int32_t a0 = woff0, a1 = woff0, a2 = woff0, a3 = woff0, c0 = woff1, c1 = woff1, c2 = woff1, c3 = woff1;
        int32_t ci = 0;
        const int8_t *xp = x + p;
#if TF_USE_DSP
        for (; ci + 2 <= cin; ci += 2, xp += 2 * plane) {
            const uint32_t va = tf_load_u32(xp), vb = tf_load_u32(xp + plane);
            const uint32_t ae = tf_sxtb16(va), be = tf_sxtb16(vb), ao = tf_sxtb16_ror8(va), bo = tf_sxtb16_ror8(vb);
            const uint32_t x0 = tf_pkhbt(ae, be), x2 = tf_pkhtb(be, ae), x1 = tf_pkhbt(ao, bo), x3 = tf_pkhtb(bo, ao);
            uint32_t h = tf_load_u16(w + ci);
            const uint32_t wp = tf_sxtb16(h | (h << 8));
            h = tf_load_u16(w1 + ci);
            const uint32_t wq = tf_sxtb16(h | (h << 8));
            a0 = tf_smlad(x0, wp, a0);
            a1 = tf_smlad(x1, wp, a1);
            a2 = tf_smlad(x2, wp, a2);
            a3 = tf_smlad(x3, wp, a3);
            c0 = tf_smlad(x0, wq, c0);
            c1 = tf_smlad(x1, wq, c1);
            c2 = tf_smlad(x2, wq, c2);
            c3 = tf_smlad(x3, wq, c3);
        }
#endif
        for (; ci < cin; ci++, xp += plane) {
            const int32_t wv = w[ci], wu = w1[ci];
            a0 += xp[0] * wv;
            a1 += xp[1] * wv;
            a2 += xp[2] * wv;
            a3 += xp[3] * wv;
            c0 += xp[0] * wu;
            c1 += xp[1] * wu;
            c2 += xp[2] * wu;
            c3 += xp[3] * wu;
        }
        putf(&r0l, y, mask, &b0, out_i + p, a0, fast, has_mask);
        putf(&r0l, y, mask, &b0, out_i + p + 1, a1, fast, has_mask);
        putf(&r0l, y, mask, &b0, out_i + p + 2, a2, fast, has_mask);
        putf(&r0l, y, mask, &b0, out_i + p + 3, a3, fast, has_mask);
        putf(&r1l, y, mask, &b1, out_i + plane + p, c0, fast, has_mask);
        putf(&r1l, y, mask, &b1, out_i + plane + p + 1, c1, fast, has_mask);
        putf(&r1l, y, mask, &b1, out_i + plane + p + 2, c2, fast, has_mask);
        putf(&r1l, y, mask, &b1, out_i + plane + p + 3, c3, fast, has_mask);
    }
    for (; p < plane; p++) {
        int32_t acc0 = woff0, acc1 = woff1;
        for (int32_t ci = 0; ci < cin; ci++) {
            acc0 += x[ci * plane + p] * w[ci];
            acc1 += x[ci * plane + p] * w1[ci];
        }
        putf(&r0l, y, mask, &b0, out_i + p, acc0, fast, has_mask);
        putf(&r1l, y, mask, &b1, out_i + plane + p, acc1, fast, has_mask);
    }
    return 0;
}

/* rp[0], rp[1] must both take the fast requantization or both not (TF_DISPATCH looks at rp[0]). */
__attribute__((noinline)) static void pointwise2(const rq_t *rp, const int8_t *x, const int8_t *w, int32_t cin,
                                                 int32_t plane, int32_t woff0, int32_t woff1, int8_t *y,
                                                 uint8_t *mask, int32_t out_i) {
    (void)TF_DISPATCH(pointwise2_impl, rp, mask, rp, x, w, cin, plane, woff0, woff1, y, mask, out_i);
}

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

#define TF_DW_ROW 256 /* widest input row of the 3x3 depthwise path (a row of zero points on the stack) */

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
#define TF_PACK16(a, b) (((uint32_t)(a) & 0xFFFFu) | ((uint32_t)(b) << 16))
    const uint32_t w02 = TF_PACK16(w0, w2), w35 = TF_PACK16(w3, w5), w68 = TF_PACK16(w6, w8);
    const uint32_t w14 = TF_PACK16(w1, w4), w7p = TF_PACK16(w7, 0);
#undef TF_PACK16
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

__attribute__((noinline)) static int32_t dw3(const rq_t *rp, const tf_conv_params *p, const int8_t *xc,
                                             const int8_t *wc, int32_t ih_n, int32_t iw_n, int32_t oh_n,
                                             int32_t ow_n, int32_t woff, int8_t *y, uint8_t *mask, uint32_t *bitsp,
                                             int32_t out_i) {
    return TF_DISPATCH(dw3_impl, rp, mask, rp, p, xc, wc, ih_n, iw_n, oh_n, ow_n, woff, y, mask, bitsp, out_i);
}

/* KH x KW (stride, padding) for one output channel: interior windows without bounds checks. */
__attribute__((noinline)) static int32_t spatial(const rq_t *rp, const tf_conv_params *p, const int8_t *xg,
                                                 const int8_t *wc, int32_t cin_g, int32_t ih_n, int32_t iw_n,
                                                 int32_t kh_n, int32_t kw_n, int32_t oh_n, int32_t ow_n, int32_t woff,
                                                 int8_t *y, uint8_t *mask, uint32_t *bitsp, int32_t out_i) {
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

tf_status tf_conv2d_s8(const tf_conv_params *p, const tf_per_channel_quant *q, const tf_dims *x_dims,
                       const int8_t *x, const tf_filter_dims *w_dims, const int8_t *w, const int32_t *bias,
                       const tf_dims *y_dims, int8_t *y, uint8_t *mask) {
    if (!p || !q || !x || !w || !y) {
        return TF_ERR_ARG;
    }
    tf_status st = tf_conv_check(x_dims, w_dims, y_dims, p->groups, p->stride_h, p->stride_w, p->pad_h, p->pad_w);
    if (st != TF_OK) {
        return st;
    }
    const int32_t cin_g = w_dims->c, kh_n = w_dims->h, kw_n = w_dims->w;
    const int32_t cout_g = w_dims->n / p->groups;
    if (cin_g * kh_n * kw_n > TF_CONV_MAX_TERMS) {
        return TF_ERR_OVERFLOW;
    }
    const int32_t ih_n = x_dims->h, iw_n = x_dims->w, oh_n = y_dims->h, ow_n = y_dims->w;
    const int32_t plane = ih_n * iw_n, oplane = oh_n * ow_n, wsize = cin_g * kh_n * kw_n;
    const int32_t off = p->input_offset;
    const int linear = plane == 1 && oplane == 1 && kh_n == 1 && kw_n == 1; /* NOTE: padding can make OH, OW > 1 */
    const int pointwise1 = kh_n == 1 && kw_n == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_h == 0 &&
                           p->pad_w == 0;
    uint32_t bits = 0;
    int32_t out_i = 0;
    for (int32_t co = 0; co < w_dims->n; co++) {
        const int32_t g = co / cout_g;
        const int8_t *xg = x + (int32_t)g * cin_g * plane; /* (C_in/groups, H, W) of this group */
        const int8_t *wc = w + co * wsize;                 /* (C_in/groups, KH, KW) */
        rq_t r;
        rq_init(&r, p, q->mult[co], q->shift[co], bias ? bias[co] : 0);
        const int32_t woff = off * tf_sum_s8(wc, wsize); /* the offset term of a window without padding */
        if (linear) {
            put(&r, y, mask, &bits, out_i, tf_dot_s8(xg, wc, cin_g) + woff);
            out_i++;
            continue;
        }
        if (pointwise1 && co + 1 < w_dims->n && (co + 1) / cout_g == g && (!mask || (plane & 7) == 0) &&
            (q->shift[co] >= 33) == (q->shift[co + 1] >= 33)) {
            rq_t r2[2];
            r2[0] = r;
            rq_init(&r2[1], p, q->mult[co + 1], q->shift[co + 1], bias ? bias[co + 1] : 0);
            pointwise2(r2, xg, wc, cin_g, plane, woff, off * tf_sum_s8(wc + wsize, wsize), y, mask, out_i);
            out_i += 2 * oplane;
            co++;
            continue;
        }
        if (pointwise1) {
            pointwise(&r, xg, wc, cin_g, plane, woff, y, mask, &bits, out_i);
            out_i += oplane;
            continue;
        }
        if (cin_g == 1 && kh_n == 3 && kw_n == 3 && iw_n <= TF_DW_ROW) {
            out_i = dw3(&r, p, xg, wc, ih_n, iw_n, oh_n, ow_n, woff, y, mask, &bits, out_i);
            continue;
        }
        out_i = spatial(&r, p, xg, wc, cin_g, ih_n, iw_n, kh_n, kw_n, oh_n, ow_n, woff, y, mask, &bits, out_i);
    }
    if (mask && (out_i & 7)) { /* padding bits of the last byte are zero, as numpy packbits */
        mask[out_i >> 3] = (uint8_t)bits;
    }
    return TF_OK;
}
