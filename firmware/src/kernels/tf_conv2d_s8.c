/* CONV2D forward (standard, grouped, depthwise; stride; zero-point padding), optional ReLU mask.
 * Portable C always; on M4/M7 the 1x1 paths use __SMLAD (two input channels paired per instruction).
 * NOTE: sum (x + off) * w is computed as sum x * w + off * sum w (exact integers, same result): the offset
 * term is hoisted per output channel, and the bias and rounding constant are folded into one int64.
 * Over 400 lines: the checks, the dispatcher and the 1x1 paths (portable and __SMLAD) of one op. */
#include "tf_conv_rq.h"
#include "tf_dsp.h"

/* |x - zx| <= 255 and |w| <= 127: int32 sums of this many terms are exact. */
#define TF_CONV_MAX_TERMS 32768

tf_status tf_conv_check(const tf_dims *x, const tf_filter_dims *w, const tf_dims *y, int32_t groups, int32_t stride_h,
                        int32_t stride_w, int32_t pad_h, int32_t pad_w) {
    /* NOTE: a pad over the kernel size only adds outputs that see padding alone; refusing it (as the Python
     * reference does) bounds every offset the kernels compute from pads (a fuzzed pad of 2^30 overflowed 2 pad) */
    if (groups < 1 || stride_h < 1 || stride_w < 1 || pad_h < 0 || pad_w < 0 || pad_h > w->h || pad_w > w->w) {
        return TF_ERR_ARG;
    }
    if (x->c % groups || w->n % groups || x->c / groups != w->c || y->c != w->n) {
        return TF_ERR_SHAPE;
    }
    const int64_t span_h = (int64_t)x->h + 2 * (int64_t)pad_h - w->h,
                  span_w = (int64_t)x->w + 2 * (int64_t)pad_w - w->w;
    if (span_h < 0 || span_w < 0 || y->h != span_h / stride_h + 1 || y->w != span_w / stride_w + 1) {
        return TF_ERR_SHAPE;
    }
    return TF_OK;
}

/* 1x1 stride 1: y[co, p] for all p of the plane; x (C_in/groups, plane) of this group, w (C_in/groups,). */
static inline __attribute__((always_inline)) int pointwise_impl(const rq_t *rp, const int8_t *x, const int8_t *w,
                                                                int32_t cin, int32_t plane, int32_t woff, int8_t *y,
                                                                uint8_t *mask, uint32_t *bitsp, int32_t out_i, int fast,
                                                                int has_mask) {
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
                                                int32_t plane, int32_t woff, int8_t *y, uint8_t *mask, uint32_t *bitsp,
                                                int32_t out_i) {
    (void)TF_DISPATCH(pointwise_impl, rp, mask, rp, x, w, cin, plane, woff, y, mask, bitsp, out_i);
}

/* Two output channels of the 1x1 stride-1 case at once (the unpacked x pairs serve both): y[co0 + j, p] for
 * j < 2. Their outputs are oplane apart; each channel collects its own mask bits, so callers use it only where
 * every channel starts on a mask byte (plane % 8 == 0) or without a mask. */
static inline __attribute__((always_inline)) int pointwise2_impl(const rq_t *rp, const int8_t *x, const int8_t *w,
                                                                 int32_t cin, int32_t plane, int32_t woff0,
                                                                 int32_t woff1, int8_t *y, uint8_t *mask, int32_t out_i,
                                                                 int fast, int has_mask) {
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
                                                 int32_t plane, int32_t woff0, int32_t woff1, int8_t *y, uint8_t *mask,
                                                 int32_t out_i) {
    (void)TF_DISPATCH(pointwise2_impl, rp, mask, rp, x, w, cin, plane, woff0, woff1, y, mask, out_i);
}

/* Unpack and multiply-add helpers of the 4-channel path: __SMLAD and friends on M4/M7, the same integer
 * arithmetic in C elsewhere (so the host tests run this very path). */
