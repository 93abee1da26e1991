/* ADD of two int8 tensors with their own scales (docs/engine.md "ADD"), optional mask. Elementwise and memory
 * bound: nothing for __SMLAD to win, but the 64-bit shift and the per-element mask byte updates are avoidable. */
#include "tf_dsp.h"
#include "tf_kernels.h"
#include "tf_qmath.h"

/* The reference: one element, 64-bit, returns pre (before the clamp). */
static inline int64_t add_ref(const tf_add_params *p, int64_t half, int8_t a, int8_t b) {
    const int64_t s = ((int64_t)a + p->a_offset) * p->mult_a + ((int64_t)b + p->b_offset) * p->mult_b;
    return ((s + half) >> p->shift) + p->output_offset;
}

#if TF_USE_DSP
static inline int32_t add_ssat8(int32_t v) {
    int32_t r;
    __asm__("ssat %0, #8, %1" : "=r"(r) : "r"(v));
    return r;
}
#endif

/* NOTE (fast path, 11 <= shift <= 31, |offsets| <= 128, |output_offset| <= 2^16): with the offsets, the rounding
 * half and output_offset * 2^shift folded into one constant k (|k| < 2^48), s = k + a mult_a + b mult_b is exact
 * in int64 (two SMLALs) and pre = floor(s / 2^shift) is the reference's pre (adding output_offset * 2^shift before
 * the floor adds output_offset after it). |(a - za) mult_a + (b - zb) mult_b| < 2^40 gives |pre| < 2^29 + 2^16 + 1,
 * so pre is the low word of s >> shift: (lo >> shift) | (hi << (32 - shift)), no 64-bit shift. pre is in
 * [act_min, act_max] exactly when clamping leaves it unchanged: that is the mask bit. Eight bits are gathered
 * and stored as one byte; the last byte's unused bits are 0, as the reference leaves them. */
static void add_fast(const tf_add_params *p, int32_t n, const int8_t *a, const int8_t *b, int8_t *y, uint8_t *mask) {
    const int32_t ma = p->mult_a, mb = p->mult_b, sh = p->shift, rsh = 32 - p->shift;
    const int32_t lo = p->act_min, hi = p->act_max;
    const int64_t k = (int64_t)p->a_offset * ma + (int64_t)p->b_offset * mb + ((int64_t)1 << (sh - 1)) +
                      (int64_t)p->output_offset * ((int64_t)1 << sh);
#if TF_USE_DSP
    const int full8 = lo == -128 && hi == 127;
#endif
    for (int32_t i0 = 0; i0 < n; i0 += 8) {
        const int32_t cnt = n - i0 < 8 ? n - i0 : 8;
        uint32_t bits = 0;
#if TF_USE_DSP
        if (full8) { /* NOTE: int8 output range: the clamp is one SSAT */
            for (int32_t j = 0; j < cnt; j++) {
                const int64_t s = k + (int64_t)a[i0 + j] * ma + (int64_t)b[i0 + j] * mb;
                const int32_t pre = (int32_t)(((uint32_t)s >> sh) | ((uint32_t)((uint64_t)s >> 32) << rsh));
                const int32_t c = add_ssat8(pre);
                y[i0 + j] = (int8_t)c;
                bits |= (uint32_t)(c == pre) << j;
            }
            if (mask) {
                mask[i0 >> 3] = (uint8_t)bits;
            }
            continue;
        }
#endif
        for (int32_t j = 0; j < cnt; j++) {
            const int64_t s = k + (int64_t)a[i0 + j] * ma + (int64_t)b[i0 + j] * mb;
            const int32_t pre = (int32_t)(((uint32_t)s >> sh) | ((uint32_t)((uint64_t)s >> 32) << rsh));
            const int32_t c = pre < lo ? lo : (pre > hi ? hi : pre);
            y[i0 + j] = (int8_t)c;
            bits |= (uint32_t)(c == pre) << j;
        }
        if (mask) {
            mask[i0 >> 3] = (uint8_t)bits;
        }
    }
}

tf_status tf_add_s8(const tf_add_params *p, int32_t n, const int8_t *a, const int8_t *b, int8_t *y, uint8_t *mask) {
    if (!p || !a || !b || !y || n < 0 || p->shift < 1 || p->shift > 62) {
        return TF_ERR_ARG;
    }
    if (p->shift >= 11 && p->shift <= 31 && p->a_offset >= -128 && p->a_offset <= 128 && p->b_offset >= -128 &&
        p->b_offset <= 128 && p->output_offset >= -65536 && p->output_offset <= 65536) {
        add_fast(p, n, a, b, y, mask);
        return TF_OK;
    }
    const int64_t half = TF_POW2_I64(p->shift - 1);
    for (int32_t i = 0; i < n; i++) {
        const int64_t pre = add_ref(p, half, a[i], b[i]);
        y[i] = (int8_t)tf_clamp_i32(pre, p->act_min, p->act_max);
        if (mask) {
            tf_mask_put(mask, i, pre >= p->act_min && pre <= p->act_max);
        }
    }
    if (mask && (n & 7)) {
        mask[n >> 3] &= (uint8_t)((1u << (n & 7)) - 1u);
    }
    return TF_OK;
}
