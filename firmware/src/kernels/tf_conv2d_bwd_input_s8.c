/* CONV2D_BWD_INPUT: the error gradient of a conv's input, the exact adjoint (transposed conv) of the forward
 * incl. stride, padding and groups, computed as a gather per input element (docs/engine.md). Over 400 lines:
 * the portable gather, the 1x1 GEMM path, the depthwise KxK __SMLAD paths and the chunked path for small scratch
 * of one op share its bounds and dispatcher here, so a path's entry condition and its exactness argument sit
 * side by side. */
#include "tf_dsp.h"
#include "tf_kernels.h"
#include "tf_qmath.h"

#define TF_BWD_CHUNK 384         /* g' values of one pixel (int16, on the stack) per chunk; int32 sums stay exact */
#define TF_PW_GEMM_MAX_COUT 1022 /* |g'| <= 2^14, |w| <= 128: int32 sums of <= 1022 terms cannot overflow */

/* Bytes after the int32 sums that the 1x1 GEMM path packs its operands into: g' as (ceil(P/2), NCP, 2) words
 * (int16 pairs of consecutive co, two pixels side by side) and 4 input channels of w as (NCP, 4) words, NCP the
 * co pairs padded to a multiple of 4 with zeros. */
static int32_t pw_gemm_bytes(int32_t cout, int32_t plane) {
    const int32_t ncp = (cout + 7) / 8 * 4, npp = (plane + 1) / 2; /* co pairs, padded to a multiple of 4 */
    return npp * ncp * 8 + ncp * 16;
}

int32_t tf_conv2d_bwd_input_get_buffer_size(const tf_dims *gy_dims, const tf_dims *gx_dims, int one_pass) {
    int32_t gy_n = gy_dims->c * gy_dims->h * gy_dims->w;
    int32_t size = ((gy_n * 2 + 3) / 4) * 4; /* int16 g', padded so the int32 part is aligned */
    if (one_pass) {
        const int32_t n4 = gx_dims->c * gx_dims->h * gx_dims->w * 4;
        const int32_t gemm = n4 + pw_gemm_bytes(gy_dims->c, gy_dims->h * gy_dims->w);
        size += n4;
        size = size > gemm ? size : gemm; /* NOTE: enough for the 1x1 GEMM path too (g' is as large there) */
    }
    return size;
}

/* (lo, hi) signed 16-bit halves of one word. */
static inline uint32_t pair16(int32_t lo, int32_t hi) { return ((uint32_t)lo & 0xFFFFu) | ((uint32_t)hi << 16); }

/* acc[ci, ih, iw] = sum_{co in group, kh, kw: ih = oh*s - pad + kh} g'[co, oh, ow] * w[co, ci_local, kh, kw] */
static int64_t bwd_elem(const tf_conv_bwd_params *p, const tf_dims *gy, const int16_t *gq, const tf_filter_dims *wd,
                        const int8_t *w, int32_t ci, int32_t ih, int32_t iw) {
    const int32_t cin_g = wd->c, cout_g = wd->n / p->groups, g = ci / cin_g, ci_l = ci % cin_g;
    const int32_t oplane = gy->h * gy->w;
    int64_t acc = 0;
    for (int32_t kh = 0; kh < wd->h; kh++) {
        const int32_t th = ih + p->pad_h - kh;
        if (th < 0 || th % p->stride_h) {
            continue;
        }
        const int32_t oh = th / p->stride_h;
        if (oh >= gy->h) {
            continue;
        }
        for (int32_t kw = 0; kw < wd->w; kw++) {
            const int32_t tw = iw + p->pad_w - kw;
            if (tw < 0 || tw % p->stride_w) {
                continue;
            }
            const int32_t ow = tw / p->stride_w;
            if (ow >= gy->w) {
                continue;
            }
            const int16_t *gp = gq + g * cout_g * oplane + oh * gy->w + ow;
            const int8_t *wp = w + (((g * cout_g) * cin_g + ci_l) * wd->h + kh) * wd->w + kw;
            const int32_t wstride = cin_g * wd->h * wd->w;
            int32_t part = 0; /* |g'| <= 2^14, |w| <= 127: exact for cout_g < 2^10 */
            for (int32_t co = 0; co < cout_g; co++) {
                part += (int32_t)gp[co * oplane] * wp[co * wstride];
                if ((co & 511) == 511) {
                    acc += part;
                    part = 0;
                }
            }
            acc += part;
        }
    }
    return acc;
}

/* The same sum without the int16 g' buffer: g' = rshift_round_even(g_y * wscale_q, 8) recomputed per term. */
static int64_t bwd_elem_direct(const tf_conv_bwd_params *p, const tf_dims *gy, const int8_t *g_y,
                               const int32_t *wscale_q, const tf_filter_dims *wd, const int8_t *w, int32_t ci,
                               int32_t ih, int32_t iw) {
    const int32_t cin_g = wd->c, cout_g = wd->n / p->groups, g = ci / cin_g, ci_l = ci % cin_g;
    const int32_t oplane = gy->h * gy->w, wstride = cin_g * wd->h * wd->w;
    int64_t acc = 0;
    for (int32_t kh = 0; kh < wd->h; kh++) {
        const int32_t th = ih + p->pad_h - kh;
        if (th < 0 || th % p->stride_h || th / p->stride_h >= gy->h) {
            continue;
        }
        for (int32_t kw = 0; kw < wd->w; kw++) {
            const int32_t tw = iw + p->pad_w - kw;
            if (tw < 0 || tw % p->stride_w || tw / p->stride_w >= gy->w) {
                continue;
            }
            const int32_t co0 = g * cout_g;
            const int8_t *gp = g_y + co0 * oplane + (th / p->stride_h) * gy->w + tw / p->stride_w;
            const int8_t *wp = w + ((co0 * cin_g + ci_l) * wd->h + kh) * wd->w + kw;
            int32_t part = 0;
            for (int32_t co = 0; co < cout_g; co++) {
                const int32_t gq = tf_rne_s32((int32_t)gp[co * oplane] * wscale_q[co0 + co], 8); /* |gq| <= 2^14 */
                part += gq * wp[co * wstride];
                if ((co & 511) == 511) {
                    acc += part;
                    part = 0;
                }
            }
            acc += part;
        }
    }
    return acc;
}

