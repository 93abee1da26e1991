/* Requantization shared by the forward conv kernels (tf_conv2d_s8.c, tf_conv2d_spatial_s8.c); internal, not
 * part of the kernel API. Each output: pre = ((acc + bias) * mult + 2^(shift-1)) >> shift, + zy, clamped. */
#ifndef TF_CONV_RQ_H
#define TF_CONV_RQ_H

#include "tf_kernels.h"
#include "tf_qmath.h"

/* Per output channel requantization: pre = ((acc + bias) * mult + 2^(shift-1)) >> shift, + zy. */
typedef struct {
    int64_t cb; /* bias * mult + 2^(shift-1) */
    int32_t mult, shift, out_off, lo, hi, bias;
} rq_t;

static inline void rq_init(rq_t *r, const tf_conv_params *p, int32_t mult, int32_t shift, int32_t bias) {
    r->cb = (int64_t)bias * mult + TF_POW2_I64(shift - 1);
    r->bias = bias;
    r->mult = mult;
    r->shift = shift;
    r->out_off = p->output_offset;
    r->lo = p->act_min;
    r->hi = p->act_max;
}

/* NOTE: |acc + bias| < 2^32 and mult < 2^31, so v is exact in int64. For shift >= 33, floor(v / 2^shift) =
 * floor(floor(v / 2^32) / 2^(shift - 32)) and |v >> 32| < 2^31: the high word alone, |result| < 2^30. Other
 * shifts saturate to +-2^30, far outside any int8 activation range: same clamp, same mask. */
static inline int32_t rq_pre(const rq_t *r, int32_t acc) {
    const int64_t v = r->cb + (int64_t)acc * r->mult;
    if (r->shift >= 33) {
        return ((int32_t)(v >> 32) >> (r->shift - 32)) + r->out_off;
    }
    const int64_t q = v >> r->shift;
    const int64_t lim = TF_POW2_I64(30);
    return (int32_t)(q < -lim ? -lim : (q > lim ? lim : q)) + r->out_off;
}

/* Writes y[i] and mask bit i; mask bits collect in *bits and are stored a whole byte at a time. fast and
 * has_mask are constants where the callers below are instantiated (r->shift >= 33, mask != NULL). */
static inline __attribute__((always_inline)) void putf(const rq_t *r, int8_t *y, uint8_t *mask, uint32_t *bits,
                                                       int32_t i, int32_t acc, int fast, int has_mask) {
    int32_t pre;
    if (fast) {
        const int64_t v = r->cb + (int64_t)acc * r->mult;
        pre = ((int32_t)(v >> 32) >> (r->shift - 32)) + r->out_off;
    } else {
        pre = rq_pre(r, acc);
    }
    const int32_t yv = pre < r->lo ? r->lo : (pre > r->hi ? r->hi : pre);
    y[i] = (int8_t)yv;
    if (has_mask) {
        *bits |= (uint32_t)(yv == pre) << (i & 7);
        if ((i & 7) == 7) {
            mask[i >> 3] = (uint8_t)*bits;
            *bits = 0;
        }
    }
}

static inline void put(const rq_t *r, int8_t *y, uint8_t *mask, uint32_t *bits, int32_t i, int32_t acc) {
    putf(r, y, mask, bits, i, acc, r->shift >= 33, mask != NULL);
}

/* THE fast requantization, used by every forward conv kernel (1x1 pw4, KxK spatial, 3x3 depthwise, the first
 * conv's patch path) for the common case (shift in [33, 55], act range [-128, 127], int8 zero point): the bias
 * goes into the accumulator and the rounding constant and zero point into the high word, so one output is
 * y = sat8(smmla(acc + bias, mult, k) >> t), t = shift - 32, k = 2^(t-1) + zy * 2^t.
 * NOTE: (acc + bias) * mult + k * 2^32 = v + zy * 2^shift with v as in rq_pre, so floor(. / 2^32) >> t is
 * floor(v / 2^shift) + zy exactly; |k| < 2^31 needs t <= 23, and acc + bias must not wrap in int32: the one
 * entry condition checks |bias| + acc_bound <= INT32_MAX with the caller's bound on |acc| at every partial sum.
 * Both sides are below 2^62, so the 64-bit sum in smmla is exact. (The spatial path once had its own copy with
 * other conditions, so one layer could take the fast path in one kernel and the slow one in another.) */
typedef struct {
    int32_t mult, k, t, bias;
} rqf_t;

/* |acc| bound per tap: |x - zx| * |w| <= 255 * 128 for (x - zx) sums, |x w| + |zx w| <= 2 * 128 * 128 when the
 * zero-point term is carried separately (woff / the bias) */