#if TF_USE_DSP
#define pw_sxtb16 tf_sxtb16
#define pw_sxtb16_ror8 tf_sxtb16_ror8
#define pw_smlad tf_smlad
#else
static inline uint32_t pw_sxtb16(uint32_t v) {
    return (uint32_t)(uint16_t)(int16_t)(int8_t)(v & 0xFF) | ((uint32_t)(uint16_t)(int16_t)(int8_t)(v >> 16) << 16);
}
static inline uint32_t pw_sxtb16_ror8(uint32_t v) { return pw_sxtb16((v >> 8) | (v << 24)); }
static inline int32_t pw_smlad(uint32_t a, uint32_t b, int32_t acc) {
    return (int32_t)((uint32_t)acc + (uint32_t)((int16_t)(a & 0xFFFF) * (int16_t)(b & 0xFFFF) +
                                                (int16_t)(a >> 16) * (int16_t)(b >> 16)));
}
#endif
/* sum w[i], i < n, int8 (int32). NOTE: on M4/M7 four bytes per usada8: biased to unsigned by ^ 0x80 each. */
static inline int32_t pw_sum_s8(const int8_t *w, int32_t n) {
    int32_t i = 0, s = 0;
#if TF_USE_DSP
    uint32_t u = 0;
    for (; i + 4 <= n; i += 4) {
        const uint32_t v = tf_load_u32(w + i) ^ 0x80808080u;
        __asm__("usada8 %0, %1, %2, %0" : "+r"(u) : "r"(v), "r"(0u));
    }
    s = (int32_t)u - 128 * i;
#endif
    for (; i < n; i++) {
        s += w[i];
    }
    return s;
}
static inline uint32_t pw_ld16(const int8_t *p) {
    uint16_t v;
    __builtin_memcpy(&v, p, 2);
    return v;
}

#define TF_PW4_CHUNK 96 /* C_in per packed weight chunk: 4 channels x C_in / 2 words = 768 bytes of stack */
#define TF_PW4_PX 16    /* pixels per block when C_in spans several chunks: 4 x 16 int32 partial sums */

/* wq[(ci / 2) * 4 + j] = (w[j, ci], w[j, ci + 1]) as two int16, ci < n (even), for four channels of weights
 * w[j, ci] at w + j * stride + ci; sums[j] = sum_ci w[j, ci] unless sums is NULL. */
static inline __attribute__((always_inline)) void pw4_pack(uint32_t *wq, const int8_t *w, int32_t stride, int32_t n,
                                                           int32_t *sums) {
    for (int32_t j = 0; j < 4; j++, w += stride) {
        uint32_t *q = wq + j;
        int32_t ci = 0, s = 0;
#if TF_USE_DSP
        for (; ci + 4 <= n; ci += 4, q += 8) {
            const uint32_t v = tf_load_u32(w + ci);
            const uint32_t e = tf_sxtb16(v), o = tf_sxtb16_ror8(v); /* (w0, w2), (w1, w3) */
            q[0] = tf_pkhbt(e, o);                                  /* (w0, w1) */
            q[4] = tf_pkhtb(o, e);                                  /* (w2, w3) */
            if (sums) {
                s = tf_smlad(e, 0x00010001u, s);
                s = tf_smlad(o, 0x00010001u, s);
            }
        }
#endif
        for (; ci < n; ci += 2, q += 4) {
            *q = (uint32_t)(uint16_t)(int16_t)w[ci] | ((uint32_t)(uint16_t)(int16_t)w[ci + 1] << 16);
            s += w[ci] + w[ci + 1];
        }
        if (sums) {
            sums[j] = s;
        }
    }
}

