/* APPLY_MASK: zero the error gradient where the forward clamp saturated (mask bit 0). In place. */
#include "tf_dsp.h"
#include "tf_kernels.h"

#if TF_USE_DSP
/* Byte j of am_nibble[b] is 0xFF when bit j of b is set: the AND mask of 4 gradients for 4 mask bits. */
static const uint32_t am_nibble[16] = {0x00000000u, 0x000000FFu, 0x0000FF00u, 0x0000FFFFu, 0x00FF0000u, 0x00FF00FFu,
                                       0x00FFFF00u, 0x00FFFFFFu, 0xFF000000u, 0xFF0000FFu, 0xFF00FF00u, 0xFF00FFFFu,
                                       0xFFFF0000u, 0xFFFF00FFu, 0xFFFFFF00u, 0xFFFFFFFFu};
static inline void am_store_u32(int8_t *p, uint32_t v) { __builtin_memcpy(p, &v, 4); /* one unaligned str on M4/M7 */ }
#endif

tf_status tf_apply_mask_s8(int32_t n, const uint8_t *mask, int8_t *g) {
    if (!mask || !g || n < 0) {
        return TF_ERR_ARG;
    }
    int32_t i = 0;
#if TF_USE_DSP
    /* NOTE: one mask byte covers 8 gradients: all kept (0xFF) costs a compare, otherwise two word ANDs. */
    for (; i + 8 <= n; i += 8) {
        const uint32_t mb = mask[i >> 3];
        if (mb != 0xFFu) {
            am_store_u32(g + i, tf_load_u32(g + i) & am_nibble[mb & 15u]);
            am_store_u32(g + i + 4, tf_load_u32(g + i + 4) & am_nibble[mb >> 4]);
        }
    }
#endif
    for (; i < n; i++) {
        if (!tf_mask_get(mask, i)) {
            g[i] = 0;
        }
    }
    return TF_OK;
}
