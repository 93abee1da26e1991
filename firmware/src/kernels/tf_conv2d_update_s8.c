/* CONV2D_UPDATE: QAS-scaled SGD with stochastic rounding, one output channel at a time (compute dW, db for
 * channel c, apply, discard: no gradient buffer). Only input channels < k (the saved ones) are updated. */
#include "tf_dsp.h"
#include "tf_kernels.h"
#include "tf_qmath.h"

#define TF_UPDATE_MAX_PIXELS 32768 /* |g| <= 128, |x - zx| <= 255: int32 sums over this many pixels are exact */

/* New weight w - scaled_update(acc, m, -s, rnd, 255) clamped to [-127, 127], for 1 <= s <= 62, |acc| < 2^31 and
 * 0 <= m < 2^17: |acc * m| < 2^48, so the 2^56 clamp of tf_scaled_update never acts, and the +-255 clamp is
 * implied by the final one (|w| <= 127). Same numbers as the general code below. */
static inline int32_t upd_weight(int32_t w, int32_t acc, int32_t m, int32_t s, uint32_t rnd) {
    const int64_t r = s <= 32 ? (int64_t)(rnd >> (32 - s)) : (int64_t)rnd << (s - 32);
    const int64_t out = ((int64_t)acc * m + r) >> s;
    const int64_t nw = (int64_t)w - out;
    return nw < TF_WEIGHT_MIN ? TF_WEIGHT_MIN : (nw > TF_WEIGHT_MAX ? TF_WEIGHT_MAX : (int32_t)nw);
}

/* The 1x1 stride-1 weights of output channel co: acc = sum_p g[p] (x[il, p] - zx) for il < kmax. */
static void update_pointwise(const tf_conv_update_params *p, const int8_t *gc, int32_t gsum, const int8_t *x,
                             int32_t plane, int32_t kmax, int32_t m, int32_t e, int8_t *wc, uint32_t flat0) {
    const int32_t goff = p->input_offset * gsum;
    const uint32_t seed = p->step * 0x85EBCA77u ^ p->w_tensor_id * 0xC2B2AE3Du;
    for (int32_t il = 0; il < kmax; il++, x += plane) {
        const int32_t acc = tf_dot_s8(gc, x, plane) + goff;
        const uint32_t idx = flat0 + (uint32_t)il;
        uint32_t h = idx * 0x9E3779B1u ^ seed; /* tf_rng_u32 with the per-tensor part hoisted */
        h ^= h >> 16;
        h *= 0x7FEB352Du;
        h ^= h >> 15;
        h *= 0x846CA68Bu;
        h ^= h >> 16;
        if (e < 0 && m >= 0 && m < (1 << 17)) {
            wc[il] = (int8_t)upd_weight(wc[il], acc, m, -e > 62 ? 62 : -e, h);
        } else {
            const int64_t dw = tf_scaled_update(acc, m, e, h, 255);
            wc[il] = (int8_t)tf_clamp_i32((int64_t)wc[il] - dw, TF_WEIGHT_MIN, TF_WEIGHT_MAX);
        }
    }
}

tf_status tf_conv2d_update_s8(const tf_conv_update_params *p, const tf_qas *qas, const tf_dims *gy_dims,
                              const int8_t *g_y, int32_t e_y, const tf_dims *x_dims, const int8_t *x_saved,
                              const tf_filter_dims *w_dims, int8_t *w, int32_t *b) {
    if (!p || !qas || !g_y || (p->update_weight && (!w || !x_saved)) || (p->update_bias && !b)) {
        return TF_ERR_ARG;
    }
    if (p->lr_m < 0 || p->lr_m > 32768) {
        return TF_ERR_ARG;
    }
    if (p->update_weight) { /* NOTE: a bias-only update never sees the input (x_dims may be NULL then) */
        if (!x_dims || p->k < 0 || p->k > x_dims->c) {
            return TF_ERR_ARG;
        }
        tf_status st = tf_conv_check(x_dims, w_dims, gy_dims, p->groups, p->stride_h, p->stride_w, p->pad_h,
                                     p->pad_w);
        if (st != TF_OK) {
            return st;
        }
    } else if (gy_dims->c != w_dims->n || p->groups < 1 || w_dims->n % p->groups) {
        return TF_ERR_SHAPE;
    }
    const int32_t oh_n = gy_dims->h, ow_n = gy_dims->w, oplane = oh_n * ow_n;
    const int32_t ih_n = x_dims ? x_dims->h : 0, iw_n = x_dims ? x_dims->w : 0, iplane = ih_n * iw_n;
    if (oplane > TF_UPDATE_MAX_PIXELS) {
        return TF_ERR_OVERFLOW;
    }
    const int32_t cin_g = w_dims->c, cout_g = w_dims->n / p->groups, kh_n = w_dims->h, kw_n = w_dims->w;
    const int32_t wsize = cin_g * kh_n * kw_n;
    const int pointwise = kh_n == 1 && kw_n == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_h == 0 &&
                          p->pad_w == 0 && oplane == iplane;
    for (int32_t co = 0; co < w_dims->n; co++) {
        const int8_t *gc = g_y + co * oplane; /* (OH, OW) */
        const int32_t gsum = tf_sum_s8(gc, oplane);
        if (p->update_weight) {
            const int32_t m = (int32_t)tf_rshift_round((int64_t)p->lr_m * qas->w_m[co], 15);
            const int32_t e = p->lr_e + qas->w_e[co] + 15 + e_y;
            const int32_t g = co / cout_g;
            if (pointwise) {
                const int32_t kmax = p->k - g * cin_g < cin_g ? p->k - g * cin_g : cin_g;
                if (kmax > 0) {
                    update_pointwise(p, gc, gsum, x_saved + g * cin_g * iplane, oplane, kmax, m, e, w + co * wsize,
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
                        int32_t acc;
                        if (pointwise) {
                            acc = tf_dot_s8(gc, xc, oplane) + p->input_offset * gsum;
                        } else {
                            acc = 0;
                            for (int32_t oh = 0; oh < oh_n; oh++) {
                                const int32_t ih = oh * p->stride_h - p->pad_h + kh;
                                if (ih < 0 || ih >= ih_n) {
                                    continue;
                                }
                                for (int32_t ow = 0; ow < ow_n; ow++) {
                                    const int32_t iw = ow * p->stride_w - p->pad_w + kw;
                                    if (iw >= 0 && iw < iw_n) {
                                        acc += (int32_t)gc[oh * ow_n + ow] * ((int32_t)xc[ih * iw_n + iw] + p->input_offset);
                                    }
                                }
                            }
                        }
                        const int32_t flat = co * wsize + (il * kh_n + kh) * kw_n + kw;
                        int64_t dw = tf_scaled_update(acc, m, e, tf_rng_u32(p->step, p->w_tensor_id, (uint32_t)flat), 255);
                        w[flat] = (int8_t)tf_clamp_i32((int64_t)w[flat] - dw, TF_WEIGHT_MIN, TF_WEIGHT_MAX);
                    }
                }
            }
        }
        if (p->update_bias) {
            const int32_t m = (int32_t)tf_rshift_round((int64_t)p->lr_m * qas->b_m[co], 15);
            const int32_t e = p->lr_e + qas->b_e[co] + 15 + e_y;
            int64_t db = tf_scaled_update(gsum, m, e, tf_rng_u32(p->step, p->b_tensor_id, (uint32_t)co), INT32_MAX);
            b[co] = tf_clamp_i32((int64_t)b[co] - db, INT32_MIN, INT32_MAX);
        }
    }
    return TF_OK;
}
