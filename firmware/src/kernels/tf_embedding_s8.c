/* EMBEDDING (table lookup) and EMBEDDING_UPDATE (QAS-SGD with stochastic rounding on the looked-up rows only:
 * rows with a zero sum get dw = 0 exactly, docs/engine.md). */
#include "tf_kernels.h"
#include "tf_qmath.h"

tf_status tf_embedding_s8(int32_t vocab, int32_t dim, int32_t length, const int32_t *ids, const int8_t *table,
                          int8_t *y) {
    if (!ids || !table || !y) {
        return TF_ERR_ARG;
    }
    for (int32_t l = 0; l < length; l++) {
        if (ids[l] < 0 || ids[l] >= vocab) {
            return TF_ERR_ARG;
        }
    }
    /* NOTE: each id is read once more and checked where it is used: y may not alias ids (the runtime refuses that
     * layout), but a direct caller's overlap must not turn the first pass's checks into an out-of-bounds read */
    for (int32_t l = 0; l < length; l++) {
        const int32_t r = ids[l];
        if (r < 0 || r >= vocab) {
            return TF_ERR_ARG;
        }
        for (int32_t d = 0; d < dim; d++) {
            y[d * length + l] = table[(int64_t)r * dim + d];
        }
    }
    return TF_OK;
}

tf_status tf_embedding_update_s8(const tf_embedding_update_params *p, int32_t vocab, int32_t dim, int32_t length,
                                 const int8_t *g_y, int32_t e_y, const int32_t *ids, int8_t *table) {
    if (!p || !g_y || !ids || !table || p->lr_m < 0 || p->lr_m > 32768) {
        return TF_ERR_ARG;
    }
    const int32_t m = (int32_t)tf_rshift_round((int64_t)p->lr_m * p->qas_m, 15);
    const int32_t e = p->lr_e + p->qas_e + 15 + e_y;
    for (int32_t l = 0; l < length; l++) {
        const int32_t r = ids[l];
        if (r < 0 || r >= vocab) {
            return TF_ERR_ARG;
        }
        int first = 1;
        for (int32_t j = 0; j < l; j++) {
            first &= ids[j] != r;
        }
        if (!first) {
            continue; /* this row was updated with all its occurrences already */
        }
        for (int32_t d = 0; d < dim; d++) {
            int64_t acc = 0;
            for (int32_t j = l; j < length; j++) {
                if (ids[j] == r) {
                    acc += g_y[d * length + j];
                }
            }
            const int32_t flat = r * dim + d;
            int64_t dw = tf_scaled_update(acc, m, e, tf_rng_u32(p->step, p->table_tensor_id, (uint32_t)flat), 255);
            table[flat] = (int8_t)tf_clamp_i32((int64_t)table[flat] - dw, TF_WEIGHT_MIN, TF_WEIGHT_MAX);
        }
    }
    return TF_OK;
}
