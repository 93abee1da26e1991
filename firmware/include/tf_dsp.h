/* Small inner loops shared by kernels: a portable version always, an __SMLAD version on Cortex-M4/M7.
 * Both return the exact integer result, so kernels stay bit-exact whichever path is compiled. */
#ifndef TF_DSP_H
#define TF_DSP_H

#include <string.h>

#include "tf_types.h"

#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP == 1 && !defined(TF_NO_DSP)
#define TF_USE_DSP 1
static inline uint32_t tf_sxtb16(uint32_t x) {
    uint32_t r;
    __asm__("sxtb16 %0, %1" : "=r"(r) : "r"(x));
    return r;
}
static inline uint32_t tf_sxtb16_ror8(uint32_t x) {
    uint32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(x));
    return r;
}
static inline int32_t tf_smlad(uint32_t a, uint32_t b, int32_t acc) {
    int32_t r;
    __asm__("smlad %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc));
    return r;
}
static inline uint32_t tf_sadd16(uint32_t a, uint32_t b) {
    uint32_t r;
    __asm__("sadd16 %0, %1, %2" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
/* (lo = a.lo, hi = b.lo) and (lo = b.hi, hi = a.hi): pair halfwords of two sxtb16 results. */
static inline uint32_t tf_pkhbt(uint32_t a, uint32_t b) {
    uint32_t r;
    __asm__("pkhbt %0, %1, %2, lsl #16" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
static inline uint32_t tf_pkhtb(uint32_t a, uint32_t b) {
    uint32_t r;
    __asm__("pkhtb %0, %1, %2, asr #16" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
/* acc + a.lo * b.lo (bb), a.hi * b.lo (tb), a.lo * b.hi (bt), a.hi * b.hi (tt): signed 16-bit halves. */
#define TF_SMLAXY(xy)                                                                                                  \
    static inline int32_t tf_smla##xy(uint32_t a, uint32_t b, int32_t acc) {                                           \
        int32_t r;                                                                                                     \
        __asm__("smla" #xy " %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(acc));                                    \
        return r;                                                                                                      \
    }
TF_SMLAXY(bb)
TF_SMLAXY(tb)
TF_SMLAXY(bt)
TF_SMLAXY(tt)
#undef TF_SMLAXY
static inline uint32_t tf_load_u32(const int8_t *p) {
    uint32_t v;
    __builtin_memcpy(&v, p, 4); /* one unaligned ldr on M4/M7 (-ffreestanding turns plain memcpy into a call) */
    return v;
}
static inline uint32_t tf_load_u16(const void *p) {
    uint16_t v;
    __builtin_memcpy(&v, p, 2);
    return v;
}
#else
#define TF_USE_DSP 0
#endif

/* sum a[i] * b[i], i < n, int8 x int8 (int32; callers bound n so it cannot overflow). */
static inline int32_t tf_dot_s8(const int8_t *a, const int8_t *b, int32_t n) {
    int32_t acc = 0, i = 0;
#if TF_USE_DSP
    for (; i + 4 <= n; i += 4) {
        uint32_t va = tf_load_u32(a + i), vb = tf_load_u32(b + i);
        acc = tf_smlad(tf_sxtb16(va), tf_sxtb16(vb), acc);           /* bytes 0, 2 */
        acc = tf_smlad(tf_sxtb16_ror8(va), tf_sxtb16_ror8(vb), acc); /* bytes 1, 3 */
    }
#endif
    for (; i < n; i++) {
        acc += (int32_t)a[i] * b[i];
    }
    return acc;
}

/* sum (x[i] + off) * w[i], i < n: int8 x, w, |off| <= 128 (int32; callers bound n so it cannot overflow). */
static inline int32_t tf_dot_off_s8(const int8_t *x, const int8_t *w, int32_t n, int32_t off) {
    int32_t acc = 0, i = 0;
#if TF_USE_DSP
    const uint32_t off2 = ((uint32_t)off & 0xFFFFu) | ((uint32_t)off << 16);
    for (; i + 4 <= n; i += 4) {
        uint32_t vx = tf_load_u32(x + i), vw = tf_load_u32(w + i);
        acc = tf_smlad(tf_sadd16(tf_sxtb16(vx), off2), tf_sxtb16(vw), acc);
        acc = tf_smlad(tf_sadd16(tf_sxtb16_ror8(vx), off2), tf_sxtb16_ror8(vw), acc);
    }
#endif
    for (; i < n; i++) {
        acc += ((int32_t)x[i] + off) * w[i];
    }
    return acc;
}

/* sum a[i], int8 (int32). */
static inline int32_t tf_sum_s8(const int8_t *a, int32_t n) {
    int32_t acc = 0;
    for (int32_t i = 0; i < n; i++) {
        acc += a[i];
    }
    return acc;
}

#endif /* TF_DSP_H */
