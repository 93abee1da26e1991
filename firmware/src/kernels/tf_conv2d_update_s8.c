/* CONV2D_UPDATE: QAS-scaled SGD with stochastic rounding, one output channel at a time (compute dW, db for
 * channel c, apply, discard: no gradient buffer). Only input channels < k (the saved ones) are updated. */
#include "tf_dsp.h"
#include "tf_conv_update_check.h"
#include "tf_kernels.h"
#include "tf_qmath.h"

#define UPD_CHUNK 32 /* weights of one output channel whose sums are held at once (128 B of stack) */
#if TF_USE_DSP
#define UPD_GU_WORDS 128 /* one g row unpacked to int16 pairs: planes up to 256 pixels (512 B of stack) */
#endif

/* How one output channel turns acc into the new weight: w - scaled_update(acc, m, e, rnd, 255), clamped to
 * [-127, 127]. Two exact 32x32->64 forms cover the exponents seen in practice; anything else takes the
 * reference code.
 * NOTE (bounds): |acc| <= TF_UPDATE_MAX_PIXELS * 128 * 255 < 2^30 and 0 <= m < 2^17 give |v| = |acc * m| < 2^47,
 * so the 2^56 clamp of tf_scaled_update never acts. The +-255 clamp is implied by the final one: for any int8 w,
 * w - 255 <= -127 and w + 255 >= 127, so clamp(w - clamp(out, -255, 255)) == clamp(w - out). With s = min(-e, 62):
 *  UPD_MUL   (s <= 32, M = m * 2^(32-s) < 2^31): out = floor((v + (rnd >> (32-s))) / 2^s)
 *            = floor((acc * M + rnd) / 2^32): writing rnd = r * 2^(32-s) + l with 0 <= l < 2^(32-s), the low
 *            part l adds less than one unit of 2^(32-s) to a multiple of 2^(32-s), so the floor is unchanged.
 *            |acc * M| < 2^61: one SMLAL into (rnd, 0), out is the high word.
 *  UPD_SHIFT (32 < s <= 62, t = s - 32 in [1, 30]): out = floor(X / 2^(32+t)) with X = v + rnd * 2^t
 *            (|X| < 2^63), i.e. the high word of X shifted right by t (nested floors): rnd * 2^t as two words
 *            (rnd << t, rnd >> (32 - t)), one SMLAL of acc * m into them, one ASR, no 64-bit shift.
 * In both forms |out| < 2^30, so w - out is exact in int32. Checked against tf_scaled_update by
 * tests/update/test_update_fast.c. */
enum { UPD_REF = 0, UPD_MUL = 1, UPD_SHIFT = 2 };
typedef struct {
    int32_t mode, m, e;
    int32_t mm; /* UPD_MUL: M; UPD_SHIFT: t */
} upd_rule;

static inline upd_rule upd_make_rule(int32_t m, int32_t e) {
    upd_rule r = {UPD_REF, m, e, 0};
    if (e < 0 && m >= 0 && m < (1 << 17)) {
        const int32_t s = -e > 62 ? 62 : -e;
        if (s > 32) {
            r.mode = UPD_SHIFT;
            r.mm = s - 32;
        } else if (((int64_t)m << (32 - s)) < ((int64_t)1 << 31)) {
            r.mode = UPD_MUL;
            r.mm = (int32_t)((int64_t)m << (32 - s));
        }
    }
    return r;
}

/* clamp(nw, -127, 127). NOTE: DSP: SSAT to [-128, 127], then -128 (only from nw <= -128) becomes -127. */
static inline int8_t upd_clamp_w(int32_t nw) {
#if TF_USE_DSP
    int32_t r;
    __asm__("ssat %0, #8, %1" : "=r"(r) : "r"(nw));
    return (int8_t)(r == -128 ? TF_WEIGHT_MIN : r);
#else
    nw = nw < TF_WEIGHT_MIN ? TF_WEIGHT_MIN : nw;
    return (int8_t)(nw > TF_WEIGHT_MAX ? TF_WEIGHT_MAX : nw);
#endif
}