/* out[j] = sum_k g[k] * w[k * stride + j], j < nci <= 4, k < n (int32: n <= TF_BWD_CHUNK keeps it exact). */
__attribute__((noinline)) static void dot4_cols(const int16_t *g, const int8_t *w, int32_t stride, int32_t n,
                                                int32_t nci, int32_t *out) {
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, k = 0;
#if TF_USE_DSP
    if (nci == 4) {
        const int16_t *gend = g + (n & ~1);
        for (; g < gend; g += 2, w += 2 * stride) {
            uint32_t gp;
            __builtin_memcpy(&gp, g, 4); /* (g[k], g[k+1]) */
            const uint32_t va = tf_load_u32(w), vb = tf_load_u32(w + stride);
            const uint32_t ae = tf_sxtb16(va), be = tf_sxtb16(vb);
            a0 = tf_smlad(tf_pkhbt(ae, be), gp, a0);
            a2 = tf_smlad(tf_pkhtb(be, ae), gp, a2);
            const uint32_t ao = tf_sxtb16_ror8(va), bo = tf_sxtb16_ror8(vb);
            a1 = tf_smlad(tf_pkhbt(ao, bo), gp, a1);
            a3 = tf_smlad(tf_pkhtb(bo, ao), gp, a3);
        }
        k = n & ~1;
    }
#endif
    for (; k < n; k++, g++, w += stride) {
        const int32_t gv = *g;
        a0 += gv * w[0];
        a1 += nci > 1 ? gv * w[1] : 0;
        a2 += nci > 2 ? gv * w[2] : 0;
        a3 += nci > 3 ? gv * w[3] : 0;
    }
    out[0] = a0;
    out[1] = a1;
    out[2] = a2;
    out[3] = a3;
}

/* What one pass of the 1x1 / depthwise paths does with each acc: find max |acc| (TF_PASS_MAX), store
 * rshift_round_even(acc, sh) (TF_PASS_WRITE) or keep acc in int32 scratch and find the max (TF_PASS_KEEP). */
enum { TF_PASS_MAX, TF_PASS_WRITE, TF_PASS_KEEP };

static inline __attribute__((always_inline)) void visit(int64_t acc, int32_t i, int mode, int32_t sh, int8_t *g_x,
                                                        int32_t *acc32, uint64_t *mx) {
    if (mode == TF_PASS_WRITE) {
        g_x[i] = (int8_t)tf_rshift_round_even(acc, sh);
        return;
    }
    if (mode == TF_PASS_KEEP) {
        acc32[i] = (int32_t)acc; /* NOTE: meaningless if |acc| >= 2^31; the caller then runs TF_PASS_WRITE */
    }
    const uint64_t m = tf_abs64(acc);
    *mx = m > *mx ? m : *mx;
}

/* One pass of the 1x1 stride-1 case: acc[ci, p] = sum_co g'[co, p] w[co, ci_l] (see visit() for mode).
 * g' of one pixel is built on the stack per chunk of output channels. */
static uint64_t bwd_pointwise(const tf_conv_bwd_params *p, const int32_t *wscale_q, const tf_dims *gy,
                              const int8_t *g_y, const tf_filter_dims *wd, const int8_t *w, int8_t *g_x, int32_t *acc32,
                              int32_t sh, int mode) {
    int16_t gq[TF_BWD_CHUNK + 2];
    const int32_t cin_g = wd->c, cout_g = wd->n / p->groups, plane = gy->h * gy->w;
    uint64_t mx = 0;
    for (int32_t g = 0; g < p->groups; g++) {
        for (int32_t px = 0; px < plane; px++) {
            int64_t acc[4];
            for (int32_t ci = 0; ci < cin_g; ci += 4) {
                const int32_t nci = cin_g - ci < 4 ? cin_g - ci : 4;
                acc[0] = acc[1] = acc[2] = acc[3] = 0;
                for (int32_t c0 = 0; c0 < cout_g; c0 += TF_BWD_CHUNK) {
                    const int32_t nco = cout_g - c0 < TF_BWD_CHUNK ? cout_g - c0 : TF_BWD_CHUNK;
                    const int32_t cg = g * cout_g + c0;
                    if (ci == 0 || cout_g > TF_BWD_CHUNK) {
                        for (int32_t k = 0; k < nco; k++) {
                            gq[k] = (int16_t)tf_rne_s32((int32_t)g_y[(cg + k) * plane + px] * wscale_q[cg + k], 8);
                        }
                        gq[nco] = 0;
                    }
                    int32_t a[4];
                    dot4_cols(gq, w + (int32_t)cg * cin_g + ci, cin_g, nco, nci, a);
                    acc[0] += a[0];
                    acc[1] += a[1];
                    acc[2] += a[2];
                    acc[3] += a[3];
                }
                for (int32_t j = 0; j < nci; j++) {
                    visit(acc[j], (g * cin_g + ci + j) * plane + px, mode, sh, g_x, acc32, &mx);
                }
            }
        }
    }
    return mx;
}

/* Depthwise (one input and one output channel per group), any stride: g' of a channel goes to a stack plane
 * U[r][c] = g'[oh][ow] at r = oh*s_h - pad_h + KH-1, c = ow*s_w - pad_w + KW-1 and zero elsewhere (the zero
 * stuffing of a transposed conv), so acc[ih][iw] = sum_kh,kw U[ih + KH-1 - kh][iw + KW-1 - kw] w[kh][kw]
 * reads every tap without bounds checks or divisions. */
#define TF_BWD_DW_PLANE 400
static int dw_plane_fits(const tf_dims *gx, const tf_filter_dims *wd) {
    return (gx->h + wd->h - 1) * (gx->w + wd->w - 1) <= TF_BWD_DW_PLANE;
}

#if TF_USE_DSP
/* One channel of the 3x3 depthwise into the int32 sums d (ih_n, iw_n): two outputs per step from int16 pairs of
 * the plane rows, weights packed per kernel row r as (w[r][2], w[r][1]) and (w[r][1], w[r][0]). Returns
 * max(mx, a ^ (a >> 31)) over the sums, as tile4x2. */