/* Requantizes and stores channel j's two pixels; their mask bits go to bits 8j + 6, 8j + 7 of *mb. */
static inline __attribute__((always_inline)) void pw4_put(const rqf_t *f, int8_t *yc, int32_t a, int32_t b,
                                                          uint32_t *mb, int j, int has_mask) {
    const int32_t pa = rqf_pre(f, a), pb = rqf_pre(f, b);
    const int32_t ya = rqf_sat8(pa), yb = rqf_sat8(pb);
    yc[0] = (int8_t)ya;
    yc[1] = (int8_t)yb;
    if (has_mask) {
        if (ya == pa) {
            *mb |= 1u << (8 * j + 6);
        }
        if (yb == pb) {
            *mb |= 1u << (8 * j + 7);
        }
    }
}

/* Two pixels (p, p + 1) of four channels: 8 sums over the C_in of wq..wend, starting from ia (a0 b0 a1 b1 ..:
 * channel j pixel p, p + 1), one x pair unpack serves four channels. last: requantize and store at yp (+ mask
 * bits), else store the 8 sums at po. by8 (a constant): C_in of wq..wend % 8 == 0, eight input channels per turn
 * of the asm loop (its end test once per 8, not per 4). */
static inline __attribute__((always_inline)) void pw4_px2(const rqf_t *f, const int32_t *ia, const int8_t *xp,
                                                          const uint32_t *wq, const uint32_t *wend, int32_t plane,
                                                          int8_t *yp, uint32_t *mb, int32_t *po, int last, int has_mask,
                                                          int by8) {
    int32_t a0 = ia[0], b0 = ia[1], a1 = ia[2], b1 = ia[3], a2 = ia[4], b2 = ia[5], a3 = ia[6], b3 = ia[7];
#if TF_USE_DSP
    /* NOTE: the compiler spills accumulators out of this loop (15 live values for 14 registers); by hand only
     * the loop end lives on the stack. Four input channels per turn: needs wend > wq, C_in % 4 == 0. */
    uint32_t tt, xx, ww;
    /* two input channels: x pair unpack (6) + 4 weight pairs x 2 pixels (12) */
#define PW4_STEP                                                                                                       \
    "ldrh %[t], [%[xp]]\n\t"                                                                                           \
    "ldrh %[x0], [%[xp], %[pl]]\n\t"                                                                                   \
    "add %[xp], %[xp], %[pl], lsl #1\n\t"                                                                              \
    "orr %[t], %[t], %[x0], lsl #16\n\t"                                                                               \
    "sxtb16 %[x0], %[t]\n\t"                                                                                           \
    "sxtb16 %[t], %[t], ror #8\n\t"                                                                                    \
    "ldr %[w], [%[wq]], #4\n\t"                                                                                        \
    "smlad %[a0], %[x0], %[w], %[a0]\n\t"                                                                              \
    "smlad %[b0], %[t], %[w], %[b0]\n\t"                                                                               \
    "ldr %[w], [%[wq]], #4\n\t"                                                                                        \
    "smlad %[a1], %[x0], %[w], %[a1]\n\t"                                                                              \
    "smlad %[b1], %[t], %[w], %[b1]\n\t"                                                                               \
    "ldr %[w], [%[wq]], #4\n\t"                                                                                        \
    "smlad %[a2], %[x0], %[w], %[a2]\n\t"                                                                              \
    "smlad %[b2], %[t], %[w], %[b2]\n\t"                                                                               \
    "ldr %[w], [%[wq]], #4\n\t"                                                                                        \
    "smlad %[a3], %[x0], %[w], %[a3]\n\t"                                                                              \
    "smlad %[b3], %[t], %[w], %[b3]\n\t"
#define PW4_OPERANDS                                                                                                   \
    : [a0] "+r"(a0), [b0] "+r"(b0), [a1] "+r"(a1), [b1] "+r"(b1), [a2] "+r"(a2), [b2] "+r"(b2), [a3] "+r"(a3),       \
      [b3] "+r"(b3), [xp] "+r"(xp), [wq] "+r"(wq), [t] "=&r"(tt), [x0] "=&r"(xx), [w] "=&r"(ww)                       \
    : [pl] "r"(plane), [we] "m"(wend)                                                                                \
    : "cc", "memory"
    if (by8) {
        __asm__("2:\n\t" PW4_STEP PW4_STEP PW4_STEP PW4_STEP "ldr %[w], %[we]\n\t"
                "cmp %[wq], %[w]\n\t"
                "bne 2b" PW4_OPERANDS);
    } else {
        __asm__("2:\n\t" PW4_STEP PW4_STEP "ldr %[w], %[we]\n\t"
                "cmp %[wq], %[w]\n\t"
                "bne 2b" PW4_OPERANDS);
    }
#undef PW4_OPERANDS
#undef PW4_STEP
#else
    (void)by8;
    for (; wq < wend; wq += 4, xp += 2 * plane) {
        const uint32_t t = pw_ld16(xp) | (pw_ld16(xp + plane) << 16); /* x[ci, p..p+1], x[ci+1, p..p+1] */
        const uint32_t x0 = pw_sxtb16(t), x1 = pw_sxtb16_ror8(t);     /* (x[ci, p], x[ci+1, p]), p + 1 */
        a0 = pw_smlad(x0, wq[0], a0);
        b0 = pw_smlad(x1, wq[0], b0);
        a1 = pw_smlad(x0, wq[1], a1);
        b1 = pw_smlad(x1, wq[1], b1);
        a2 = pw_smlad(x0, wq[2], a2);
        b2 = pw_smlad(x1, wq[2], b2);
        a3 = pw_smlad(x0, wq[3], a3);
        b3 = pw_smlad(x1, wq[3], b3);
    }
#endif
    if (!last) {
        po[0] = a0;
        po[1] = b0;
        po[2] = a1;
        po[3] = b1;
        po[4] = a2;
        po[5] = b2;
        po[6] = a3;
        po[7] = b3;
        return;
    }
    if (has_mask) {
        *mb >>= 2;
    }
    pw4_put(&f[0], yp, a0, b0, mb, 0, has_mask);
    pw4_put(&f[1], yp + plane, a1, b1, mb, 1, has_mask);
    pw4_put(&f[2], yp + 2 * plane, a2, b2, mb, 2, has_mask);
    pw4_put(&f[3], yp + 3 * plane, a3, b3, mb, 3, has_mask);
}

