/* CLAMP (a standalone ReLU / ReLU6) with optional mask of the values that passed through. */
#include "tf_kernels.h"

tf_status tf_clamp_s8(int32_t act_min, int32_t act_max, int32_t n, const int8_t *x, int8_t *y, uint8_t *mask) {
    if (!x || !y || n < 0 || act_min > act_max) {
        return TF_ERR_ARG;
    }
    for (int32_t i = 0; i < n; i++) {
        int32_t v = x[i];
        y[i] = (int8_t)tf_clamp_i32(v, act_min, act_max);
        if (mask) {
            tf_mask_put(mask, i, v >= act_min && v <= act_max);
        }
    }
    if (mask && (n & 7)) {
        mask[n >> 3] &= (uint8_t)((1u << (n & 7)) - 1u);
    }
    return TF_OK;
}
