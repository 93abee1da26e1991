/* Argument and shape checks shared by the CONV2D_UPDATE kernels (tf_conv2d_update_s8.c and
 * tf_conv2d_update_recipe_s8.c); internal, not part of the kernel API. */
#ifndef TF_CONV_UPDATE_CHECK_H
#define TF_CONV_UPDATE_CHECK_H

#include "tf_kernels.h"

#define TF_UPDATE_MAX_PIXELS 32768 /* |g| <= 128, |x - zx| <= 255: int32 sums over this many pixels are exact */

/* The checks both update kernels make before touching anything: pointers, the learning-rate mantissa, k, the
 * conv geometry (weights trained) or the output-channel count (bias only; x_dims may be NULL then), and the
 * pixel count that keeps the int32 sums exact. */
static inline tf_status tf_conv_update_check(const tf_conv_update_params *p, const tf_qas *qas, const tf_dims *gy_dims,
                                             const int8_t *g_y, const tf_dims *x_dims, const int8_t *x_saved,
                                             const tf_filter_dims *w_dims, const int8_t *w, const int32_t *b) {
    if (!p || !qas || !g_y || !gy_dims || !w_dims || (p->update_weight && (!w || !x_saved)) || (p->update_bias && !b)) {
        return TF_ERR_ARG;
    }
    if (p->lr_m < 0 || p->lr_m > 32768) {
        return TF_ERR_ARG;
    }
    if (p->update_weight) { /* NOTE: a bias-only update never sees the input (x_dims may be NULL then) */
        if (!x_dims || p->k < 0 || p->k > x_dims->c) {
            return TF_ERR_ARG;
        }
        tf_status st = tf_conv_check(x_dims, w_dims, gy_dims, p->groups, p->stride_h, p->stride_w, p->pad_h, p->pad_w);
        if (st != TF_OK) {
            return st;
        }
    } else if (gy_dims->c != w_dims->n || p->groups < 1 || w_dims->n % p->groups) {
        return TF_ERR_SHAPE;
    }
    if (gy_dims->h * gy_dims->w > TF_UPDATE_MAX_PIXELS) {
        return TF_ERR_OVERFLOW;
    }
    return TF_OK;
}

#endif
