/* CONV2D forward of the first conv (3x3, groups 1, C_in <= 4, no mask; called by tf_conv2d_s8.c): one int16
 * window patch per output pixel, dotted with every output channel's packed weights (2 pixels x 2 channels per
 * __SMLAD step), requantized by the one fast form (rqf_t). Other shapes are not its case (it returns 0). */
#include "tf_conv_rq.h"
#include "tf_dsp.h"

#define TF_PATCH_CIN 4                           /* most input channels */
#define TF_PATCH_NP ((9 * TF_PATCH_CIN + 1) / 2) /* int16 pairs of a TF_PATCH_CIN x 3 x 3 window */
#define TF_PATCH_CO 8 /* output channels per pass over x (packed weights on the stack: 8 x 18 words) */

/* Slot of tap (ci, kh, kw) among a window's int16 values, in the order sxtb16 delivers them: per channel
 * (x0, x2) of rows 0, 1, 2 and (x1 of row 0, x1 of row 1); then x1 of row 2 of every channel; a zero pads the
 * odd last pair. */
static inline int32_t patch_slot(int32_t cin, int32_t ci, int32_t kh, int32_t kw) {
    if (kw != 1) {
        return ci * 8 + kh * 2 + (kw >> 1);
    }
    return kh < 2 ? ci * 8 + 6 + kh : cin * 8 + ci;
}

/* acc + a.lo b.lo + a.hi b.hi (int16 halves) */
static inline int32_t dot2(uint32_t a, uint32_t b, int32_t acc) {
#if TF_USE_DSP
    return tf_smlad(a, b, acc);
#else
    return acc + (int16_t)(a & 0xFFFFu) * (int16_t)(b & 0xFFFFu) + (int16_t)(a >> 16) * (int16_t)(b >> 16);
#endif
}

/* Window (ci, ih0..ih0+2, iw0..iw0+2) of x as int16 pairs in patch_slot order, pair j at pp[2 j] (two windows
 * interleave); taps over the padding are zx. */
static __attribute__((noinline)) void patch_slow(uint32_t *pp, const int8_t *xg, int32_t cin, int32_t ih_n,
                                                 int32_t iw_n, int32_t ih0, int32_t iw0, int32_t off) {
    int16_t t[2 * TF_PATCH_NP];
    const int32_t np = (9 * cin + 1) / 2;
    t[2 * np - 1] = 0;
    for (int32_t ci = 0; ci < cin; ci++) {
        for (int32_t kh = 0; kh < 3; kh++) {
            for (int32_t kw = 0; kw < 3; kw++) {
                const int32_t ih = ih0 + kh, iw = iw0 + kw;
                const int in = ih >= 0 && ih < ih_n && iw >= 0 && iw < iw_n;
                t[patch_slot(cin, ci, kh, kw)] = (int16_t)(in ? xg[(ci * ih_n + ih) * iw_n + iw] : -off);
            }
        }
    }
    for (int32_t j = 0; j < np; j++) {
        pp[2 * j] = TF_PACK16(t[2 * j], t[2 * j + 1]);
    }
}

#if TF_USE_DSP
/* The same for a window inside x with one readable byte after each row (iw0 + 4 <= iw_n): a word per row. */
static TF_AI void patch_fast(uint32_t *pp, const int8_t *xw, int32_t cin, int32_t plane, int32_t iw_n) {
    uint32_t *left = pp + 8 * cin, pend = 0;
    for (int32_t ci = 0; ci < cin; ci++, xw += plane) {
        const uint32_t v0 = tf_load_u32(xw), v1 = tf_load_u32(xw + iw_n), v2 = tf_load_u32(xw + 2 * iw_n);
        pp[8 * ci] = tf_sxtb16(v0);
        pp[8 * ci + 2] = tf_sxtb16(v1);
        pp[8 * ci + 4] = tf_sxtb16(v2);
        pp[8 * ci + 6] = tf_pkhbt(tf_sxtb16_ror8(v0), tf_sxtb16_ror8(v1));
        const uint32_t o2 = tf_sxtb16_ror8(v2);
        if (ci & 1) {
            left[2 * (ci >> 1)] = tf_pkhbt(pend, o2);
        } else {
            pend = o2;
        }
    }
    if (cin & 1) {
        left[2 * (cin >> 1)] = pend & 0xFFFFu;
    }
}
#endif

