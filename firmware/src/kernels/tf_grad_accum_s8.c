/* GRAD_ACCUM: the sum of two gradient branches, aligned to the larger exponent, requantized again.
 * Two passes (max, then write) so no int32 scratch is needed and g may alias an input. */
#include "tf_kernels.h"
#include "tf_qmath.h"

tf_status tf_grad_accum_s8(int32_t n, const int8_t *g1, int32_t e1, const int8_t *g2, int32_t e2, int8_t *g,
                           int32_t *g_exp) {
    if (!g1 || !g2 || !g || !g_exp || n < 0) {
        return TF_ERR_ARG;
    }
    const int32_t e = e1 > e2 ? e1 : e2, s1 = e - e1, s2 = e - e2;
    uint64_t mx = 0;
    for (int32_t i = 0; i < n; i++) {
        uint64_t a = tf_abs64(tf_rshift_round(g1[i], s1) + tf_rshift_round(g2[i], s2));
        mx = a > mx ? a : mx;
    }
    const int32_t sh = tf_dyn_shift(mx);
    for (int32_t i = 0; i < n; i++) {
        g[i] = (int8_t)tf_rshift_round(tf_rshift_round(g1[i], s1) + tf_rshift_round(g2[i], s2), sh);
    }
    *g_exp = e + sh;
    return TF_OK;
}