static __attribute__((noinline)) uint32_t dw3_keep(const int16_t *u, int32_t pw, int32_t ih_n, int32_t iw_n,
                                                   const int8_t *wc, int32_t *d, uint32_t mx) {
    const uint32_t k0 = pair16(wc[2], wc[1]), l0 = pair16(wc[1], wc[0]);
    const uint32_t k1 = pair16(wc[5], wc[4]), l1 = pair16(wc[4], wc[3]);
    const uint32_t k2 = pair16(wc[8], wc[7]), l2 = pair16(wc[7], wc[6]);
    for (int32_t ih = 0; ih < ih_n; ih++) {
        const int16_t *b = u + (ih + 2) * pw + 2; /* U[ih + 2][iw + 2]: rows b, b - pw, b - 2pw take w rows 0, 1, 2 */
        const int32_t iw2 = iw_n & ~1;
        if (iw2) {
            const int16_t *b1 = b - pw, *b2 = b1 - pw, *const bend = b + iw2;
            int32_t o0, o1;
            uint32_t t;
            /* NOTE: 30 instructions per two outputs (C spilled the weights: 47); rows advance by post-increment */
            __asm__(
                "1:\n\t"
                "ldr %[t], [%[b0], #-4]\n\t"
                "smuad %[o0], %[t], %[k0]\n\t"
                "smultb %[o1], %[t], %[k0]\n\t"
                "ldr %[t], [%[b0]], #4\n\t"
                "smlabt %[o0], %[t], %[l0], %[o0]\n\t"
                "smlad %[o1], %[t], %[l0], %[o1]\n\t"
                "ldr %[t], [%[b1], #-4]\n\t"
                "smlad %[o0], %[t], %[k1], %[o0]\n\t"
                "smlatb %[o1], %[t], %[k1], %[o1]\n\t"
                "ldr %[t], [%[b1]], #4\n\t"
                "smlabt %[o0], %[t], %[l1], %[o0]\n\t"
                "smlad %[o1], %[t], %[l1], %[o1]\n\t"
                "ldr %[t], [%[b2], #-4]\n\t"
                "smlad %[o0], %[t], %[k2], %[o0]\n\t"
                "smlatb %[o1], %[t], %[k2], %[o1]\n\t"
                "ldr %[t], [%[b2]], #4\n\t"
                "smlabt %[o0], %[t], %[l2], %[o0]\n\t"
                "smlad %[o1], %[t], %[l2], %[o1]\n\t"
                "strd %[o0], %[o1], [%[d]], #8\n\t"
                "eor %[o0], %[o0], %[o0], asr #31\n\t"
                "cmp %[o0], %[mx]\n\t"
                "it hi\n\t"
                "movhi %[mx], %[o0]\n\t"
                "eor %[o1], %[o1], %[o1], asr #31\n\t"
                "cmp %[o1], %[mx]\n\t"
                "it hi\n\t"
                "movhi %[mx], %[o1]\n\t"
                "ldr %[t], %[bend]\n\t"
                "cmp %[b0], %[t]\n\t"
                "bne 1b"
                : [b0] "+r"(b), [b1] "+r"(b1), [b2] "+r"(b2), [d] "+r"(d), [mx] "+r"(mx), [o0] "=&r"(o0),
                  [o1] "=&r"(o1), [t] "=&r"(t)
                : [k0] "r"(k0), [l0] "r"(l0), [k1] "r"(k1), [l1] "r"(l1), [k2] "r"(k2), [l2] "r"(l2), [bend] "m"(bend)
                : "cc", "memory");
        }
        if (iw2 < iw_n) {
            const int16_t *b1 = b - pw, *b2 = b1 - pw;
            const int32_t o = b[0] * wc[0] + b[-1] * wc[1] + b[-2] * wc[2] + b1[0] * wc[3] + b1[-1] * wc[4] +
                              b1[-2] * wc[5] + b2[0] * wc[6] + b2[-1] * wc[7] + b2[-2] * wc[8];
            const uint32_t t = (uint32_t)(o ^ (o >> 31));
            *d++ = o;
            mx = t > mx ? t : mx;
        }
    }
    return mx;
}

/* Any KH x KW <= TF_DWK_MAX depthwise channel into the int32 sums d (ih_n, iw_n): each kernel row is a dot of
 * int16 pairs, U[r][iw + m] with w[kh][KW-1-m] (m < KW, padded to even with a zero weight). As dw3_keep. */
#define TF_DWK_MAX 8
static inline __attribute__((always_inline)) int32_t dwk_row(const int16_t *r, const uint32_t *wk, int32_t np,
                                                             int32_t acc) {
    uint32_t v0, v1, v2, v3;
    if (np == 4) {
        __builtin_memcpy(&v0, r, 4);
        __builtin_memcpy(&v1, r + 2, 4);
        __builtin_memcpy(&v2, r + 4, 4);
        __builtin_memcpy(&v3, r + 6, 4);
        acc = tf_smlad(v0, wk[0], acc);
        acc = tf_smlad(v1, wk[1], acc);
        acc = tf_smlad(v2, wk[2], acc);
        return tf_smlad(v3, wk[3], acc);
    }
    if (np == 3) {
        __builtin_memcpy(&v0, r, 4);
        __builtin_memcpy(&v1, r + 2, 4);
        __builtin_memcpy(&v2, r + 4, 4);
        acc = tf_smlad(v0, wk[0], acc);
        acc = tf_smlad(v1, wk[1], acc);
        return tf_smlad(v2, wk[2], acc);
    }
    for (int32_t j = 0; j < np; j++) {
        __builtin_memcpy(&v0, r + 2 * j, 4);
        acc = tf_smlad(v0, wk[j], acc);
    }
    return acc;
}

static __attribute__((noinline)) uint32_t dwk_keep(const int16_t *u, int32_t pw, int32_t kh_n, int32_t kw_n,
                                                   int32_t ih_n, int32_t iw_n, const int8_t *wc, int32_t *d,
                                                   uint32_t mx) {
    uint32_t wk[TF_DWK_MAX * TF_DWK_MAX / 2];
    const int32_t np = (kw_n + 1) / 2;
    for (int32_t kh = 0; kh < kh_n; kh++) {
        for (int32_t j = 0; j < np; j++) {
            const int8_t *wr = wc + kh * kw_n + kw_n - 1; /* w[kh][KW-1-m] = wr[-m] */
            wk[kh * np + j] = pair16(wr[-2 * j], 2 * j + 1 < kw_n ? wr[-2 * j - 1] : 0);
        }
    }
    for (int32_t ih = 0; ih < ih_n; ih++) {
        const int16_t *row0 = u + (ih + kh_n - 1) * pw; /* kernel row kh reads plane row ih + KH-1 - kh */
        for (int32_t iw = 0; iw < iw_n; iw++) {
            int32_t acc = 0;
            const int16_t *r = row0 + iw;
            for (int32_t kh = 0; kh < kh_n; kh++, r -= pw) {
                acc = dwk_row(r, wk + kh * np, np, acc);
            }
            const uint32_t t = (uint32_t)(acc ^ (acc >> 31));
            *d++ = acc;
            mx = t > mx ? t : mx;
        }
    }
    return mx;
}
#endif