/* Output channels [co0, co0 + nco) (nco even: a zero-weight channel pads an odd count, never written) over
 * every window, two neighbouring windows x two channels per step: each window's patch is built once and dotted
 * with every channel's packed weights (wt: (nco / 2, np, 2) int16 pairs, channel pairs interleaved; rq[c].bias
 * holds bias + the zx term). cin is a constant where it pays (the first conv's 3). */
static TF_AI void patch_pass(const tf_conv_params *p, const int8_t *xg, int32_t cin, int32_t ih_n, int32_t iw_n,
                             int32_t oh_n, int32_t ow_n, const uint32_t *wt, const rqf_t *rq, int32_t nco, int32_t nout,
                             int8_t *yc) {
    uint32_t pp[TF_PATCH_NP][2] __attribute__((aligned(8))); /* (np, 2): pair j of windows a and b */
    const int32_t np = (9 * cin + 1) / 2, oplane = oh_n * ow_n, off = p->input_offset;
    const int32_t sh = p->stride_h, sw = p->stride_w;
#if TF_USE_DSP
    const int32_t plane = ih_n * iw_n;
#endif
    for (int32_t oh = 0; oh < oh_n; oh++) {
        const int32_t ih0 = oh * sh - p->pad_h;
        const int rows_in = ih0 >= 0 && ih0 + 3 <= ih_n;
        for (int32_t ow = 0; ow < ow_n; ow += 2) {
            const int two = ow + 1 < ow_n;
            for (int32_t k = 0; k < 2; k++) { /* a lone last window is built twice, written once */
                const int32_t iw0 = (ow + (two ? k : 0)) * sw - p->pad_w;
#if TF_USE_DSP
                if (rows_in && iw0 >= 0 && iw0 + 4 <= iw_n) {
                    patch_fast(&pp[0][k], xg + ih0 * iw_n + iw0, cin, plane, iw_n);
                    continue;
                }
#endif
                (void)rows_in;
                patch_slow(&pp[0][k], xg, cin, ih_n, iw_n, ih0, iw0, off);
            }
            int8_t *yo = yc + oh * ow_n + ow;
            const uint32_t *wk = wt;
            for (int32_t c = 0; c < nco; c += 2, wk += 2 * np, yo += 2 * oplane) {
                int32_t a0 = rq[c].bias, a1 = a0, b0 = rq[c + 1].bias, b1 = b0;
#if TF_USE_DSP
                if (np == 14) { /* NOTE: the compiler reloads and spills here; ldrd pairs keep it at 6 per pair */
                    const uint32_t *pj = &pp[0][0], *wj = wk;
                    uint32_t xa, xb, wa, wb;
                    __asm__(".rept 14\n\t"
                            "ldrd %[xa], %[xb], [%[pj]], #8\n\t"
                            "ldrd %[wa], %[wb], [%[wj]], #8\n\t"
                            "smlad %[a0], %[xa], %[wa], %[a0]\n\t"
                            "smlad %[a1], %[xb], %[wa], %[a1]\n\t"
                            "smlad %[b0], %[xa], %[wb], %[b0]\n\t"
                            "smlad %[b1], %[xb], %[wb], %[b1]\n\t"
                            ".endr"
                            : [a0] "+r"(a0), [a1] "+r"(a1), [b0] "+r"(b0), [b1] "+r"(b1), [pj] "+r"(pj), [wj] "+r"(wj),
                              [xa] "=&r"(xa), [xb] "=&r"(xb), [wa] "=&r"(wa), [wb] "=&r"(wb)
                            :
                            : "memory");
                } else
#endif
                {
                    for (int32_t j = 0; j < np; j++) {
                        const uint32_t xa = pp[j][0], xb = pp[j][1], wa = wk[2 * j], wb = wk[2 * j + 1];
                        a0 = dot2(xa, wa, a0);
                        a1 = dot2(xb, wa, a1);
                        b0 = dot2(xa, wb, b0);
                        b1 = dot2(xb, wb, b1);
                    }
                }
                yo[0] = (int8_t)tf_sat8(tf_mmla(a0, rq[c].mult, rq[c].k) >> rq[c].t);
                if (two) {
                    yo[1] = (int8_t)tf_sat8(tf_mmla(a1, rq[c].mult, rq[c].k) >> rq[c].t);
                }
                if (c + 1 < nout) {
                    yo[oplane] = (int8_t)tf_sat8(tf_mmla(b0, rq[c + 1].mult, rq[c + 1].k) >> rq[c + 1].t);
                    if (two) {
                        yo[oplane + 1] = (int8_t)tf_sat8(tf_mmla(b1, rq[c + 1].mult, rq[c + 1].k) >> rq[c + 1].t);
                    }
                }
            }
        }
    }
}

