/* CONV2D forward (standard, grouped, depthwise; stride; zero-point padding), optional ReLU mask.
 * Portable C; an __SMLAD dot product for the contiguous case (1x1 input, i.e. a linear layer) on M4/M7. */
#include "tf_kernels.h"
#include "tf_qmath.h"
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
    const int32_t plane = ih_n * iw_n, wsize = cin_g * kh_n * kw_n;
    const int linear = (plane == 1 && kh_n == 1 && kw_n == 1);
    const int pointwise = kh_n == 1 && kw_n == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_h == 0 &&
                          p->pad_w == 0;
    int32_t out_i = 0;
    for (int32_t co = 0; co < w_dims->n; co++) {
        const int32_t g = co / cout_g;
        const int8_t *xg = x + (int32_t)g * cin_g * plane; /* (C_in/groups, H, W) of this group */
        const int8_t *wc = w + co * wsize;                 /* (C_in/groups, KH, KW) */
        for (int32_t oh = 0; oh < oh_n; oh++) {
            for (int32_t ow = 0; ow < ow_n; ow++, out_i++) {
                int32_t acc = 0;
                if (linear) {
                    acc = tf_dot_off_s8(xg, wc, cin_g, p->input_offset);
                } else if (pointwise) { /* NOTE: channel-planar layout: the input channels are plane apart */
                    const int8_t *xp = xg + oh * iw_n + ow;
                    for (int32_t ci = 0; ci < cin_g; ci++) {
                        acc += ((int32_t)xp[ci * plane] + p->input_offset) * wc[ci];
                    }
                } else {
                    const int32_t ih0 = oh * p->stride_h - p->pad_h, iw0 = ow * p->stride_w - p->pad_w;
                    const int32_t kh_lo = ih0 < 0 ? -ih0 : 0, kh_hi = ih_n - ih0 < kh_n ? ih_n - ih0 : kh_n;
                    const int32_t kw_lo = iw0 < 0 ? -iw0 : 0, kw_hi = iw_n - iw0 < kw_n ? iw_n - iw0 : kw_n;
                    for (int32_t ci = 0; ci < cin_g; ci++) {
                        const int8_t *xc = xg + ci * plane;
                        const int8_t *wk = wc + ci * kh_n * kw_n;
                        for (int32_t kh = kh_lo; kh < kh_hi; kh++) {
                            const int8_t *xr = xc + (ih0 + kh) * iw_n + iw0;
                            const int8_t *wr = wk + kh * kw_n;
                            for (int32_t kw = kw_lo; kw < kw_hi; kw++) {
                                acc += ((int32_t)xr[kw] + p->input_offset) * wr[kw];
                            }
                        }
                    }
                }
                int64_t pre = tf_requantize((int64_t)acc + (bias ? bias[co] : 0), q->mult[co], q->shift[co]) +
                              p->output_offset;
                y[out_i] = (int8_t)tf_clamp_i32(pre, p->act_min, p->act_max);
                if (mask) {
                    tf_mask_put(mask, out_i, pre >= p->act_min && pre <= p->act_max);
                }
            }
        }
    }
    if (mask && (out_i & 7)) { /* padding bits of the last byte are zero, as numpy packbits */
        mask[out_i >> 3] &= (uint8_t)((1u << (out_i & 7)) - 1u);
    }
    return TF_OK;
}
