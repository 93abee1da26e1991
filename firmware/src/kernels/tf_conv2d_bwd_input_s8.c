/* CONV2D_BWD_INPUT: the error gradient of a conv's input, the exact adjoint (transposed conv) of the forward
 * incl. stride, padding and groups, computed as a gather per input element (docs/engine.md). */
#include "tf_kernels.h"
#include "tf_qmath.h"

int32_t tf_conv2d_bwd_input_get_buffer_size(const tf_dims *gy_dims, const tf_dims *gx_dims, int one_pass) {
    int32_t gy_n = gy_dims->c * gy_dims->h * gy_dims->w;
    int32_t size = ((gy_n * 2 + 3) / 4) * 4; /* int16 g', padded so the int32 part is aligned */
    if (one_pass) {
        size += gx_dims->c * gx_dims->h * gx_dims->w * 4;
    }
    return size;
}

/* acc[ci, ih, iw] = sum_{co in group, kh, kw: ih = oh*s - pad + kh} g'[co, oh, ow] * w[co, ci_local, kh, kw] */
static int64_t bwd_elem(const tf_conv_bwd_params *p, const tf_dims *gy, const int16_t *gq,
                        const tf_filter_dims *wd, const int8_t *w, int32_t ci, int32_t ih, int32_t iw) {
    const int32_t cin_g = wd->c, cout_g = wd->n / p->groups, g = ci / cin_g, ci_l = ci % cin_g;
    const int32_t oplane = gy->h * gy->w;
    int64_t acc = 0;
    for (int32_t kh = 0; kh < wd->h; kh++) {
        const int32_t th = ih + p->pad_h - kh;
        if (th < 0 || th % p->stride_h) {
            continue;
        }
        const int32_t oh = th / p->stride_h;
        if (oh >= gy->h) {
            continue;
        }
        for (int32_t kw = 0; kw < wd->w; kw++) {
            const int32_t tw = iw + p->pad_w - kw;
            if (tw < 0 || tw % p->stride_w) {
                continue;
            }
            const int32_t ow = tw / p->stride_w;
            if (ow >= gy->w) {
                continue;
            }
            const int16_t *gp = gq + g * cout_g * oplane + oh * gy->w + ow;
            const int8_t *wp = w + (((g * cout_g) * cin_g + ci_l) * wd->h + kh) * wd->w + kw;
            const int32_t wstride = cin_g * wd->h * wd->w;
            int32_t part = 0; /* |g'| <= 2^14, |w| <= 127: exact for cout_g < 2^10 */
            for (int32_t co = 0; co < cout_g; co++) {
                part += (int32_t)gp[co * oplane] * wp[co * wstride];
                if ((co & 511) == 511) {
                    acc += part;
                    part = 0;
                }
            }
            acc += part;
        }
    }
    return acc;
}

/* The same sum without the int16 g' buffer: g' = rshift_round(g_y * wscale_q, 8) recomputed per term. */
static int64_t bwd_elem_direct(const tf_conv_bwd_params *p, const tf_dims *gy, const int8_t *g_y,
                               const int32_t *wscale_q, const tf_filter_dims *wd, const int8_t *w, int32_t ci,
                               int32_t ih, int32_t iw) {
    const int32_t cin_g = wd->c, cout_g = wd->n / p->groups, g = ci / cin_g, ci_l = ci % cin_g;
    const int32_t oplane = gy->h * gy->w, wstride = cin_g * wd->h * wd->w;
    int64_t acc = 0;
    for (int32_t kh = 0; kh < wd->h; kh++) {
        const int32_t th = ih + p->pad_h - kh;
        if (th < 0 || th % p->stride_h || th / p->stride_h >= gy->h) {
            continue;
        }
        for (int32_t kw = 0; kw < wd->w; kw++) {
            const int32_t tw = iw + p->pad_w - kw;
            if (tw < 0 || tw % p->stride_w || tw / p->stride_w >= gy->w) {
                continue;
            }
            const int32_t co0 = g * cout_g;
            const int8_t *gp = g_y + co0 * oplane + (th / p->stride_h) * gy->w + tw / p->stride_w;
            const int8_t *wp = w + ((co0 * cin_g + ci_l) * wd->h + kh) * wd->w + kw;
            int32_t part = 0;
            for (int32_t co = 0; co < cout_g; co++) {
                const int32_t gq = ((int32_t)gp[co * oplane] * wscale_q[co0 + co] + 128) >> 8; /* |gq| <= 2^14 */
                part += gq * wp[co * wstride];
                if ((co & 511) == 511) {
                    acc += part;
                    part = 0;
                }
            }
            acc += part;
        }
    }
    return acc;
}

