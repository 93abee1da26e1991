/* Fixed-point atoms of the int8 training step, the C twin of device_agent/engine/qmath.py (docs/engine.md).
 * Each function matches its numpy counterpart bit for bit; none allocates, none uses floats. */
#ifndef TF_QMATH_H
#define TF_QMATH_H

#include "tf_types.h"

#define TF_INT8_MAX 127
#define TF_WEIGHT_MIN (-127)
#define TF_WEIGHT_MAX 127

/* (acc * mult + 2^(shift-1)) >> shift, round half up. shift in [1, 62], |acc| < 2^32, mult < 2^31. */
static inline int64_t tf_requantize(int64_t acc, int32_t mult, int32_t shift) {
    return (acc * (int64_t)mult + TF_POW2_I64(shift - 1)) >> shift;
}

/* Arithmetic right shift with round half up; shift <= 0 shifts left; right shifts above 62 act as 62
 * (qmath.rshift_round). */
static inline int64_t tf_rshift_round(int64_t x, int32_t shift) {
    if (shift > 0) {
        shift = shift > 62 ? 62 : shift;
        return (x + TF_POW2_I64(shift - 1)) >> shift;
    }
    return x * TF_POW2_I64(-shift);
}

/* Arithmetic right shift with round half to even (qmath.rshift_round_even): q = x >> s, r = x - q 2^s, q + 1 when
 * r > 2^(s-1) or (r == 2^(s-1) and q odd); as q + ((r + 2^(s-1) - 1 + (q & 1)) >> s), with r taken unsigned so
 * nothing overflows. shift <= 0 shifts left; right shifts above 62 act as 62. Every error-gradient shift uses it. */
static inline int64_t tf_rshift_round_even(int64_t x, int32_t shift) {
    if (shift > 0) {
        shift = shift > 62 ? 62 : shift;
        const int64_t q = x >> shift;
        const uint64_t r = (uint64_t)x & (((uint64_t)1 << shift) - 1u);
        return q + (int64_t)((r + ((uint64_t)1 << (shift - 1)) - 1u + (uint64_t)(q & 1)) >> shift);
    }
    return x * TF_POW2_I64(-shift);
}

/* tf_rshift_round_even for 32-bit x and shift in [1, 30] (the hot loops of the backward kernels). */
static inline int32_t tf_rne_s32(int32_t x, int32_t shift) {
    const int32_t q = x >> shift;
    const uint32_t r = (uint32_t)x & ((1u << shift) - 1u);
    return q + (int32_t)((r + (1u << (shift - 1)) - 1u + (uint32_t)(q & 1)) >> shift);
}

/* Smallest sh >= 0 with rshift_round_even(max_abs, sh) <= 127 (the shift of qmath.dyn_requant). */
static inline int32_t tf_dyn_shift(uint64_t max_abs) {
    int32_t bl = 0;
    uint64_t m = max_abs;
    while (m) {
        bl++;
        m >>= 1;
    }
    int32_t sh = bl > 7 ? bl - 7 : 0;
    if (tf_rshift_round_even((int64_t)max_abs, sh) > TF_INT8_MAX) {
        sh++;
    }
    return sh;
}

static inline uint64_t tf_abs64(int64_t v) { return v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v; }

/* Counter-based uniform uint32 per element (qmath.rng_u32): a hash of (step, tensor id, flat index). */
static inline uint32_t tf_rng_u32(uint32_t step, uint32_t tensor_id, uint32_t idx) {
    uint32_t x = idx * 0x9E3779B1u;
    x ^= step * 0x85EBCA77u;
    x ^= tensor_id * 0xC2B2AE3Du;
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

/* Stochastically rounded acc * mult * 2^exp, saturated to [-limit, limit] (qmath.scaled_update).
 * |acc| < 2^40, 0 <= mult < 2^16. */
static inline int64_t tf_scaled_update(int64_t acc, int32_t mult, int32_t exp, uint32_t rnd, int64_t limit) {
    int64_t v = acc * (int64_t)mult;
    const int64_t vmax = TF_POW2_I64(56);
    v = v < -vmax ? -vmax : (v > vmax ? vmax : v);
    int64_t out;
    if (exp < 0) {
        int32_t s = -exp > 62 ? 62 : -exp;
        int64_t r = s <= 32 ? (int64_t)(rnd >> (32 - s)) : (int64_t)rnd * TF_POW2_I64(s - 32);
        /* NOTE: s == 32 gives rnd >> 0; a 32-bit shift by 32 (UB) never happens since s >= 1. */
        out = (v + r) >> s;
    } else {
        const int64_t umax = TF_POW2_I64(40);
        int64_t u = v < -umax ? -umax : (v > umax ? umax : v);
        out = u * TF_POW2_I64(exp > 20 ? 20 : exp);
    }
    return out < -limit ? -limit : (out > limit ? limit : out);
}

#endif /* TF_QMATH_H */
