/* GRAD_ACCUM: the sum of two gradient branches, aligned to the larger exponent, requantized again.
 * Two passes (max, then write) so no int32 scratch is needed and g may alias an input. */
#include "tf_kernels.h"
#include "tf_qmath.h"

/* rshift_round_even of an int8 (or of the |sum| <= 256) by s >= 0 in 32 bits. NOTE: for s >= 8 every int8 v
 * rounds to 0 (|v| / 2^s <= 1/2, and the tie -128 / 256 goes to the even 0), as it does with s = 8: clamping s to 8
 * keeps it exact. */
static inline int32_t ga_shift(int32_t v, int32_t s) { return s ? tf_rne_s32(v, s) : v; }

tf_status tf_grad_accum_s8(int32_t n, const int8_t *g1, int32_t e1, const int8_t *g2, int32_t e2, int8_t *g,
                           int32_t *g_exp) {
    if (!g1 || !g2 || !g || !g_exp || n < 0) {
        return TF_ERR_ARG;
    }
    const int32_t e = e1 > e2 ? e1 : e2;
    const int32_t s1 = e - e1 > 8 ? 8 : e - e1, s2 = e - e2 > 8 ? 8 : e - e2;
    /* |sum| <= 256: the max and the final shift fit in 32 bits */
    int32_t mx = 0;
    for (int32_t i = 0; i < n; i++) {
        int32_t a = ga_shift(g1[i], s1) + ga_shift(g2[i], s2);
        a = a < 0 ? -a : a;
        mx = a > mx ? a : mx;
    }
    const int32_t sh = tf_dyn_shift((uint64_t)mx);
    for (int32_t i = 0; i < n; i++) {
        g[i] = (int8_t)ga_shift(ga_shift(g1[i], s1) + ga_shift(g2[i], s2), sh);
    }
    *g_exp = e + sh;
    return TF_OK;
}
