/* CONV2D forward (standard, grouped, depthwise; stride; zero-point padding), optional ReLU mask.
 * Portable C always; on M4/M7 the 1x1 paths use __SMLAD (two input channels paired per instruction).
 * NOTE: sum (x + off) * w is computed as sum x * w + off * sum w (exact integers, same result): the offset
 * term is hoisted per output channel, and the bias and rounding constant are folded into one int64. */
#include "tf_conv_rq.h"
#include "tf_dsp.h"

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

/* NOTE: helper B's entry point (tf_conv2d_spatial_s8.c); belongs in tf_conv_rq.h with the others. */
int tf_conv_patch3(const tf_conv_params *p, const tf_per_channel_quant *q, const tf_dims *x_dims, const int8_t *x,
                   const tf_filter_dims *w_dims, const int8_t *w, const int32_t *bias, const tf_dims *y_dims,
                   int8_t *y, const uint8_t *mask);

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
    if (tf_conv_patch3(p, q, x_dims, x, w_dims, w, bias, y_dims, y, mask)) { /* the first conv: 3x3, C_in <= 4 */
        return TF_OK;
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
            out_i = tf_conv_dw3(&r, p, xg, wc, ih_n, iw_n, oh_n, ow_n, woff, y, mask, &bits, out_i);
            continue;
        }
        out_i = tf_conv_spatial(&r, p, xg, wc, cin_g, ih_n, iw_n, kh_n, kw_n, oh_n, ow_n, woff, y, mask, &bits,
                                out_i);
    }
    if (mask && (out_i & 7)) { /* padding bits of the last byte are zero, as numpy packbits */
        mask[out_i >> 3] = (uint8_t)bits;
    }
    return TF_OK;
}
