/* GRAD_ACCUM: the sum of two gradient branches, aligned to the larger exponent, requantized again.
 * Two passes (max, then write) so no int32 scratch is needed and g may alias an input. */
#include "tf_kernels.h"
#include "tf_qmath.h"

/* rshift_round of an int8 by s >= 0 in 32 bits. NOTE: for s >= 8, v + 2^(s-1) lies in [0, 2^s) for every int8
 * v, so the result is 0, as it is with s = 8: clamping s to 8 keeps it exact (tf_rshift_round caps at 62). */
static inline int32_t ga_shift_s8(int32_t v, int32_t s, int32_t half) { return (v + half) >> s; }

tf_status tf_grad_accum_s8(int32_t n, const int8_t *g1, int32_t e1, const int8_t *g2, int32_t e2, int8_t *g,
                           int32_t *g_exp) {
    if (!g1 || !g2 || !g || !g_exp || n < 0) {
        return TF_ERR_ARG;
    }
    const int32_t e = e1 > e2 ? e1 : e2;
    const int32_t s1 = e - e1 > 8 ? 8 : e - e1, s2 = e - e2 > 8 ? 8 : e - e2;
    const int32_t h1 = s1 ? 1 << (s1 - 1) : 0, h2 = s2 ? 1 << (s2 - 1) : 0;
    /* |sum| <= 256: the max and the final shift fit in 32 bits */
    int32_t mx = 0;
    for (int32_t i = 0; i < n; i++) {
        int32_t a = ga_shift_s8(g1[i], s1, h1) + ga_shift_s8(g2[i], s2, h2);
        a = a < 0 ? -a : a;
        mx = a > mx ? a : mx;
    }
    const int32_t sh = tf_dyn_shift((uint64_t)mx);
    const int32_t hs = sh ? 1 << (sh - 1) : 0;
    for (int32_t i = 0; i < n; i++) {
        g[i] = (int8_t)((ga_shift_s8(g1[i], s1, h1) + ga_shift_s8(g2[i], s2, h2) + hs) >> sh);
    }
    *g_exp = e + sh;
    return TF_OK;
}
