/* ADD of two int8 tensors with their own scales (docs/engine.md "ADD"), optional mask. Elementwise and memory
 * bound: nothing for __SMLAD to win, but the 64-bit shift and the per-element mask byte updates are avoidable. */
#include "tf_kernels.h"
#include "tf_qmath.h"

/* The reference: one element, 64-bit, returns pre (before the clamp). */
static inline int64_t add_ref(const tf_add_params *p, int64_t half, int8_t a, int8_t b) {
    const int64_t s = ((int64_t)a + p->a_offset) * p->mult_a + ((int64_t)b + p->b_offset) * p->mult_b;
    return ((s + half) >> p->shift) + p->output_offset;
}

/* NOTE (fast path bounds): |a + a_offset|, |b + b_offset| <= 256 and |mult| < 2^31 give |s| < 2^40, so for
 * shift >= 11 the shifted sum has |.| < 2^29 + 1 and, with |output_offset| <= 2^16, pre fits in int32. The 64-bit
 * sum is formed exactly (SMULL + SMLAL); its arithmetic shift is taken from the two words: for shift < 32 the low
 * 32 bits of the result are (lo >> shift) | (hi << (32 - shift)), which is the result since it fits in int32; for
 * shift >= 32 it is hi >> (shift - 32). */
static inline int32_t add_fast(int64_t s, int32_t shift) {
    const uint32_t lo = (uint32_t)s, hi = (uint32_t)((uint64_t)s >> 32);
    if (shift >= 32) {
        return (int32_t)hi >> (shift - 32); /* arithmetic: GCC and the Arm compilers shift signed right so */
    }
    return (int32_t)((lo >> shift) | (hi << (32 - shift)));
}

tf_status tf_add_s8(const tf_add_params *p, int32_t n, const int8_t *a, const int8_t *b, int8_t *y, uint8_t *mask) {
    if (!p || !a || !b || !y || n < 0 || p->shift < 1 || p->shift > 62) {
        return TF_ERR_ARG;
    }
    const int64_t half = TF_POW2_I64(p->shift - 1);
    const int32_t lo = p->act_min, hi = p->act_max;
    const int fast = p->shift >= 11 && p->a_offset >= -128 && p->a_offset <= 128 && p->b_offset >= -128 &&
                     p->b_offset <= 128 && p->output_offset >= -65536 && p->output_offset <= 65536;
    /* NOTE: the mask is written a byte (8 elements) at a time; the last byte's unused bits are 0, as before. */
    for (int32_t i0 = 0; i0 < n; i0 += 8) {
        const int32_t i1 = n - i0 < 8 ? n : i0 + 8;
        uint32_t bits = 0;
        if (fast) {
            const int32_t ao = p->a_offset, bo = p->b_offset, ma = p->mult_a, mb = p->mult_b, sh = p->shift;
            const int32_t zo = p->output_offset;
            for (int32_t i = i0; i < i1; i++) {
                const int64_t s = (int64_t)(a[i] + ao) * ma + (int64_t)(b[i] + bo) * mb + half;
                const int32_t pre = add_fast(s, sh) + zo;
                y[i] = (int8_t)(pre < lo ? lo : (pre > hi ? hi : pre));
                bits |= (uint32_t)(pre >= lo && pre <= hi) << (i - i0);
            }
        } else {
            for (int32_t i = i0; i < i1; i++) {
                const int64_t pre = add_ref(p, half, a[i], b[i]);
                y[i] = (int8_t)tf_clamp_i32(pre, lo, hi);
                bits |= (uint32_t)(pre >= lo && pre <= hi) << (i - i0);
            }
        }
        if (mask) {
            mask[i0 >> 3] = (uint8_t)bits;
        }
    }
    return TF_OK;
}