/* Channels [c_lo, c_hi); in TF_PASS_KEEP mode channel c's sums go to acc32 + (c - c_lo) H W. */
static uint64_t bwd_depthwise(const tf_conv_bwd_params *p, const int32_t *wscale_q, const tf_dims *gy,
                              const int8_t *g_y, const tf_filter_dims *wd, const int8_t *w, const tf_dims *gx,
                              int8_t *g_x, int32_t *acc32, int32_t sh, int mode, int32_t c_lo, int32_t c_hi) {
    int16_t u[TF_BWD_DW_PLANE + 2]; /* + 2: the zero-weight pad tap of an odd K reads one past a row */
    const int32_t oh_n = gy->h, ow_n = gy->w, oplane = oh_n * ow_n, ih_n = gx->h, iw_n = gx->w;
    const int32_t kh_n = wd->h, kw_n = wd->w, ph = ih_n + kh_n - 1, pw = iw_n + kw_n - 1;
    const int32_t sh_ = p->stride_h, sw_ = p->stride_w;
    /* output rows / columns whose g' lands inside the plane (the others are never read) */
    const int32_t r0 = kh_n - 1 - p->pad_h, c0 = kw_n - 1 - p->pad_w;
    int32_t oh_lo = 0, ow_lo = 0, oh_hi = oh_n, ow_hi = ow_n;
    while (oh_lo < oh_n && r0 + oh_lo * sh_ < 0) {
        oh_lo++;
    }
    while (oh_hi > oh_lo && r0 + (oh_hi - 1) * sh_ >= ph) {
        oh_hi--;
    }
    while (ow_lo < ow_n && c0 + ow_lo * sw_ < 0) {
        ow_lo++;
    }
    while (ow_hi > ow_lo && c0 + (ow_hi - 1) * sw_ >= pw) {
        ow_hi--;
    }
    uint64_t mx = 0;
    for (int32_t i = 0; i < ph * pw + 2; i++) {
        u[i] = 0;
    }
    const int k33 = kh_n == 3 && kw_n == 3;
    for (int32_t c = c_lo; c < c_hi; c++) {
        int ih_skip = 0;
        const int8_t *gc = g_y + c * oplane;
        const int32_t q = wscale_q[c];
        for (int32_t oh = oh_lo; oh < oh_hi; oh++) {
            const int32_t row = (r0 + oh * sh_) * pw + c0;
            const int8_t *grow = gc + oh * ow_n;
            for (int32_t ow = ow_lo; ow < ow_hi; ow++) {
                u[row + ow * sw_] = (int16_t)tf_rne_s32((int32_t)grow[ow] * q, 8);
            }
        }
        const int8_t *wc = w + c * kh_n * kw_n;
        const int32_t w0 = k33 ? wc[0] : 0, w1 = k33 ? wc[1] : 0, w2 = k33 ? wc[2] : 0;
        const int32_t w3 = k33 ? wc[3] : 0, w4 = k33 ? wc[4] : 0, w5 = k33 ? wc[5] : 0;
        const int32_t w6 = k33 ? wc[6] : 0, w7 = k33 ? wc[7] : 0, w8 = k33 ? wc[8] : 0;
        int32_t i = 0; /* element of this channel */
        int8_t *gxc = mode == TF_PASS_KEEP ? g_x : g_x + c * ih_n * iw_n;
        int32_t *accc = mode == TF_PASS_KEEP ? acc32 + (c - c_lo) * ih_n * iw_n : acc32;
#if TF_USE_DSP
        if (k33 && mode == TF_PASS_KEEP) {
            mx = dw3_keep(u, pw, ih_n, iw_n, wc, accc, (uint32_t)mx);
            ih_skip = 1;
        } else if (mode == TF_PASS_KEEP && kh_n <= TF_DWK_MAX && kw_n <= TF_DWK_MAX) {
            mx = dwk_keep(u, pw, kh_n, kw_n, ih_n, iw_n, wc, accc, (uint32_t)mx);
            ih_skip = 1;
        }
#endif
        for (int32_t ih = ih_skip ? ih_n : 0; ih < ih_n; ih++) {
            const int16_t *b0 = u + (ih + kh_n - 1) * pw + kw_n - 1; /* U[ih + KH-1][iw + KW-1] at iw = 0 */
            for (int32_t iw = 0; iw < iw_n; iw++, i++, b0++) {
                int32_t acc = 0; /* at most K*K terms of 2^14 * 127 */
                if (k33) {
                    const int16_t *b1 = b0 - pw, *b2 = b1 - pw;
                    acc = b0[0] * w0 + b0[-1] * w1 + b0[-2] * w2 + b1[0] * w3 + b1[-1] * w4 + b1[-2] * w5 + b2[0] * w6 +
                          b2[-1] * w7 + b2[-2] * w8;
                } else {
                    for (int32_t kh = 0; kh < kh_n; kh++) {
                        for (int32_t kw = 0; kw < kw_n; kw++) {
                            acc += b0[-kh * pw - kw] * wc[kh * kw_n + kw];
                        }
                    }
                }
                visit(acc, i, mode, sh, gxc, accc, &mx);
            }
        }
        if (sh_ > 1 || sw_ > 1) { /* NOTE: clear what this channel placed; the zeros between stay zero */
            for (int32_t oh = oh_lo; oh < oh_hi; oh++) {
                const int32_t row = (r0 + oh * sh_) * pw + c0;
                for (int32_t ow = ow_lo; ow < ow_hi; ow++) {
                    u[row + ow * sw_] = 0;
                }
            }
        }
    }
    return mx;
}

#if TF_USE_DSP
/* The co-pair loop of mac4x2 (operands as there), four pairs per turn: 47 instructions per 64 MACs. The loop end
 * is read from the stack so that the w words come in pairs (ldrd) with 14 registers. */
#define TF_MAC4X2_STEP                                                                                                 \
    "ldrd %[g0], %[g1], [%[gp]], #8\n\t"                                                                               \
    "ldrd %[t0], %[t1], [%[wp]], #8\n\t"                                                                               \
    "smlad %[a0], %[t0], %[g0], %[a0]\n\t"                                                                             \
    "smlad %[a1], %[t0], %[g1], %[a1]\n\t"                                                                             \
    "smlad %[a2], %[t1], %[g0], %[a2]\n\t"                                                                             \
    "smlad %[a3], %[t1], %[g1], %[a3]\n\t"                                                                             \
    "ldrd %[t0], %[t1], [%[wp]], #8\n\t"                                                                               \
    "smlad %[a4], %[t0], %[g0], %[a4]\n\t"                                                                             \
    "smlad %[a5], %[t0], %[g1], %[a5]\n\t"                                                                             \
    "smlad %[a6], %[t1], %[g0], %[a6]\n\t"                                                                             \
    "smlad %[a7], %[t1], %[g1], %[a7]\n\t"
#define TF_MAC4X2_LOOP                                                                                                 \
    "1:\n\t" TF_MAC4X2_STEP TF_MAC4X2_STEP TF_MAC4X2_STEP TF_MAC4X2_STEP                                               \
    "ldr %[t0], %[gend]\n\tcmp %[gp], %[t0]\n\tbne 1b"