/* Pixels p0 .. p0 + n - 1 (n even; with a mask n % 8 == 0) of four channels over the C_in of wq..wend; the
 * pair at p0 + k starts from the 8 sums at ia + 4 * k * ia_step (ia_step 0: one set for all). last / has_mask
 * / by8 as pw4_px2; partial sums go to po + 4 * k.
 * NOTE: with a mask, eight pixels per outer step: after four two-pixel steps (each shifting mb right by 2)
 * channel j's eight bits sit in byte j of mb, in order. */
static inline __attribute__((always_inline)) void pw4_run(const rqf_t *f, const int32_t *ia, int32_t ia_step,
                                                          const int8_t *x, const uint32_t *wq, const uint32_t *wend,
                                                          int32_t plane, int32_t p0, int32_t n, int8_t *yo, uint8_t *mo,
                                                          int32_t *po, int last, int has_mask, int by8) {
    if (!last || !has_mask) {
        for (int32_t k = 0; k < n; k += 2) {
            pw4_px2(f, ia + 4 * k * ia_step, x + p0 + k, wq, wend, plane, yo + p0 + k, NULL, last ? NULL : po + 4 * k,
                    last, 0, by8);
        }
        return;
    }
    const int32_t mplane = plane >> 3;
    for (int32_t k = 0; k < n; k += 8) {
        uint32_t mb = 0;
        const int32_t *ik = ia + 4 * k * ia_step;
        const int32_t p = p0 + k;
        pw4_px2(f, ik, x + p, wq, wend, plane, yo + p, &mb, NULL, 1, 1, by8);
        pw4_px2(f, ik + 8 * ia_step, x + p + 2, wq, wend, plane, yo + p + 2, &mb, NULL, 1, 1, by8);
        pw4_px2(f, ik + 16 * ia_step, x + p + 4, wq, wend, plane, yo + p + 4, &mb, NULL, 1, 1, by8);
        pw4_px2(f, ik + 24 * ia_step, x + p + 6, wq, wend, plane, yo + p + 6, &mb, NULL, 1, 1, by8);
        uint8_t *m = mo + (p >> 3);
        m[0] = (uint8_t)mb;
        m[mplane] = (uint8_t)(mb >> 8);
        m[2 * mplane] = (uint8_t)(mb >> 16);
        m[3 * mplane] = (uint8_t)(mb >> 24);
    }
}