/* NOTE: out of line, so their stack frames are not added to tf_conv_patch3's (1 KB frame limit) */
static __attribute__((noinline)) void patch_pass3(const tf_conv_params *p, const int8_t *xg, int32_t ih_n, int32_t iw_n,
                                                  int32_t oh_n, int32_t ow_n, const uint32_t *wt, const rqf_t *rq,
                                                  int32_t nco, int32_t nout, int8_t *yc) {
    patch_pass(p, xg, 3, ih_n, iw_n, oh_n, ow_n, wt, rq, nco, nout, yc);
}
static __attribute__((noinline)) void patch_passn(const tf_conv_params *p, const int8_t *xg, int32_t cin, int32_t ih_n,
                                                  int32_t iw_n, int32_t oh_n, int32_t ow_n, const uint32_t *wt,
                                                  const rqf_t *rq, int32_t nco, int32_t nout, int8_t *yc) {
    patch_pass(p, xg, cin, ih_n, iw_n, oh_n, ow_n, wt, rq, nco, nout, yc);
}

/* CONV2D 3x3, groups 1, cin <= TF_PATCH_CIN, no mask, every channel in rqf range: the whole conv (returns 1),
 * else 0 and the caller takes the per-channel path. Shapes as tf_conv2d_s8 (checked by it). */
int tf_conv_patch3(const tf_conv_params *p, const tf_per_channel_quant *q, const tf_dims *x_dims, const int8_t *x,
                   const tf_filter_dims *w_dims, const int8_t *w, const int32_t *bias, const tf_dims *y_dims, int8_t *y,
                   const uint8_t *mask) {
    const int32_t cin = w_dims->c, cout = w_dims->n;
    if (mask || p->groups != 1 || w_dims->h != 3 || w_dims->w != 3 || cin > TF_PATCH_CIN || cout < 2) {
        return 0;
    }
    for (int32_t co = 0; co < cout; co++) {
        rq_t r;
        rqf_t q8;
        rq_init(&r, p, q->mult[co], q->shift[co], bias ? bias[co] : 0);
        if (!rqf_of(&q8, p, &r, 9 * cin)) {
            return 0;
        }
    }
    const int32_t np = (9 * cin + 1) / 2, oplane = y_dims->h * y_dims->w;
    uint32_t wt[TF_PATCH_CO * TF_PATCH_NP];
    rqf_t rq[TF_PATCH_CO];
    for (int32_t co0 = 0; co0 < cout; co0 += TF_PATCH_CO) {
        const int32_t nout = cout - co0 < TF_PATCH_CO ? cout - co0 : TF_PATCH_CO, nco = (nout + 1) & ~1;
        for (int32_t c = 0; c < nco; c++) {
            int16_t t[2 * TF_PATCH_NP] = {0};
            if (c < nout) {
                const int8_t *wc = w + (co0 + c) * cin * 9; /* (C_in, 3, 3) */
                for (int32_t ci = 0; ci < cin; ci++) {
                    for (int32_t k = 0; k < 9; k++) {
                        t[patch_slot(cin, ci, k / 3, k % 3)] = wc[ci * 9 + k];
                    }
                }
                rq_t r;
                rq_init(&r, p, q->mult[co0 + c], q->shift[co0 + c], bias ? bias[co0 + c] : 0);
                (void)rqf_of(&rq[c], p, &r, 9 * cin);
                rq[c].bias += p->input_offset * tf_sum_s8(wc, cin * 9); /* the zx term, as woff */
            } else {
                rq[c] = rq[c - 1]; /* the padding channel: computed, never written */
            }
            for (int32_t j = 0; j < np; j++) { /* channel pairs interleaved: (c / 2, j, c % 2) */
                wt[((c >> 1) * np + j) * 2 + (c & 1)] = TF_PACK16(t[2 * j], t[2 * j + 1]);
            }
        }
        int8_t *yc = y + co0 * oplane;
        if (cin == 3) {
            patch_pass3(p, x, x_dims->h, x_dims->w, y_dims->h, y_dims->w, wt, rq, nco, nout, yc);
        } else {
            patch_passn(p, x, cin, x_dims->h, x_dims->w, y_dims->h, y_dims->w, wt, rq, nco, nout, yc);
        }
    }
    return 1;
}
