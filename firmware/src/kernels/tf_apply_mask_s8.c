/* APPLY_MASK: zero the error gradient where the forward clamp saturated (mask bit 0). In place. */
#include "tf_kernels.h"

tf_status tf_apply_mask_s8(int32_t n, const uint8_t *mask, int8_t *g) {
    if (!mask || !g || n < 0) {
        return TF_ERR_ARG;
    }
    for (int32_t i = 0; i < n; i++) {
        if (!tf_mask_get(mask, i)) {
            g[i] = 0;
        }
    }
    return TF_OK;
}