/* pw4 for C_in > TF_PW4_CHUNK: per block of TF_PW4_PX pixels, chunk by chunk of C_in, the sums wait on the
 * stack between chunks (each chunk's weights repacked per block). i8 as pw4_run's ia with step 0. */
__attribute__((noinline)) static void pw4_big(const rqf_t *f, const int32_t *i8, const int8_t *x, const int8_t *w,
                                              uint32_t *wq, int32_t cin, int32_t plane, int8_t *yo, uint8_t *mo) {
    int32_t part[4 * TF_PW4_PX];
    for (int32_t p0 = 0; p0 < plane; p0 += TF_PW4_PX) {
        const int32_t n = plane - p0 < TF_PW4_PX ? plane - p0 : TF_PW4_PX;
        for (int32_t c0 = 0; c0 < cin; c0 += TF_PW4_CHUNK) {
            const int32_t cc = cin - c0 < TF_PW4_CHUNK ? cin - c0 : TF_PW4_CHUNK;
            pw4_pack(wq, w + c0, cin, cc, NULL);
            const int8_t *xc = x + c0 * plane;
            const int32_t *ia = c0 ? part : i8;
            const int32_t step = c0 ? 1 : 0;
            /* NOTE: TF_PW4_CHUNK % 8 == 0: every chunk of a C_in % 8 == 0 layer takes the by8 loop */
            if (c0 + cc < cin) {
                pw4_run(f, ia, step, xc, wq, wq + 2 * cc, plane, p0, n, yo, mo, part, 0, 0, (cc & 7) == 0);
            } else if (mo) {
                pw4_run(f, ia, step, xc, wq, wq + 2 * cc, plane, p0, n, yo, mo, NULL, 1, 1, (cc & 7) == 0);
            } else {
                pw4_run(f, ia, step, xc, wq, wq + 2 * cc, plane, p0, n, yo, mo, NULL, 1, 0, (cc & 7) == 0);
            }
        }
    }
}

/* Four output channels of a 1x1 stride-1 conv, fast requantization: y[j, p] for j < 4, p < plane.
 * x (C_in, plane), w (4, C_in), bias b[j], input offset off; wq a 2 * TF_PW4_CHUNK word buffer; y, mask at
 * output index out_i of channel 0 (plane % 8 == 0 and out_i % 8 == 0 with a mask, else plane even).
 * NOTE: C_in <= TF_PW4_CHUNK: weights packed once (their sums on the way), one pass. Larger C_in: per block of
 * TF_PW4_PX pixels, chunk by chunk, the sums wait on the stack between chunks (weights repacked per block). */