/* The reference: tf_scaled_update then the weight clamp. */
static inline int8_t upd_ref(int8_t w, int32_t acc, int32_t m, int32_t e, uint32_t rnd) {
    const int64_t dw = tf_scaled_update(acc, m, e, rnd, 255);
    return (int8_t)tf_clamp_i32((int64_t)w - dw, TF_WEIGHT_MIN, TF_WEIGHT_MAX);
}

/* The two fast forms (see above): out from acc and rnd, then the new weight. */
static inline int32_t upd_out_mul(int32_t acc, int32_t mm, uint32_t rnd) {
    return (int32_t)(((int64_t)acc * mm + (int64_t)rnd) >> 32);
}
static inline int32_t upd_out_shift(int32_t acc, int32_t m, int32_t t, uint32_t rnd) {
    const uint64_t r = (uint64_t)(rnd >> (32 - t)) << 32 | (uint32_t)(rnd << t); /* rnd * 2^t, t in [1, 30] */
    const int64_t x = (int64_t)acc * m + (int64_t)r;
    return (int32_t)(x >> 32) >> t;
}
static inline int8_t upd_mul(int8_t w, int32_t acc, int32_t mm, uint32_t rnd) {
    return upd_clamp_w(w - upd_out_mul(acc, mm, rnd));
}
static inline int8_t upd_shift(int8_t w, int32_t acc, int32_t m, int32_t t, uint32_t rnd) {
    return upd_clamp_w(w - upd_out_shift(acc, m, t, rnd));
}

/* New bias b - scaled_update(gsum, m, e, rnd, INT32_MAX), clamped to int32. NOTE: |gsum| <= 128 * 32768 = 2^22,
 * so the bounds above hold and |out| < 2^30: the INT32_MAX limit never acts either. */
static inline int32_t upd_bias(int32_t b, int32_t gsum, int32_t m, int32_t e, uint32_t rnd) {
    if (gsum == 0) { /* out = 0 in every form (0 <= r < 2^s before the shift): b stays */
        return b;
    }
    const upd_rule r = upd_make_rule(m, e);
    int64_t out;
    if (r.mode == UPD_MUL) {
        out = upd_out_mul(gsum, r.mm, rnd);
    } else if (r.mode == UPD_SHIFT) {
        out = upd_out_shift(gsum, m, r.mm, rnd);
    } else {
        out = tf_scaled_update(gsum, m, e, rnd, INT32_MAX);
    }
    return tf_clamp_i32((int64_t)b - out, INT32_MIN, INT32_MAX);
}

/* New value of one weight: w, its sum acc (|acc| < 2^30), rnd = tf_rng_u32 of its flat index. */
static inline int8_t upd_one(const upd_rule *r, int8_t w, int32_t acc, uint32_t rnd) {
    if (r->mode == UPD_MUL) {
        return upd_mul(w, acc, r->mm, rnd);
    }
    if (r->mode == UPD_SHIFT) {
        return upd_shift(w, acc, r->m, r->mm, rnd);
    }
    return upd_ref(w, acc, r->m, r->e, rnd);
}

/* tf_rng_u32 finishing rounds, given hc = idx * 0x9E3779B1 ^ step * 0x85EBCA77 ^ tensor_id * 0xC2B2AE3D. */
static inline uint32_t upd_mix(uint32_t h) {
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    return h;
}

/* Update n consecutive weights wc[i] (flat indices flat0 + i) from their sums acc[i]. The mode test is
 * hoisted out of the loop (one loop per form); the index product of tf_rng_u32 is stepped by addition. */
static void upd_row(const upd_rule *r, const int32_t *acc, int8_t *wc, int32_t n, uint32_t flat0, uint32_t seed) {
    uint32_t hi = flat0 * 0x9E3779B1u;
    if (r->mode == UPD_MUL) {
        const int32_t mm = r->mm;
        for (int32_t i = 0; i < n; i++, hi += 0x9E3779B1u) {
            wc[i] = upd_mul(wc[i], acc[i], mm, upd_mix(hi ^ seed));
        }
    } else if (r->mode == UPD_SHIFT) {
        const int32_t m = r->m, t = r->mm;
        for (int32_t i = 0; i < n; i++, hi += 0x9E3779B1u) {
            wc[i] = upd_shift(wc[i], acc[i], m, t, upd_mix(hi ^ seed));
        }
    } else {
        for (int32_t i = 0; i < n; i++, hi += 0x9E3779B1u) {
            wc[i] = upd_ref(wc[i], acc[i], r->m, r->e, upd_mix(hi ^ seed));
        }
    }
}