#define TF_RQF_TAP 32768

/* 1 and fills *f when the fast form applies; acc_bound bounds |acc| at every partial sum (taps * TF_RQF_TAP). */
static inline int rqf_init(rqf_t *f, const tf_conv_params *p, int32_t mult, int32_t shift, int32_t bias,
                           int64_t acc_bound) {
    if (p->act_min != -128 || p->act_max != 127 || shift < 33 || shift > 55 || p->output_offset < -128 ||
        p->output_offset > 127 || (bias < 0 ? -(int64_t)bias : bias) + acc_bound > INT32_MAX) {
        return 0;
    }
    f->mult = mult;
    f->t = shift - 32;
    f->k = (int32_t)(TF_POW2_I64(f->t - 1) + (int64_t)p->output_offset * TF_POW2_I64(f->t));
    f->bias = bias;
    return 1;
}

/* clamp to [-128, 127]: one ssat on M4/M7 */
static inline int32_t tf_sat8(int32_t x) {
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP == 1 && !defined(TF_NO_DSP)
    int32_t r;
    __asm__("ssat %0, #8, %1" : "=r"(r) : "r"(x));
    return r;
#else
    return x < -128 ? -128 : (x > 127 ? 127 : x);
#endif
}

/* hi32(a * b + c 2^32) (floor): one smmla on M4/M7 */
static inline int32_t tf_mmla(int32_t a, int32_t b, int32_t c) {
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP == 1 && !defined(TF_NO_DSP)
    int32_t r;
    __asm__("smmla %0, %1, %2, %3" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
#else
    return (int32_t)(((int64_t)a * b + (int64_t)c * TF_POW2_I64(32)) >> 32);
#endif
}

static inline int32_t rqf_pre(const rqf_t *f, int32_t acc) { return tf_mmla(acc, f->mult, f->k) >> f->t; }

static inline int32_t rqf_sat8(int32_t v) { return tf_sat8(v); }

/* rqf_t of a per-channel rq_t, for a kernel whose |acc| is at most taps * TF_RQF_TAP at every partial sum */
static inline int rqf_of(rqf_t *q, const tf_conv_params *p, const rq_t *r, int32_t taps) {
    return rqf_init(q, p, r->mult, r->shift, r->bias, (int64_t)taps * TF_RQF_TAP);
}

#define TF_AI inline __attribute__((always_inline))
#define TF_PACK16(a, b) (((uint32_t)(a)&0xFFFFu) | ((uint32_t)(b) << 16))

/* Instantiates name##_impl (always inline, last two parameters fast and has_mask) for the four cases. */
#define TF_DISPATCH(impl, rp, mask, ...)                                                                               \
    ((rp)->shift >= 33 ? ((mask) ? impl(__VA_ARGS__, 1, 1) : impl(__VA_ARGS__, 1, 0))                                  \
                       : ((mask) ? impl(__VA_ARGS__, 0, 1) : impl(__VA_ARGS__, 0, 0)))
/* One output channel of a KxK conv (cin_g input channels of its group at xg, weights wc (cin_g, KH, KW)) and
 * the 3x3 depthwise case; both return the next output index (tf_conv2d_spatial_s8.c). */
int32_t tf_conv_spatial(const rq_t *rp, const tf_conv_params *p, const int8_t *xg, const int8_t *wc, int32_t cin_g,
                        int32_t ih_n, int32_t iw_n, int32_t kh_n, int32_t kw_n, int32_t oh_n, int32_t ow_n,
                        int32_t woff, int8_t *y, uint8_t *mask, uint32_t *bitsp, int32_t out_i);
int32_t tf_conv_dw3(const rq_t *rp, const tf_conv_params *p, const int8_t *xc, const int8_t *wc, int32_t ih_n,
                    int32_t iw_n, int32_t oh_n, int32_t ow_n, int32_t woff, int8_t *y, uint8_t *mask, uint32_t *bitsp,
                    int32_t out_i);

/* The first conv's patch path (3x3, C_in <= 4, no mask; tf_conv2d_spatial_s8.c): computes the whole output and
 * returns 1, or returns 0 when the shape is not its case. */
int tf_conv_patch3(const tf_conv_params *p, const tf_per_channel_quant *q, const tf_dims *x_dims, const int8_t *x,
                   const tf_filter_dims *w_dims, const int8_t *w, const int32_t *bias, const tf_dims *y_dims, int8_t *y,
                   const uint8_t *mask);

#define TF_DW_ROW 256 /* widest input row of the 3x3 depthwise path (a row of zero points on the stack) */

#endif /* TF_CONV_RQ_H */