tf_status tf_conv2d_bwd_input_s8(const tf_ctx *ctx, const tf_conv_bwd_params *p, const int32_t *wscale_q,
                                 const tf_dims *gy_dims, const int8_t *g_y, int32_t e_y, const tf_filter_dims *w_dims,
                                 const int8_t *w, const tf_dims *gx_dims, int8_t *g_x, int32_t *e_x) {
    if (!ctx || !p || !wscale_q || !g_y || !w || !g_x || !e_x) {
        return TF_ERR_ARG;
    }
    tf_status st = tf_conv_check(gx_dims, w_dims, gy_dims, p->groups, p->stride_h, p->stride_w, p->pad_h, p->pad_w);
    if (st != TF_OK) {
        return st;
    }
    const int32_t need2 = tf_conv2d_bwd_input_get_buffer_size(gy_dims, gx_dims, 0);
    const int32_t need1 = tf_conv2d_bwd_input_get_buffer_size(gy_dims, gx_dims, 1);
    /* NOTE: without scratch (the plan's memory model: docs/engine.md allows either) g' is recomputed per term
     * and the sums twice (max, then write): same numbers, no buffer. */
    const int direct = ctx->size < need2 || !ctx->buf;
    int16_t *gq = direct ? NULL : (int16_t *)ctx->buf;
    int32_t *acc32 = !direct && ctx->size >= need1 ? (int32_t *)((uint8_t *)ctx->buf + need2) : NULL;
    const int32_t oplane = gy_dims->h * gy_dims->w;
    for (int32_t co = 0; co < gy_dims->c; co++) {
        if (wscale_q[co] < 0 || wscale_q[co] > 32768) {
            return TF_ERR_ARG;
        }
        for (int32_t i = 0; gq && i < oplane; i++) {
            gq[co * oplane + i] = (int16_t)tf_rshift_round((int64_t)g_y[co * oplane + i] * wscale_q[co], 8);
        }
    }
#define BWD_ELEM(i)                                                                                                 \
    (direct ? bwd_elem_direct(p, gy_dims, g_y, wscale_q, w_dims, w, (i) / iplane, ((i) % iplane) / gx_dims->w,      \
                              (i) % gx_dims->w)                                                                     \
            : bwd_elem(p, gy_dims, gq, w_dims, w, (i) / iplane, ((i) % iplane) / gx_dims->w, (i) % gx_dims->w))
    const int32_t iplane = gx_dims->h * gx_dims->w, n = gx_dims->c * iplane;
    uint64_t mx = 0;
    int fits = acc32 != NULL;
    for (int32_t i = 0; i < n; i++) {
        int64_t a = BWD_ELEM(i);
        uint64_t m = tf_abs64(a);
        mx = m > mx ? m : mx;
        if (fits) {
            if (m >= ((uint64_t)1 << 31)) {
                fits = 0; /* NOTE: the rare int32 overflow falls back to recomputing: still bit-exact */
            } else {
                acc32[i] = (int32_t)a;
            }
        }
    }
    const int32_t sh = tf_dyn_shift(mx);
    for (int32_t i = 0; i < n; i++) {
        int64_t a = fits ? acc32[i] : BWD_ELEM(i);
        g_x[i] = (int8_t)tf_rshift_round(a, sh);
    }
#undef BWD_ELEM
    *e_x = e_y + p->wscale_p - 7 + sh;
    return TF_OK;
}