__attribute__((noinline)) static void pw4(const rqf_t *f, const int32_t *b, int32_t off, const int8_t *x,
                                          const int8_t *w, uint32_t *wq, int32_t cin, int32_t plane, int8_t *y,
                                          uint8_t *mask, int32_t out_i) {
    int32_t ws[4];
    if (cin <= TF_PW4_CHUNK) {
        pw4_pack(wq, w, cin, cin, ws);
    } else {
        for (int32_t j = 0; j < 4; j++) {
            ws[j] = pw_sum_s8(w + j * cin, cin);
        }
    }
    const int32_t i0 = b[0] + off * ws[0], i1 = b[1] + off * ws[1], i2 = b[2] + off * ws[2], i3 = b[3] + off * ws[3];
    const int32_t i8[8] = {i0, i0, i1, i1, i2, i2, i3, i3};
    int8_t *yo = y + out_i;
    uint8_t *mo = mask ? mask + (out_i >> 3) : NULL;
    if (cin > TF_PW4_CHUNK) {
        pw4_big(f, i8, x, w, wq, cin, plane, yo, mo);
    } else if (cin & 7) {
        if (mask) {
            pw4_run(f, i8, 0, x, wq, wq + 2 * cin, plane, 0, plane, yo, mo, NULL, 1, 1, 0);
        } else {
            pw4_run(f, i8, 0, x, wq, wq + 2 * cin, plane, 0, plane, yo, mo, NULL, 1, 0, 0);
        }
    } else if (mask) {
        pw4_run(f, i8, 0, x, wq, wq + 2 * cin, plane, 0, plane, yo, mo, NULL, 1, 1, 1);
    } else {
        pw4_run(f, i8, 0, x, wq, wq + 2 * cin, plane, 0, plane, yo, mo, NULL, 1, 0, 1);
    }
}

/* Channels co..co+3 through pw4 if the shapes and all four requantizations allow it; 1 if done. */
static int try_pw4(const tf_conv_params *p, const tf_per_channel_quant *q, const int8_t *xg, const int8_t *wc,
                   const int32_t *bias, int32_t co, int32_t cin, int32_t plane, int8_t *y, uint8_t *mask,
                   int32_t out_i) {
    if (cin < 4 || (cin & 3) || (plane & (mask ? 7 : 1)) || (mask && (out_i & 7))) {
        return 0;
    }
    rqf_t f[4];
    int32_t b[4];
    for (int32_t j = 0; j < 4; j++) {
        b[j] = bias ? bias[co + j] : 0;
        if (!rqf_init(&f[j], p, q->mult[co + j], q->shift[co + j], b[j], (int64_t)cin * TF_RQF_TAP)) {
            return 0;
        }
    }
    uint32_t wq[2 * TF_PW4_CHUNK];
    pw4(f, b, p->input_offset, xg, wc, wq, cin, plane, y, mask, out_i);
    return 1;
}

tf_status tf_conv2d_s8(const tf_conv_params *p, const tf_per_channel_quant *q, const tf_dims *x_dims, const int8_t *x,
                       const tf_filter_dims *w_dims, const int8_t *w, const int32_t *bias, const tf_dims *y_dims,
                       int8_t *y, uint8_t *mask) {
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
    const int pointwise1 =
        kh_n == 1 && kw_n == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_h == 0 && p->pad_w == 0;
    uint32_t bits = 0;
    int32_t out_i = 0;
    for (int32_t co = 0; co < w_dims->n; co++) {
        const int32_t g = co / cout_g;
        const int8_t *xg = x + (int32_t)g * cin_g * plane; /* (C_in/groups, H, W) of this group */
        const int8_t *wc = w + co * wsize;                 /* (C_in/groups, KH, KW) */
        if (pointwise1 && co + 3 < w_dims->n && (co + 3) / cout_g == g &&
            try_pw4(p, q, xg, wc, bias, co, cin_g, plane, y, mask, out_i)) {
            out_i += 4 * oplane;
            co += 3;
            continue;
        }
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
        out_i = tf_conv_spatial(&r, p, xg, wc, cin_g, ih_n, iw_n, kh_n, kw_n, oh_n, ow_n, woff, y, mask, &bits, out_i);
    }
    if (mask && (out_i & 7)) { /* padding bits of the last byte are zero, as numpy packbits */
        mask[out_i >> 3] = (uint8_t)bits;
    }
    return TF_OK;
}
