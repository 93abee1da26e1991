/* dyn_requant of an int32 accumulator buffer to int8 with a power-of-two exponent (docs/engine.md). */
#include "tf_kernels.h"
#include "tf_qmath.h"

tf_status tf_dyn_requant_s32(int32_t n, const int32_t *acc, int32_t exp, int8_t *g, int32_t *g_exp) {
    if (!acc || !g || !g_exp || n < 0) {
        return TF_ERR_ARG;
    }
    uint64_t mx = 0;
    for (int32_t i = 0; i < n; i++) {
        uint64_t a = tf_abs64(acc[i]);
        mx = a > mx ? a : mx;
    }
    const int32_t sh = tf_dyn_shift(mx);
    /* NOTE: writing g[i] after reading acc[i] in ascending order keeps g aliasing acc's bytes safe. */
    for (int32_t i = 0; i < n; i++) {
        g[i] = (int8_t)tf_rshift_round_even(acc[i], sh);
    }
    *g_exp = exp + sh;
    return TF_OK;
}
