/* CONV2D_UPDATE under a training recipe (docs/engine.md "Training recipe"), the C twin of
 * device_agent/engine/update.py recipe_update at N = 1: per output channel, each trained element's fixed-point
 * update d is added into its int32 buffer v (accumulator / momentum); on the sample that ends a mini-batch the
 * parameters take v (weights with their sub-LSB residual, or stochastic rounding when there is none), then v
 * decays by beta (or empties). The sums are those of the default update (1x1 stride-1 layers: one tf_dot_s8 per
 * weight, SMLAD where the board has it; other shapes the plain loop); a sample whose gradient row is all zero adds
 * nothing (d = 0 exactly), so off the boundary that channel is skipped. No scratch. */
#include "tf_dsp.h"
#include "tf_conv_update_check.h"
#include "tf_kernels.h"
#include "tf_qmath.h"

#define ACC_BITS_W 16 /* weight v units: 2^-16 LSB */
#define ACC_BITS_B 12 /* bias v units: 2^-12 LSB (recipe.ACC_BITS_B) */

static int32_t sat32(int64_t v) { return (int32_t)tf_clamp_i32(v, INT32_MIN, INT32_MAX); }

/* recipe.fixed_delta: rshift_round(clamp(acc * m, +-2^56), -(e + bits)), saturated to int32. */
static int32_t fixed_delta(int32_t acc, int32_t m, int32_t e, int32_t bits) {
    int64_t v = (int64_t)acc * m;
    const int64_t vmax = TF_POW2_I64(56);
    v = v < -vmax ? -vmax : (v > vmax ? vmax : v);
    return sat32(tf_rshift_round(v, -(e + bits)));
}

/* recipe.momentum_decay: rshift_round(v * beta_q15, 15). */
static int32_t decay(int32_t v, int32_t beta_q15) { return (int32_t)tf_rshift_round((int64_t)v * beta_q15, 15); }

/* recipe.apply_weight for one element; *frac is read and written when frac_bits > 0. */
static int8_t apply_w(int8_t w, int32_t v, int32_t frac_bits, int32_t *frac, uint32_t rnd) {
    if (frac_bits == 0) {
        const int64_t dw = ((int64_t)v + (int64_t)(rnd >> (32 - ACC_BITS_W))) >> ACC_BITS_W; /* stochastic_shift */
        return (int8_t)tf_clamp_i32((int64_t)w - dw, TF_WEIGHT_MIN, TF_WEIGHT_MAX);
    }
    const int64_t t = (int64_t)w * TF_POW2_I64(ACC_BITS_W) + (int64_t)*frac * TF_POW2_I64(ACC_BITS_W - frac_bits) - v;
    const int64_t nw = tf_clamp_i32(tf_rshift_round(t, ACC_BITS_W), TF_WEIGHT_MIN, TF_WEIGHT_MAX);
    const int32_t half = 1 << (frac_bits - 1);
    *frac = (int32_t)tf_clamp_i32(tf_rshift_round(t - nw * TF_POW2_I64(ACC_BITS_W), ACC_BITS_W - frac_bits), -half,
                                  half - 1);
    return (int8_t)nw;
}

static int32_t frac_get(const tf_recipe_state *r, int32_t i) {
    return r->frac_bits == 8 ? ((const int8_t *)r->frac)[i] : ((const int16_t *)r->frac)[i];
}
static void frac_set(const tf_recipe_state *r, int32_t i, int32_t v) {
    if (r->frac_bits == 8) {
        ((int8_t *)r->frac)[i] = (int8_t)v;
    } else {
        ((int16_t *)r->frac)[i] = (int16_t)v;
    }
}

/* One trained weight: add d into v, apply at the boundary, keep v. */
static void step_w(const tf_recipe_state *r, int32_t idx, int32_t acc, int32_t m, int32_t e, int8_t *w, uint32_t rnd) {
    int32_t v = r->wbuf ? r->wbuf[idx] : 0;
    if (r->add) {
        v = sat32((int64_t)v + fixed_delta(acc, m, e, ACC_BITS_W));
    }
    if (r->apply) {
        int32_t f = r->frac_bits ? frac_get(r, idx) : 0;
        *w = apply_w(*w, v, r->frac_bits, &f, rnd);
        if (r->frac_bits) {
            frac_set(r, idx, f);
        }
        v = decay(v, r->beta_q15);
    }
    if (r->wbuf) {
        r->wbuf[idx] = v;
    }
}

