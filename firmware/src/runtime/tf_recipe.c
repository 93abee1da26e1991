/* The training recipe's schedule (tf_recipe.h), bit-exact with device_agent/engine/recipe.py. */
#include "tf_recipe.h"

#include "tf_qmath.h"

const int32_t tf_cos_q15[65] = {
    32768, 32748, 32689, 32591, 32453, 32277, 32063, 31810, 31521, 31195, 30833, 30437, 30007,
    29544, 29049, 28524, 27969, 27387, 26778, 26144, 25486, 24807, 24107, 23389, 22654, 21904,
    21140, 20365, 19580, 18788, 17990, 17188, 16384, 15580, 14778, 13980, 13188, 12403, 11628,
    10864, 10114, 9379,  8661,  7961,  7282,  6624,  5990,  5381,  4799,  4244,  3719,  3224,
    2761,  2331,  1935,  1573,  1247,  958,   705,   491,   315,   177,   79,    20,    0,
};

int32_t tf_lr_factor_q15(uint32_t u, uint32_t warmup, uint32_t total, int32_t lr_min_q15) {
    if (u < warmup) {
        return (int32_t)((((uint64_t)u + 1) << 15) / warmup);
    }
    if (total == 0) {
        return 32768;
    }
    uint64_t p = ((uint64_t)(u - warmup) << 16) / (uint64_t)(total - warmup); /* total > warmup (plan reader) */
    p = p > 65536u ? 65536u : p;
    const int32_t i = (int32_t)(p >> 10), f = (int32_t)(p & 1023u);
    /* NOTE: (COS[i+1] - COS[i]) * f is <= 0; >> floors it, as Python's >> does (arithmetic shift, as everywhere in
     * this firmware) */
    const int32_t c =
        i == 64 ? tf_cos_q15[64] : tf_cos_q15[i] + (((tf_cos_q15[i + 1] - tf_cos_q15[i]) * f + 512) >> 10);
    return lr_min_q15 + (int32_t)((((int64_t)(32768 - lr_min_q15)) * c + (1 << 14)) >> 15);
}

static int32_t bitlen64(int64_t v) {
    int32_t bl = 0;
    for (uint64_t q = (uint64_t)(v < 0 ? -v : v); q; q >>= 1) {
        bl++;
    }
    return bl;
}

void tf_per_sample_lr(int32_t lr_m, int32_t lr_e, uint32_t accum_steps, int32_t *m, int32_t *e) {
    const int64_t q = ((int64_t)lr_m * 32768 + (int64_t)(accum_steps / 2)) / (int64_t)accum_steps; /* lr_m >= 0 */
    const int32_t sh = bitlen64(q) - 15;
    *m = (int32_t)tf_rshift_round(q, sh);
    *e = lr_e - 15 + sh;
}

int tf_scaled_lr(int32_t lr_m, int32_t lr_e, int32_t f_q15, int32_t *m, int32_t *e) {
    if (f_q15 <= 0) {
        return 0;
    }
    const int64_t prod = (int64_t)lr_m * f_q15;
    const int32_t sh = bitlen64(prod) - 15;
    *m = (int32_t)tf_rshift_round(prod, sh);
    *e = lr_e - 15 + sh;
    return 1;
}
