/* PWDW: a frozen 1x1 expansion fused with the following depthwise conv, one expanded channel at a time into an
 * H x W int8 buffer (never the whole expanded tensor), or four at a time in a 4 x H x W buffer when the caller's
 * scratch holds one. Same numbers as CONV2D(pw) then CONV2D(dw). */
#include "tf_kernels.h"

int32_t tf_pwdw_get_buffer_size(const tf_dims *x_dims) { return x_dims->h * x_dims->w; }

tf_status tf_pwdw_s8(const tf_ctx *ctx, const tf_pwdw_params *p, const tf_dims *x_dims, const int8_t *x,
                     const tf_filter_dims *pw_dims, const int8_t *w_pw, const int32_t *b_pw,
                     const tf_filter_dims *dw_dims, const int8_t *w_dw, const int32_t *b_dw, const tf_dims *y_dims,
                     int8_t *y) {
    if (!ctx || !p || !x || !w_pw || !w_dw || !y || !p->pw_mult || !p->pw_shift || !p->dw_mult || !p->dw_shift) {
        return TF_ERR_ARG;
    }
    const int32_t c_mid = pw_dims->n;
    if (pw_dims->c != x_dims->c || pw_dims->h != 1 || pw_dims->w != 1 || dw_dims->c != 1 || c_mid < 1 ||
        dw_dims->n % c_mid || y_dims->c != dw_dims->n) {
        return TF_ERR_SHAPE;
    }
    if (ctx->size < tf_pwdw_get_buffer_size(x_dims) || !ctx->buf) {
        return TF_ERR_SCRATCH;
    }
    const int32_t plane = x_dims->h * x_dims->w, oplane = y_dims->h * y_dims->w, kk = dw_dims->h * dw_dims->w;
    const int32_t mult = dw_dims->n / c_mid;
    /* NOTE: up to four expanded channels per pass when the scratch holds them: their 1x1 runs as one 4-channel
     * conv (tf_conv2d_s8 shares the x unpack across channels), then a depthwise conv over the four planes. */
    const int32_t per = ctx->size / plane >= 4 ? 4 : 1;
    int8_t *mid = (int8_t *)ctx->buf;
    const tf_conv_params pwp = {1, 1, 0, 0, 1, p->input_offset, p->mid_zero_point, p->pw_act_min, p->pw_act_max};
    for (int32_t m = 0; m < c_mid; m += per) {
        const int32_t k = c_mid - m < per ? c_mid - m : per;
        const tf_dims mid_dims = {k, x_dims->h, x_dims->w};
        const tf_filter_dims pwk = {k, x_dims->c, 1, 1}, dwk = {k * mult, 1, dw_dims->h, dw_dims->w};
        const tf_conv_params dwp = {p->dw_stride_h,     p->dw_stride_w,   p->dw_pad_h,   p->dw_pad_w,  k,
                                    -p->mid_zero_point, p->output_offset, p->dw_act_min, p->dw_act_max};
        const tf_per_channel_quant qp = {p->pw_mult + m, p->pw_shift + m};
        tf_status st = tf_conv2d_s8(&pwp, &qp, x_dims, x, &pwk, w_pw + m * x_dims->c, b_pw ? b_pw + m : NULL, &mid_dims,
                                    mid, NULL);
        if (st != TF_OK) {
            return st;
        }
        const tf_dims yk = {k * mult, y_dims->h, y_dims->w};
        const tf_per_channel_quant qd = {p->dw_mult + m * mult, p->dw_shift + m * mult};
        st = tf_conv2d_s8(&dwp, &qd, &mid_dims, mid, &dwk, w_dw + m * mult * kk, b_dw ? b_dw + m * mult : NULL, &yk,
                          y + m * mult * oplane, NULL);
        if (st != TF_OK) {
            return st;
        }
    }
    return TF_OK;
}