tf_status tf_conv2d_update_recipe_s8(const tf_conv_update_params *p, const tf_qas *qas, const tf_recipe_state *r,
                                     const tf_dims *gy_dims, const int8_t *g_y, int32_t e_y, const tf_dims *x_dims,
                                     const int8_t *x_saved, const tf_filter_dims *w_dims, int8_t *w, int32_t *b) {
    const tf_status st = tf_conv_update_check(p, qas, gy_dims, g_y, x_dims, x_saved, w_dims, w, b);
    if (st != TF_OK) {
        return st;
    }
    if (!r || (r->frac_bits != 0 && r->frac_bits != 8 && r->frac_bits != 16) ||
        (r->frac_bits && p->update_weight && !r->frac) || r->beta_q15 < 0 || r->beta_q15 > 32767) {
        return TF_ERR_ARG;
    }
    const int32_t oh_n = gy_dims->h, ow_n = gy_dims->w, oplane = oh_n * ow_n;
    const int32_t ih_n = x_dims ? x_dims->h : 0, iw_n = x_dims ? x_dims->w : 0, iplane = ih_n * iw_n;
    const int32_t cin_g = w_dims->c, cout_g = w_dims->n / p->groups, kh_n = w_dims->h, kw_n = w_dims->w;
    const int32_t wsize = cin_g * kh_n * kw_n;
    const int pointwise = kh_n == 1 && kw_n == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_h == 0 &&
                          p->pad_w == 0 && oplane == iplane;
    int32_t idx = 0; /* compact index of the trained weight: C order of (co, il < k_co, kh, kw) */
    for (int32_t co = 0; co < w_dims->n; co++) {
        const int8_t *gc = g_y + co * oplane; /* (OH, OW) */
        int32_t gsum = 0;
        uint32_t any = 0;
        for (int32_t i = 0; i < oplane; i++) {
            gsum += gc[i];
            any |= (uint8_t)gc[i];
        }
        const int32_t g = co / cout_g;
        if (!any && !r->apply) { /* d = 0 for every element of this channel: v stays, nothing to apply */
            if (p->update_weight) {
                const int32_t left = p->k - g * cin_g;
                idx += (left <= 0 ? 0 : left < cin_g ? left : cin_g) * kh_n * kw_n;
            }
            continue;
        }
        if (p->update_weight && pointwise) {
            const int32_t m = (int32_t)tf_rshift_round((int64_t)p->lr_m * qas->w_m[co], 15);
            const int32_t e = p->lr_e + qas->w_e[co] + 15 + e_y;
            const int32_t goff = p->input_offset * gsum;
            for (int32_t il = 0; il < cin_g && g * cin_g + il < p->k; il++, idx++) {
                const int8_t *xc = x_saved + (g * cin_g + il) * iplane; /* (H, W) */
                const int32_t acc = r->add && any ? tf_dot_s8(gc, xc, oplane) + goff : 0;
                const int32_t flat = co * wsize + il;
                step_w(r, idx, acc, m, e, &w[flat],
                       r->apply && !r->frac_bits ? tf_rng_u32(p->step, p->w_tensor_id, (uint32_t)flat) : 0u);
            }
        } else if (p->update_weight) {
            const int32_t m = (int32_t)tf_rshift_round((int64_t)p->lr_m * qas->w_m[co], 15);
            const int32_t e = p->lr_e + qas->w_e[co] + 15 + e_y;
            for (int32_t il = 0; il < cin_g && g * cin_g + il < p->k; il++) {
                const int8_t *xc = x_saved + (g * cin_g + il) * iplane; /* (H, W) */
                for (int32_t kh = 0; kh < kh_n; kh++) {
                    for (int32_t kw = 0; kw < kw_n; kw++, idx++) {
                        int32_t acc = 0;
                        for (int32_t oh = 0; oh < oh_n && r->add; oh++) {
                            const int32_t ih = oh * p->stride_h - p->pad_h + kh;
                            if (ih < 0 || ih >= ih_n) {
                                continue;
                            }
                            for (int32_t ow = 0; ow < ow_n; ow++) {
                                const int32_t iw = ow * p->stride_w - p->pad_w + kw;
                                if (iw >= 0 && iw < iw_n) {
                                    const int32_t xv = (int32_t)xc[ih * iw_n + iw] + p->input_offset;
                                    acc += (int32_t)gc[oh * ow_n + ow] * xv;
                                }
                            }
                        }
                        const int32_t flat = co * wsize + (il * kh_n + kh) * kw_n + kw;
                        step_w(r, idx, acc, m, e, &w[flat],
                               r->apply && !r->frac_bits ? tf_rng_u32(p->step, p->w_tensor_id, (uint32_t)flat) : 0u);
                    }
                }
            }
        }
        if (p->update_bias) {
            const int32_t m = (int32_t)tf_rshift_round((int64_t)p->lr_m * qas->b_m[co], 15);
            const int32_t e = p->lr_e + qas->b_e[co] + 15 + e_y;
            int32_t v = r->bbuf ? r->bbuf[co] : 0;
            if (r->add) {
                v = sat32((int64_t)v + fixed_delta(gsum, m, e, ACC_BITS_B));
            }
            if (r->apply) {
                b[co] = sat32((int64_t)b[co] - tf_rshift_round(v, ACC_BITS_B));
                v = decay(v, r->beta_q15);
            }
            if (r->bbuf) {
                r->bbuf[co] = v;
            }
        }
    }
    return TF_OK;
}