#define TF_MAC4X2_OPERANDS                                                                                             \
    : [a0] "+r"(a0), [a1] "+r"(a1), [a2] "+r"(a2), [a3] "+r"(a3), [a4] "+r"(a4), [a5] "+r"(a5), [a6] "+r"(a6),       \
      [a7] "+r"(a7), [wp] "+r"(wp), [gp] "+r"(gp), [t0] "=&r"(t0), [t1] "=&r"(t1), [g0] "=&r"(g0), [g1] "=&r"(g1)     \
    : [gend] "m"(gend)                                                                                               \
    : "cc", "memory"
#endif

#if TF_USE_DSP
/* mac4x2 for 4 channels x 2 pixels that all exist: stores the sums at d[j * plane + s] (d 4-byte aligned) and
 * returns max(mx, max_j t_j), t = a ^ (a >> 31) (|a|, or |a| - 1 for a < 0: see bwd_pointwise_gemm). */
static inline __attribute__((always_inline)) uint32_t tile4x2(const uint32_t *wp, const uint32_t *gp, int32_t ncp,
                                                              int32_t *d, int32_t plane, uint32_t mx) {
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    const uint32_t *gend = gp + 2 * ncp;
    uint32_t t0, t1, g0, g1;
    __asm__(TF_MAC4X2_LOOP TF_MAC4X2_OPERANDS);
    /* NOTE: 39 instructions for the 8 stores and the max, where C keeps a[] on the stack */
    __asm__("strd %[a0], %[a1], [%[d]]\n\t"
            "add %[d], %[d], %[st]\n\t"
            "strd %[a2], %[a3], [%[d]]\n\t"
            "add %[d], %[d], %[st]\n\t"
            "strd %[a4], %[a5], [%[d]]\n\t"
            "add %[d], %[d], %[st]\n\t"
            "strd %[a6], %[a7], [%[d]]\n\t"
#define TF_TMAX(r) "eor " r ", " r ", " r ", asr #31\n\tcmp " r ", %[mx]\n\tit hi\n\tmovhi %[mx], " r "\n\t"
            TF_TMAX("%[a0]") TF_TMAX("%[a1]") TF_TMAX("%[a2]") TF_TMAX("%[a3]") TF_TMAX("%[a4]") TF_TMAX("%[a5]")
                TF_TMAX("%[a6]") TF_TMAX("%[a7]")
#undef TF_TMAX
            : [a0] "+r"(a0), [a1] "+r"(a1), [a2] "+r"(a2), [a3] "+r"(a3), [a4] "+r"(a4), [a5] "+r"(a5), [a6] "+r"(a6),
              [a7] "+r"(a7), [d] "+r"(d), [mx] "+r"(mx)
            : [st] "r"(plane * 4)
            : "cc", "memory");
    return mx;
}
#endif

/* a[2j + s] = sum_k wp[4k + j] . gp[2k + s] (dot of int16 pairs), k < ncp, ncp a multiple of 4; wp (ncp, 4),
 * gp (ncp, 2) words. */
static inline __attribute__((always_inline)) void mac4x2(const uint32_t *wp, const uint32_t *gp, int32_t ncp,
                                                         int32_t *a) {
#if TF_USE_DSP
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    const uint32_t *gend = gp + 2 * ncp;
    uint32_t t0, t1, g0, g1;
    /* NOTE: in C the compiler spills some of the 14 live registers. */
    __asm__(TF_MAC4X2_LOOP TF_MAC4X2_OPERANDS);
    a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3, a[4] = a4, a[5] = a5, a[6] = a6, a[7] = a7;
#else
    for (int32_t j = 0; j < 8; j++) {
        a[j] = 0;
    }
    for (int32_t k = 0; k < ncp; k++, wp += 4, gp += 2) {
        for (int32_t j = 0; j < 4; j++) {
            const int32_t wl = (int16_t)(wp[j] & 0xFFFFu), wh = (int16_t)(wp[j] >> 16);
            a[2 * j] += wl * (int16_t)(gp[0] & 0xFFFFu) + wh * (int16_t)(gp[0] >> 16);
            a[2 * j + 1] += wl * (int16_t)(gp[1] & 0xFFFFu) + wh * (int16_t)(gp[1] >> 16);
        }
    }
#endif
}

/* (g'(ya, qa), g'(yb, qb)) as an int16 pair, g'(y, q) = rshift_round_even(y * q, 8). */
static inline uint32_t gq_pair(int32_t ya, int32_t qa, int32_t yb, int32_t qb) {
    return pair16(tf_rne_s32(ya * qa, 8), tf_rne_s32(yb * qb, 8));
}

/* The 1x1 stride-1 case as a GEMM into the int32 sums: acc[ci, p] = sum_co w[co, ci] g'[co, p], 4 input channels
 * x 2 pixels per inner loop, both operands packed as int16 pairs of consecutive co behind the sums (scratch of
 * 4 * C_in * P + pw_gemm_bytes; C_out per group <= TF_PW_GEMM_MAX_COUT). Returns M: max |acc| is M or M + 1
 * (the DSP tiles track a ^ (a >> 31), one instruction cheaper than |a|; the caller settles which). */
/* Pixels [px0, px0 + npx) only (the chunked path): the sums of input channel c at acc32 + c npx, the packed
 * operands (pw_gemm_bytes(C_out per group, npx)) after all C_in x npx sums. */
