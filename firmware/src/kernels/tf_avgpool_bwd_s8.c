/* AVGPOOL_BWD: spread each channel's gradient over its H*W positions, scaled by round(2^16 / (H*W)). */
#include "tf_kernels.h"
#include "tf_qmath.h"

tf_status tf_avgpool_bwd_s8(int32_t inv_hw, const tf_dims *gx_dims, const int8_t *g_y, int32_t e_y, int8_t *g_x,
                            int32_t *e_x) {
    if (!gx_dims || !g_y || !g_x || !e_x || inv_hw < 0 || inv_hw > (1 << 16)) {
        return TF_ERR_ARG;
    }
    const int32_t plane = gx_dims->h * gx_dims->w;
    uint64_t mx = 0;
    for (int32_t c = 0; c < gx_dims->c; c++) {
        uint64_t a = tf_abs64((int64_t)g_y[c] * inv_hw);
        mx = a > mx ? a : mx;
    }
    const int32_t sh = tf_dyn_shift(mx);
    for (int32_t c = 0; c < gx_dims->c; c++) {
        const int8_t v = (int8_t)tf_rshift_round_even((int64_t)g_y[c] * inv_hw, sh);
        for (int32_t i = 0; i < plane; i++) {
            g_x[c * plane + i] = v;
        }
    }
    *e_x = e_y - 16 + sh;
    return TF_OK;
}
