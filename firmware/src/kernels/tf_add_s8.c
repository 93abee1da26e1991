/* ADD of two int8 tensors with their own scales (docs/engine.md "ADD"), optional mask. Portable C only:
 * elementwise and memory bound, nothing for __SMLAD to win. */
#include "tf_kernels.h"
#include "tf_qmath.h"

tf_status tf_add_s8(const tf_add_params *p, int32_t n, const int8_t *a, const int8_t *b, int8_t *y, uint8_t *mask) {
    if (!p || !a || !b || !y || n < 0 || p->shift < 1 || p->shift > 62) {
        return TF_ERR_ARG;
    }
    const int64_t half = TF_POW2_I64(p->shift - 1);
    for (int32_t i = 0; i < n; i++) {
        int64_t s = ((int64_t)a[i] + p->a_offset) * p->mult_a + ((int64_t)b[i] + p->b_offset) * p->mult_b;
        int64_t pre = ((s + half) >> p->shift) + p->output_offset;
        y[i] = (int8_t)tf_clamp_i32(pre, p->act_min, p->act_max);
        if (mask) {
            tf_mask_put(mask, i, pre >= p->act_min && pre <= p->act_max);
        }
    }
    if (mask && (n & 7)) {
        mask[n >> 3] &= (uint8_t)((1u << (n & 7)) - 1u);
    }
    return TF_OK;
}