#if TF_USE_DSP
static inline uint32_t upd_usada8(uint32_t a, uint32_t b, uint32_t acc) {
    uint32_t r;
    __asm__("usada8 %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc));
    return r;
}
#endif

/* sum a[i], i < n (tf_sum_s8). NOTE: DSP: flipping the sign bits maps int8 a to a + 128 as uint8, which USADA8
 * against 0 sums four at a time; 128 per element is taken off at the end (exact: n <= 32768). */
#if TF_USE_DSP
/* upd_sum_s8 that also tells whether a[0..n) is all zero (*zero = 1). */
static inline int32_t upd_sum_zero_s8(const int8_t *a, int32_t n, int *zero) {
    int32_t acc = 0, i = 0;
    uint32_t any = 0;
#if TF_USE_DSP
    uint32_t u = 0;
    for (; i + 4 <= n; i += 4) {
        const uint32_t v = tf_load_u32(a + i);
        any |= v;
        u = upd_usada8(v ^ 0x80808080u, 0, u);
    }
    acc = (int32_t)u - 128 * i;
#endif
    for (; i < n; i++) {
        acc += a[i];
        any |= (uint8_t)a[i];
    }
    *zero = any == 0;
    return acc;
}
#endif

static inline int32_t upd_sum_s8(const int8_t *a, int32_t n) {
    int32_t acc = 0, i = 0;
#if TF_USE_DSP
    uint32_t u = 0;
    for (; i + 4 <= n; i += 4) {
        u = upd_usada8(tf_load_u32(a + i) ^ 0x80808080u, 0, u);
    }
    acc = (int32_t)u - 128 * i;
#endif
    for (; i < n; i++) {
        acc += a[i];
    }
    return acc;
}

/* The 1x1 stride-1 weights of output channel co: acc = sum_p g[p] (x[il, p] - zx) for il < kmax, then the
 * update. gc (plane,), x (kmax, plane), wc (kmax,) with flat indices flat0 + il. */
static void update_pointwise(const tf_conv_update_params *p, const int8_t *gc, int32_t gsum, const int8_t *x,
                             int32_t plane, int32_t kmax, const upd_rule *rule, int8_t *wc, uint32_t flat0) {
    const int32_t goff = p->input_offset * gsum;
    const uint32_t seed = p->step * 0x85EBCA77u ^ p->w_tensor_id * 0xC2B2AE3Du;
    int32_t acc[UPD_CHUNK];
#if TF_USE_DSP
    /* NOTE: the g row is sign-extended once per output channel (bytes 0,2 then 1,3 of each word, the order
     * SXTB16 / SXTB16 ROR 8 give the x words), then shared by two input channels per pass. */
    uint32_t gu[UPD_GU_WORDS];
    const int32_t nq = plane >> 2;
    const int use_gu = 2 * nq <= UPD_GU_WORDS;
    if (use_gu) {
        for (int32_t q = 0; q < nq; q++) {
            const uint32_t v = tf_load_u32(gc + 4 * q);
            gu[2 * q] = tf_sxtb16(v);
            gu[2 * q + 1] = tf_sxtb16_ror8(v);
        }
    }
#endif
    for (int32_t il0 = 0; il0 < kmax; il0 += UPD_CHUNK) {
        const int32_t n = kmax - il0 < UPD_CHUNK ? kmax - il0 : UPD_CHUNK;
        const int8_t *xc = x + il0 * plane;
        int32_t i = 0;
#if TF_USE_DSP
        for (; use_gu && i + 2 <= n; i += 2, xc += 2 * plane) {
            const int8_t *x0 = xc, *x1 = xc + plane;
            const uint32_t *g = gu;
            int32_t a0 = 0, a1 = 0;
            for (int32_t q = 0; q < nq; q++, x0 += 4, x1 += 4, g += 2) {
                const uint32_t v0 = tf_load_u32(x0), v1 = tf_load_u32(x1);
                a0 = tf_smlad(g[0], tf_sxtb16(v0), a0);
                a1 = tf_smlad(g[0], tf_sxtb16(v1), a1);
                a0 = tf_smlad(g[1], tf_sxtb16_ror8(v0), a0);
                a1 = tf_smlad(g[1], tf_sxtb16_ror8(v1), a1);
            }
            for (int32_t px = 4 * nq; px < plane; px++) {
                a0 += (int32_t)gc[px] * xc[px];
                a1 += (int32_t)gc[px] * xc[plane + px];
            }
            acc[i] = a0 + goff;
            acc[i + 1] = a1 + goff;
        }
#endif
        for (; i < n; i++, xc += plane) {
            acc[i] = tf_dot_s8(gc, xc, plane) + goff;
        }
        upd_row(rule, acc, wc + il0, n, flat0 + (uint32_t)il0, seed);
    }
}

#if TF_USE_DSP
#define UPD_PAIR_MAX_PLANE 128 /* two g rows unpacked: 4 words per 4 pixels, 512 B of stack */
/* Two output channels of a 1x1 stride-1 groups-1 update (plane % 4 == 0, plane <= 128): acc for both channels
 * and two input channels per pass, so each x word is loaded and sign-extended once for two channels and each
 * unpacked g word serves two input channels. gc, gc1 (plane,); x (kmax, plane); wc, wc1 (kmax,) at flat0, flat1. */
static void update_pointwise_pair(const tf_conv_update_params *p, const int8_t *gc, const int8_t *gc1,
                                  const int32_t *gsum, const int8_t *x, int32_t plane, int32_t kmax,
                                  const upd_rule *rule, int8_t *wc, int8_t *wc1, uint32_t flat0, uint32_t flat1) {
    const int32_t goff0 = p->input_offset * gsum[0], goff1 = p->input_offset * gsum[1];
    const uint32_t seed = p->step * 0x85EBCA77u ^ p->w_tensor_id * 0xC2B2AE3Du;
    const int32_t nq = plane >> 2;
    uint32_t gu[4 * (UPD_PAIR_MAX_PLANE / 4)];
    int32_t acc0[UPD_CHUNK], acc1[UPD_CHUNK];
    /* NOTE: per 4 pixels: channel co bytes 0,2 | 1,3, then channel co+1 bytes 0,2 | 1,3 (SXTB16 / ROR 8 order) */
    for (int32_t q = 0; q < nq; q++) {
        const uint32_t v0 = tf_load_u32(gc + 4 * q), v1 = tf_load_u32(gc1 + 4 * q);
        gu[4 * q] = tf_sxtb16(v0);
        gu[4 * q + 1] = tf_sxtb16_ror8(v0);
        gu[4 * q + 2] = tf_sxtb16(v1);
        gu[4 * q + 3] = tf_sxtb16_ror8(v1);
    }
    for (int32_t il0 = 0; il0 < kmax; il0 += UPD_CHUNK) {
        const int32_t n = kmax - il0 < UPD_CHUNK ? kmax - il0 : UPD_CHUNK;
        const int8_t *xc = x + il0 * plane;
        const int8_t *xend = xc + (n & ~1) * plane;
        int32_t *o0 = acc0, *o1 = acc1;
        const uint32_t *gend = gu + 4 * nq;
        for (; xc < xend; xc += 2 * plane, o0 += 2, o1 += 2) {
            const uint32_t *g = gu;
            const int8_t *xp = xc;
            int32_t a00 = goff0, a01 = goff0, a10 = goff1, a11 = goff1; /* (channel, input channel) */
            do {
                const uint32_t v0 = tf_load_u32(xp), v1 = tf_load_u32(xp + plane);
                const uint32_t t0 = tf_sxtb16(v0), t1 = tf_sxtb16_ror8(v0);
                const uint32_t t2 = tf_sxtb16(v1), t3 = tf_sxtb16_ror8(v1);
                a00 = tf_smlad(g[0], t0, a00);
                a00 = tf_smlad(g[1], t1, a00);
                a01 = tf_smlad(g[0], t2, a01);
                a01 = tf_smlad(g[1], t3, a01);
                a10 = tf_smlad(g[2], t0, a10);
                a10 = tf_smlad(g[3], t1, a10);
                a11 = tf_smlad(g[2], t2, a11);
                a11 = tf_smlad(g[3], t3, a11);
                g += 4;
                xp += 4;
            } while (g < gend);
            o0[0] = a00;
            o0[1] = a01;
            o1[0] = a10;
            o1[1] = a11;
        }
        const int32_t i = n & ~1;
        if (i < n) { /* odd last input channel */
            acc0[i] = tf_dot_s8(gc, xc, plane) + goff0;
            acc1[i] = tf_dot_s8(gc1, xc, plane) + goff1;
        }
        upd_row(&rule[0], acc0, wc + il0, n, flat0 + (uint32_t)il0, seed);
        upd_row(&rule[1], acc1, wc1 + il0, n, flat1 + (uint32_t)il0, seed);
    }
}
#endif

tf_status tf_conv2d_update_s8(const tf_conv_update_params *p, const tf_qas *qas, const tf_dims *gy_dims,
                              const int8_t *g_y, int32_t e_y, const tf_dims *x_dims, const int8_t *x_saved,
                              const tf_filter_dims *w_dims, int8_t *w, int32_t *b) {
    const tf_status st = tf_conv_update_check(p, qas, gy_dims, g_y, x_dims, x_saved, w_dims, w, b);
    if (st != TF_OK) {
        return st;
    }
    const int32_t oh_n = gy_dims->h, ow_n = gy_dims->w, oplane = oh_n * ow_n;
    const int32_t ih_n = x_dims ? x_dims->h : 0, iw_n = x_dims ? x_dims->w : 0, iplane = ih_n * iw_n;
    const int32_t cin_g = w_dims->c, cout_g = w_dims->n / p->groups, kh_n = w_dims->h, kw_n = w_dims->w;
    const int32_t wsize = cin_g * kh_n * kw_n;
    const int pointwise = kh_n == 1 && kw_n == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_h == 0 &&
                          p->pad_w == 0 && oplane == iplane;
#if TF_USE_DSP
    if (pointwise && p->update_weight && p->groups == 1 && p->k > 0 && oplane % 4 == 0 &&
        oplane <= UPD_PAIR_MAX_PLANE) {
        /* NOTE: output channels whose g row is all zero are skipped: acc = 0 (and gsum = 0) gives out = 0 in every
         * form (0 <= r < 2^s before the shift), so w and b keep their values, except that the clamp turns a
         * weight of -128 into -127, done here. Masked gradients have many such channels. The others are paired
         * in order (not necessarily adjacent); an odd last one goes alone. */
        const int32_t kmax = p->k < cin_g ? p->k : cin_g;
        int32_t held = -1, held_sum = 0;
        for (int32_t co = 0; co <= w_dims->n; co++) {
            int32_t gsum = 0;
            if (co < w_dims->n) {
                int zero;
                gsum = upd_sum_zero_s8(g_y + co * oplane, oplane, &zero);
                if (zero) {
                    int8_t *wc = w + co * wsize;
                    for (int32_t il = 0; il < kmax; il++) {
                        wc[il] = wc[il] < TF_WEIGHT_MIN ? TF_WEIGHT_MIN : wc[il];
                    }
                    continue;
                }
                if (held < 0) {
                    held = co;
                    held_sum = gsum;
                    continue;
                }
            } else if (held < 0) {
                break;
            }
            const int32_t cs[2] = {held, co};
            const int32_t gs[2] = {held_sum, gsum};
            const int32_t nc = co < w_dims->n ? 2 : 1;
            upd_rule rules[2];
            for (int32_t j = 0; j < nc; j++) {
                const int32_t m = (int32_t)tf_rshift_round((int64_t)p->lr_m * qas->w_m[cs[j]], 15);
                rules[j] = upd_make_rule(m, p->lr_e + qas->w_e[cs[j]] + 15 + e_y);
            }
            if (nc == 2) {
                update_pointwise_pair(p, g_y + held * oplane, g_y + co * oplane, gs, x_saved, oplane, kmax, rules,
                                      w + held * wsize, w + co * wsize, (uint32_t)(held * wsize),
                                      (uint32_t)(co * wsize));
            } else {
                update_pointwise(p, g_y + held * oplane, held_sum, x_saved, oplane, kmax, &rules[0], w + held * wsize,
                                 (uint32_t)(held * wsize));
            }
            for (int32_t j = 0; j < nc && p->update_bias; j++) {
                const int32_t m = (int32_t)tf_rshift_round((int64_t)p->lr_m * qas->b_m[cs[j]], 15);
                const int32_t e = p->lr_e + qas->b_e[cs[j]] + 15 + e_y;
                b[cs[j]] = upd_bias(b[cs[j]], gs[j], m, e, tf_rng_u32(p->step, p->b_tensor_id, (uint32_t)cs[j]));
            }
            held = -1;
        }
        return TF_OK;
    }
#endif
    for (int32_t co = 0; co < w_dims->n; co++) {
        const int8_t *gc = g_y + co * oplane; /* (OH, OW) */
        const int32_t gsum = upd_sum_s8(gc, oplane);
        if (p->update_weight && (co / cout_g) * cin_g < p->k) { /* NOTE: else no input channel of co is saved */
            const int32_t m = (int32_t)tf_rshift_round((int64_t)p->lr_m * qas->w_m[co], 15);
            const int32_t e = p->lr_e + qas->w_e[co] + 15 + e_y;
            const int32_t g = co / cout_g;
            const upd_rule rule = upd_make_rule(m, e);
            if (pointwise) {
                const int32_t kmax = p->k - g * cin_g < cin_g ? p->k - g * cin_g : cin_g;
                if (kmax > 0) {
                    update_pointwise(p, gc, gsum, x_saved + g * cin_g * iplane, oplane, kmax, &rule, w + co * wsize,
                                     (uint32_t)(co * wsize));
                }
            }
            for (int32_t il = 0; il < cin_g && !pointwise; il++) {
                const int32_t gi = g * cin_g + il;
                if (gi >= p->k) {
                    break;
                }
                const int8_t *xc = x_saved + gi * iplane; /* (H, W) */
                for (int32_t kh = 0; kh < kh_n; kh++) {
                    for (int32_t kw = 0; kw < kw_n; kw++) {
                        int32_t acc = 0;
                        for (int32_t oh = 0; oh < oh_n; oh++) {
                            const int32_t ih = oh * p->stride_h - p->pad_h + kh;
                            if (ih < 0 || ih >= ih_n) {
                                continue;
                            }
                            for (int32_t ow = 0; ow < ow_n; ow++) {
                                const int32_t iw = ow * p->stride_w - p->pad_w + kw;
                                if (iw >= 0 && iw < iw_n) {
                                    acc +=
                                        (int32_t)gc[oh * ow_n + ow] * ((int32_t)xc[ih * iw_n + iw] + p->input_offset);
                                }
                            }
                        }
                        const int32_t flat = co * wsize + (il * kh_n + kh) * kw_n + kw;
                        w[flat] = upd_one(&rule, w[flat], acc, tf_rng_u32(p->step, p->w_tensor_id, (uint32_t)flat));
                    }
                }
            }
        }
        if (p->update_bias) {
            const int32_t m = (int32_t)tf_rshift_round((int64_t)p->lr_m * qas->b_m[co], 15);
            const int32_t e = p->lr_e + qas->b_e[co] + 15 + e_y;
            b[co] = upd_bias(b[co], gsum, m, e, tf_rng_u32(p->step, p->b_tensor_id, (uint32_t)co));
        }
    }
    return TF_OK;
}