static uint32_t bwd_pointwise_gemm(const tf_conv_bwd_params *p, const int32_t *wscale_q, const tf_dims *gy,
                                   const int8_t *g_y, const tf_filter_dims *wd, const int8_t *w, int32_t *acc32,
                                   int32_t px0, int32_t npx) {
    const int32_t cin_g = wd->c, cout_g = wd->n / p->groups, plane = gy->h * gy->w;
    const int32_t ncp = (cout_g + 7) / 8 * 4, npp = (npx + 1) / 2; /* as pw_gemm_bytes */
    uint32_t *gq = (uint32_t *)(acc32 + cin_g * p->groups * npx);  /* (npp, ncp, 2) */
    uint32_t *wpk = gq + npp * ncp * 2;                            /* (ncp, 4) */
    uint32_t mx = 0;
    for (int32_t g = 0; g < p->groups; g++) {
        const int32_t cg = g * cout_g;
        for (int32_t k = 0; k < ncp; k++) { /* g' of co = cg + 2k (lo) and + 2k + 1 (hi), 0 past the group */
            const int has0 = 2 * k < cout_g, has1 = 2 * k + 1 < cout_g;
            const int8_t *y0 = g_y + (cg + (has0 ? 2 * k : 0)) * plane + px0, *y1 = has1 ? y0 + plane : y0;
            const int32_t q0 = has0 ? wscale_q[cg + 2 * k] : 0, q1 = has1 ? wscale_q[cg + 2 * k + 1] : 0;
            uint32_t *dst = gq + 2 * k;
            int32_t px = 0;
            for (; px + 2 <= npx; px += 2, dst += 2 * ncp) {
                dst[0] = gq_pair(y0[px], q0, y1[px], q1);
                dst[1] = gq_pair(y0[px + 1], q0, y1[px + 1], q1);
            }
            if (px < npx) {
                dst[0] = gq_pair(y0[px], q0, y1[px], q1);
                dst[1] = 0;
            }
        }
        for (int32_t ci = 0; ci < cin_g; ci += 4) {
            const int32_t nci = cin_g - ci < 4 ? cin_g - ci : 4;
            for (int32_t k = 0; k < ncp; k++) { /* (w[co][ci + j], w[co + 1][ci + j]) at wpk[4k + j] */
                const int8_t *w0 = w + (cg + 2 * k) * cin_g + ci, *w1 = w0 + cin_g;
                const int has0 = 2 * k < cout_g, has1 = 2 * k + 1 < cout_g;
#if TF_USE_DSP
                if (nci == 4 && has1) {
                    const uint32_t va = tf_load_u32(w0), vb = tf_load_u32(w1);
                    const uint32_t ae = tf_sxtb16(va), be = tf_sxtb16(vb);
                    const uint32_t ao = tf_sxtb16_ror8(va), bo = tf_sxtb16_ror8(vb);
                    wpk[4 * k] = tf_pkhbt(ae, be);
                    wpk[4 * k + 1] = tf_pkhbt(ao, bo);
                    wpk[4 * k + 2] = tf_pkhtb(be, ae);
                    wpk[4 * k + 3] = tf_pkhtb(bo, ao);
                    continue;
                }
#endif
                for (int32_t j = 0; j < 4; j++) {
                    wpk[4 * k + j] = j < nci && has0 ? pair16(w0[j], has1 ? w1[j] : 0) : 0;
                }
            }
            int32_t *dst = acc32 + (g * cin_g + ci) * npx;
            for (int32_t pp = 0; pp < npp; pp++) {
#if TF_USE_DSP
                if (nci == 4 && 2 * pp + 1 < npx) {
                    mx = tile4x2(wpk, gq + pp * ncp * 2, ncp, dst + 2 * pp, npx, mx);
                    continue;
                }
#endif
                int32_t a[8];
                mac4x2(wpk, gq + pp * ncp * 2, ncp, a);
                for (int32_t s = 0; s < 2 && 2 * pp + s < npx; s++) {
                    for (int32_t j = 0; j < nci; j++) {
                        const int32_t v = a[2 * j + s];
                        const uint32_t m = v < 0 ? 0u - (uint32_t)v : (uint32_t)v;
                        dst[j * npx + 2 * pp + s] = v;
                        mx = m > mx ? m : mx;
                    }
                }
            }
        }
    }
    return mx;
}

/* g_x[i] = rshift_round_even(acc[i], sh), |acc| < 2^31 (tf_rne_s32 does not overflow). */
static void requant_out(const int32_t *acc, int8_t *g_x, int32_t n, int32_t sh) {
    if (sh == 0) {
        for (int32_t i = 0; i < n; i++) {
            g_x[i] = (int8_t)acc[i];
        }
        return;
    }
    if (sh <= 24) {
        /* NOTE: rne(a, sh) = floor((a + 2^(sh-1) - 1 + ((a >> sh) & 1)) / 2^sh); in 32 bits the sum can wrap (by
         * 2^32), which moves the quotient by 2^(32 - sh), a multiple of 256 for sh <= 24: the same int8. */
        const uint32_t k = (1u << (sh - 1)) - 1u;
        for (int32_t i = 0; i < n; i++) {
            const int32_t a = acc[i];
            g_x[i] = (int8_t)((int32_t)((uint32_t)a + k + (uint32_t)((a >> sh) & 1)) >> sh);
        }
        return;
    }
    for (int32_t i = 0; i < n; i++) {
        g_x[i] = (int8_t)tf_rne_s32(acc[i], sh);
    }
}

/* The exact max |a| of sums a[0..n) whose tracked max is M (the DSP paths track a ^ (a >> 31), so max |a| is M
 * or M + 1: rarely the shift differs, then a sum of -(M + 1) settles it; the exact paths never have one). */
static uint64_t settle_max(const int32_t *a, int32_t n, uint64_t mx) {
    if (mx < ((uint64_t)1 << 31) && tf_dyn_shift(mx + 1) != tf_dyn_shift(mx)) {
        for (int32_t i = 0; i < n; i++) {
            if ((int64_t)a[i] == -(int64_t)(mx + 1)) {
                return mx + 1;
            }
        }
    }
    return mx;
}

/* The chunked 1x1 / depthwise path, for scratch smaller than every g_x element's int32 sum: units (1x1: npx
 * pixels of every input channel, by the GEMM; depthwise: one channel) are computed into an int32 slot, units
 * 0..K-1 keep theirs, the others are computed again once the shift is known (two passes for those only). When
 * not every unit's int32 sums fit, the kept ones are stored in half the bytes (pack16), exactly enough for the
 * final rounding. */
typedef struct {
    int pw;               /* 1x1 (pixel chunks) or depthwise (channels) */
    int32_t n_units, npx; /* npx: pixels of a 1x1 unit (the last one may have fewer) */
    int32_t unit, extra;  /* int32 words of a unit's sums; bytes after the working unit (the GEMM's operands) */
    int32_t kept;         /* K */
    int half;             /* 0: unit u's int32 sums stay in slot u; 1: one int32 slot, kept units packed behind it */
} bwd_chunks;

/* NOTE: the packed form of a unit's sums a (exact max |a| = m < 2^31): s = max(0, bitlen(m) - 14) and
 * v = 2 (a >> s) + (a mod 2^s != 0), one int16 each. The shift of the whole op is sh = dyn_shift(M) >= bitlen(M) - 7
 * >= s + 7 with M >= m, so s > 0 implies sh > s, and then a' = (v >> 1) 2^s + (v & 1) rounds exactly as a does:
 * rshift_round_even(a, sh) depends only on a >> sh, on the bits below sh compared with 2^(sh-1) (a' keeps the
 * bits down to s and a nonzero rest as a 1) and on parity. s = 0 keeps a itself. Returns s. */
static int32_t pack16(const int32_t *a, int32_t n, uint64_t m, int16_t *v) {
    int32_t bl = 0;
    while (bl < 31 && (m >> bl) != 0) {
        bl++;
    }
    const int32_t s = bl > 14 ? bl - 14 : 0;
    const int32_t low = (int32_t)((1u << s) - 1u);
    for (int32_t i = 0; i < n; i++) {
        v[i] = (int16_t)((a[i] >> s) * 2 + ((a[i] & low) != 0));
    }
    return s;
}

