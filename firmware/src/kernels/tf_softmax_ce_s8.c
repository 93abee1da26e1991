/* SOFTMAX_CE: int8 logits -> int8 error gradient of softmax cross-entropy, exp from the plan's LUT
 * (docs/engine.md "Loss"). The loss itself is reported as the label's Q15 probability (no floats here). */
#include "tf_kernels.h"
#include "tf_qmath.h"

#define TF_CE_MAX_CLASSES 1024

tf_status tf_softmax_ce_s8(const int32_t *exp_lut, int32_t k, const int8_t *logits, int32_t label, int8_t *g,
                           int32_t *g_exp, tf_ce_result *res) {
    if (!exp_lut || !logits || !g || !g_exp || k < 1 || k > TF_CE_MAX_CLASSES || label < 0 || label >= k) {
        return TF_ERR_ARG;
    }
    int32_t ymax = logits[0], arg = 0;
    for (int32_t i = 1; i < k; i++) {
        if (logits[i] > ymax) {
            ymax = logits[i];
            arg = i;
        }
    }
    int64_t s = 0;
    for (int32_t i = 0; i < k; i++) {
        s += exp_lut[ymax - logits[i]];
    }
    if (s <= 0) {
        return TF_ERR_ARG; /* a LUT with exp_lut[0] == 0 is a compiler bug */
    }
    /* pass 1: max |g32| for the dynamic shift; pass 2: the int8 values (P is recomputed, K is small) */
    uint64_t mx = 0;
    int32_t p_label = 0;
    for (int32_t i = 0; i < k; i++) {
        int64_t pq = ((int64_t)exp_lut[ymax - logits[i]] * 32768 + s / 2) / s;
        int64_t g32 = pq - (i == label ? 32768 : 0);
        if (i == label) {
            p_label = (int32_t)pq;
        }
        uint64_t a = tf_abs64(g32);
        mx = a > mx ? a : mx;
    }
    const int32_t sh = tf_dyn_shift(mx);
    for (int32_t i = 0; i < k; i++) {
        int64_t pq = ((int64_t)exp_lut[ymax - logits[i]] * 32768 + s / 2) / s;
        g[i] = (int8_t)tf_rshift_round_even(pq - (i == label ? 32768 : 0), sh);
    }
    *g_exp = -15 + sh;
    if (res) {
        res->p_label_q15 = p_label;
        res->correct = (arg == label);
    }
    return TF_OK;
}