static void unpack16(const int16_t *v, int32_t n, int32_t s, int32_t *a) {
    for (int32_t i = 0; i < n; i++) {
        a[i] = (v[i] >> 1) * (1 << s) + (v[i] & 1);
    }
}

/* The largest units that leave room for K >= 1 kept ones where possible; 0 when not even one unit fits. */
static int chunks_of(bwd_chunks *c, int pw, int32_t cout_g, const tf_dims *gx, int32_t size) {
    const int32_t plane = gx->h * gx->w, ncp = (cout_g + 7) / 8 * 4;
    c->pw = pw;
    if (pw) { /* a unit of npx (even) pixels: 4 C_in npx bytes of sums + pw_gemm_bytes(cout_g, npx) */
        const int32_t per_px = 4 * gx->c + 4 * ncp, fixed = 16 * ncp;
        int32_t npx = 0;
        for (int32_t part = 16; part >= 1 && npx < 16; part /= 4) { /* small units keep more, down to 16 px */
            npx = size / part > fixed ? (size / part - fixed) / per_px : 0;
        }
        npx &= ~1;
        if (npx < 2) {
            return 0;
        }
        c->npx = npx < plane ? npx : plane;
        c->n_units = (plane + c->npx - 1) / c->npx;
        c->unit = gx->c * c->npx;
        c->extra = pw_gemm_bytes(cout_g, c->npx);
    } else {
        c->npx = plane, c->n_units = gx->c, c->unit = plane, c->extra = 0;
    }
    const int32_t slots = (size - c->extra) / (4 * c->unit), work = 4 * c->unit + c->extra; /* slots: + working */
    if (slots < 1) {
        return 0;
    }
    c->half = slots - 1 < c->n_units;
    c->kept = c->half ? (size - work) / (2 * c->unit + 1) : c->n_units; /* + 1: the unit's s */
    c->kept = c->kept < c->n_units ? c->kept : c->n_units;
    return 1;
}

/* Pixels of unit u (1x1; the last unit may have fewer than npx). */
static int32_t unit_px(const bwd_chunks *c, const tf_dims *gx, int32_t u) {
    const int32_t left = gx->h * gx->w - u * c->npx;
    return left < c->npx ? left : c->npx;
}

/* Unit u's int32 sums into d (1x1: (C_in, unit_px) at pixel u npx); returns their exact max |sum|. */
static uint64_t chunk_unit(const bwd_chunks *c, int32_t u, const tf_conv_bwd_params *p, const int32_t *wscale_q,
                           const tf_dims *gy, const int8_t *g_y, const tf_filter_dims *wd, const int8_t *w,
                           const tf_dims *gx, int8_t *g_x, int32_t *d) {
    if (c->pw) {
        const int32_t npx = unit_px(c, gx, u);
        return settle_max(d, gx->c * npx, bwd_pointwise_gemm(p, wscale_q, gy, g_y, wd, w, d, u * c->npx, npx));
    }
    return settle_max(d, c->unit, bwd_depthwise(p, wscale_q, gy, g_y, wd, w, gx, g_x, d, 0, TF_PASS_KEEP, u, u + 1));
}

/* g_x of unit u from its sums d. */
static void chunk_write(const bwd_chunks *c, int32_t u, const tf_dims *gx, const int32_t *d, int8_t *g_x, int32_t sh) {
    if (!c->pw) {
        requant_out(d, g_x + u * c->unit, c->unit, sh);
        return;
    }
    const int32_t plane = gx->h * gx->w, npx = unit_px(c, gx, u);
    for (int32_t ci = 0; ci < gx->c; ci++) {
        requant_out(d + ci * npx, g_x + ci * plane + u * c->npx, npx, sh);
    }
}

/* The whole chunked path; returns the shift, or -1 when a sum reached 2^31 (the caller runs the exact passes). */
static int32_t bwd_chunked(const bwd_chunks *c, const tf_conv_bwd_params *p, const int32_t *wscale_q, const tf_dims *gy,
                           const int8_t *g_y, const tf_filter_dims *wd, const int8_t *w, const tf_dims *gx, int8_t *g_x,
                           int32_t *buf) {
    int16_t *k16 = c->half ? (int16_t *)(buf + c->unit) + c->extra / 2 : NULL; /* behind the slot and operands */
    uint8_t *ks = c->half ? (uint8_t *)(k16 + c->kept * c->unit) : NULL;
    uint64_t mx = 0;
    for (int32_t u = 0; u < c->n_units; u++) {
        int32_t *d = c->half ? buf : buf + (u < c->kept ? u : c->kept) * c->unit;
        const uint64_t m = chunk_unit(c, u, p, wscale_q, gy, g_y, wd, w, gx, g_x, d);
        mx = m > mx ? m : mx;
        if (c->half && u < c->kept) {
            ks[u] = (uint8_t)pack16(d, c->pw ? gx->c * unit_px(c, gx, u) : c->unit, m, k16 + u * c->unit);
        }
    }
    if (mx >= ((uint64_t)1 << 31)) {
        return -1;
    }
    const int32_t sh = tf_dyn_shift(mx);
    for (int32_t u = 0; u < c->n_units; u++) {
        int32_t *d = c->half ? buf : buf + (u < c->kept ? u : c->kept) * c->unit;
        if (u >= c->kept) {
            (void)chunk_unit(c, u, p, wscale_q, gy, g_y, wd, w, gx, g_x, d);
        } else if (c->half) {
            unpack16(k16 + u * c->unit, c->pw ? gx->c * unit_px(c, gx, u) : c->unit, ks[u], d);
        }
        chunk_write(c, u, gx, d, g_x, sh);
    }
    return sh;
}

int32_t tf_conv2d_bwd_input_fast_buffer_size(const tf_conv_bwd_params *p, const tf_filter_dims *w_dims,
                                             const tf_dims *gx_dims) {
    const int unit = p->stride_h == 1 && p->stride_w == 1;
    const int pw = unit && w_dims->h == 1 && w_dims->w == 1 && p->pad_h == 0 && p->pad_w == 0;
    const int dw = w_dims->c == 1 && w_dims->n == p->groups && dw_plane_fits(gx_dims, w_dims);
    const int32_t n4 = gx_dims->c * gx_dims->h * gx_dims->w * 4;
    if (pw && w_dims->n / p->groups <= TF_PW_GEMM_MAX_COUT) {
        return n4 + pw_gemm_bytes(w_dims->n / p->groups, gx_dims->h * gx_dims->w);
    }
    return pw || dw ? n4 : -1;
}

tf_status tf_conv2d_bwd_input_s8(const tf_ctx *ctx, const tf_conv_bwd_params *p, const int32_t *wscale_q,
                                 const tf_dims *gy_dims, const int8_t *g_y, int32_t e_y, const tf_filter_dims *w_dims,
                                 const int8_t *w, const tf_dims *gx_dims, int8_t *g_x, int32_t *e_x) {
    if (!ctx || !p || !wscale_q || !g_y || !w || !g_x || !e_x) {
        return TF_ERR_ARG;
    }
    tf_status st = tf_conv_check(gx_dims, w_dims, gy_dims, p->groups, p->stride_h, p->stride_w, p->pad_h, p->pad_w);
    if (st != TF_OK) {
        return st;
    }
    for (int32_t co = 0; co < gy_dims->c; co++) {
        if (wscale_q[co] < 0 || wscale_q[co] > 32768) {
            return TF_ERR_ARG;
        }
    }
    const int unit = p->stride_h == 1 && p->stride_w == 1;
    const int pw = unit && w_dims->h == 1 && w_dims->w == 1 && p->pad_h == 0 && p->pad_w == 0;
    const int dw = w_dims->c == 1 && w_dims->n == p->groups && dw_plane_fits(gx_dims, w_dims);
    if (pw || dw) {
        /* NOTE: with int32 scratch for g_x one pass keeps every acc; without, two passes (max, then write).
         * Same numbers either way. */
        const int32_t n = gx_dims->c * gx_dims->h * gx_dims->w;
        int32_t *acc32 = ctx->buf && ctx->size >= 4 * n && ((uintptr_t)ctx->buf & 3) == 0 ? (int32_t *)ctx->buf : NULL;
        const int32_t cout_g = w_dims->n / p->groups;
        const int gemm = pw && acc32 && cout_g <= TF_PW_GEMM_MAX_COUT &&
                         ctx->size >= 4 * n + pw_gemm_bytes(cout_g, gy_dims->h * gy_dims->w);
        bwd_chunks ch;
        if (!gemm && (pw ? cout_g <= TF_PW_GEMM_MAX_COUT : !acc32) && ctx->buf && ((uintptr_t)ctx->buf & 3) == 0 &&
            chunks_of(&ch, pw, cout_g, gx_dims, ctx->size)) { /* NOTE: scratch for some sums, not all */
            const int32_t sh =
                bwd_chunked(&ch, p, wscale_q, gy_dims, g_y, w_dims, w, gx_dims, g_x, (int32_t *)ctx->buf);
            if (sh >= 0) {
                *e_x = e_y + p->wscale_p - 7 + sh;
                return TF_OK;
            }
            acc32 = NULL;
        }
        const int mode = acc32 ? TF_PASS_KEEP : TF_PASS_MAX;
        uint64_t mx =
            gemm ? bwd_pointwise_gemm(p, wscale_q, gy_dims, g_y, w_dims, w, acc32, 0, gy_dims->h * gy_dims->w)
            : pw ? bwd_pointwise(p, wscale_q, gy_dims, g_y, w_dims, w, g_x, acc32, 0, mode)
                 : bwd_depthwise(p, wscale_q, gy_dims, g_y, w_dims, w, gx_dims, g_x, acc32, 0, mode, 0, gx_dims->c);
        if (acc32) {
            mx = settle_max(acc32, n, mx);
        }
        const int32_t shf = tf_dyn_shift(mx);
        if (acc32 && mx < ((uint64_t)1 << 31)) {
            requant_out(acc32, g_x, n, shf); /* shf <= 25 here */
        } else if (pw) {
            bwd_pointwise(p, wscale_q, gy_dims, g_y, w_dims, w, g_x, NULL, shf, TF_PASS_WRITE);
        } else {
            bwd_depthwise(p, wscale_q, gy_dims, g_y, w_dims, w, gx_dims, g_x, NULL, shf, TF_PASS_WRITE, 0, gx_dims->c);
        }
        *e_x = e_y + p->wscale_p - 7 + shf;
        return TF_OK;
    }
    const int32_t need2 = tf_conv2d_bwd_input_get_buffer_size(gy_dims, gx_dims, 0);
    const int32_t need1 = tf_conv2d_bwd_input_get_buffer_size(gy_dims, gx_dims, 1);
    /* NOTE: without scratch (the plan's memory model: docs/engine.md allows either) g' is recomputed per term
     * and the sums twice (max, then write): same numbers, no buffer. */
    const int direct = ctx->size < need2 || !ctx->buf;
    int16_t *gq = direct ? NULL : (int16_t *)ctx->buf;
    int32_t *acc32 = !direct && ctx->size >= need1 ? (int32_t *)((uint8_t *)ctx->buf + need2) : NULL;
    const int32_t oplane = gy_dims->h * gy_dims->w;
    for (int32_t co = 0; co < gy_dims->c; co++) {
        if (wscale_q[co] < 0 || wscale_q[co] > 32768) {
            return TF_ERR_ARG;
        }
        for (int32_t i = 0; gq && i < oplane; i++) {
            gq[co * oplane + i] = (int16_t)tf_rshift_round_even((int64_t)g_y[co * oplane + i] * wscale_q[co], 8);
        }
    }
#define BWD_ELEM(i)                                                                                                    \
    (direct ? bwd_elem_direct(p, gy_dims, g_y, wscale_q, w_dims, w, (i) / iplane, ((i) % iplane) / gx_dims->w,         \
                              (i) % gx_dims->w)                                                                        \
            : bwd_elem(p, gy_dims, gq, w_dims, w, (i) / iplane, ((i) % iplane) / gx_dims->w, (i) % gx_dims->w))
    const int32_t iplane = gx_dims->h * gx_dims->w, n = gx_dims->c * iplane;
    uint64_t mx = 0;
    int fits = acc32 != NULL;
    for (int32_t i = 0; i < n; i++) {
        int64_t a = BWD_ELEM(i);
        uint64_t m = tf_abs64(a);
        mx = m > mx ? m : mx;
        if (fits) {
            if (m >= ((uint64_t)1 << 31)) {
                fits = 0; /* NOTE: the rare int32 overflow falls back to recomputing: still bit-exact */
            } else {
                acc32[i] = (int32_t)a;
            }
        }
    }
    const int32_t sh = tf_dyn_shift(mx);
    for (int32_t i = 0; i < n; i++) {
        int64_t a = fits ? acc32[i] : BWD_ELEM(i);
        g_x[i] = (int8_t)tf_rshift_round_even(a, sh);
    }
#undef BWD_ELEM
    *e_x = e_y + p->wscale_p - 7 + sh;
    return TF_OK;
}
