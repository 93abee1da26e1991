/* PATCH: a frozen prefix of convs / fused conv + depthwise pairs / adds run tile by tile (the C twin of
 * device_agent/engine/patch.py, bit for bit). Per output tile the region each layer must produce is found
 * backwards (receptive field, halos recomputed), then the layers run forwards over those regions, each into its
 * buffer at buf_off in the caller's scratch; the last layer writes the tile of y. A fused layer is produced one
 * channel at a time and consumed at once by the depthwise conv after it. Requantization is rq_pre, the exact
 * form every conv kernel shares, so each output equals the unpatched op's. */
#include <string.h>

#include "tf_conv_rq.h"
#include "tf_dsp.h"

#define TF_PATCH_MAX_TERMS 32768 /* C_in/groups x KH x KW: |acc| <= 32768 x 255 x 128 < 2^31 */

typedef struct {
    int32_t r0, r1, c0, c1; /* rows [r0, r1), columns [c0, c1); r0 >= r1: nothing */
} rect;

typedef struct {
    const int8_t *p;                      /* channel ch0 at (r0, c0) */
    int32_t h, w;                         /* the whole layer */
    int32_t r0, c0, rows, cols, ch0, off; /* off = -zero_point */
} src_t;

typedef struct {
    int8_t *p; /* channel ch0 at the region's origin */
    int32_t cstride, rstride, ch0;
} dst_t;

static int64_t area(const rect *r) {
    return r->r0 < r->r1 && r->c0 < r->c1 ? (int64_t)(r->r1 - r->r0) * (r->c1 - r->c0) : 0;
}

static int32_t max32(int32_t a, int32_t b) { return a > b ? a : b; }
static int32_t min32(int32_t a, int32_t b) { return a < b ? a : b; }

/* Output dims of every layer (out[l]); TF_OK when the table is one the reference accepts (engine/patch.py
 * layers_of): refs to earlier layers, conv groups/shapes, adds of equal shapes, fusion only into the depthwise
 * conv right after, the last layer's dims those of y. */
tf_status tf_patch_check(const tf_patch_params *p, const tf_patch_weights *wt, const tf_dims *x_dims,
                         const tf_dims *y_dims, tf_dims *out) {
    const int32_t n = p->n_layers;
    if (n < 1 || n > TF_PATCH_MAX_LAYERS || p->tiles_h < 1 || p->tiles_w < 1) {
        return TF_ERR_ARG;
    }
    int32_t ch = 0;
    for (int32_t l = 0; l < n; l++) {
        const int32_t a = p->in_a[l], k = p->kind[l];
        if (a < 0 || a > l || p->fused[l] < 0 || p->fused[l] > 1 || p->buf_off[l] < -1 || p->act_min[l] < -128 ||
            p->act_min[l] > p->act_max[l] || p->act_max[l] > 127 || p->zero_point[l] < -128 || p->zero_point[l] > 127) {
            return TF_ERR_ARG;
        }
        const tf_dims *src = a ? &out[a - 1] : x_dims;
        if (k == 0) {
            const tf_filter_dims *wd = &wt->wd[l];
            if (p->in_b[l] != -1 || !wt->w[l] || !wt->b[l] || wd->c * wd->h * wd->w > TF_PATCH_MAX_TERMS) {
                return TF_ERR_ARG;
            }
            /* pads bounded as tf_conv_check bounds them, spans in int64: 2 pad_h overflowed at pad_h = 2^30 */
            if (p->pad_h[l] < 0 || p->pad_h[l] > wd->h || p->pad_w[l] < 0 || p->pad_w[l] > wd->w ||
                p->stride_h[l] < 1 || p->stride_w[l] < 1) {
                return TF_ERR_ARG;
            }
            const int64_t oh = ((int64_t)src->h + 2 * (int64_t)p->pad_h[l] - wd->h) / p->stride_h[l] + 1,
                          ow = ((int64_t)src->w + 2 * (int64_t)p->pad_w[l] - wd->w) / p->stride_w[l] + 1;
            if (oh < 1 || ow < 1 || oh > INT32_MAX || ow > INT32_MAX) {
                return TF_ERR_SHAPE;
            }
            out[l].c = wd->n;
            out[l].h = (int32_t)oh;
            out[l].w = (int32_t)ow;
            if (tf_conv_check(src, wd, &out[l], p->groups[l], p->stride_h[l], p->stride_w[l], p->pad_h[l],
                              p->pad_w[l]) != TF_OK) {
                return TF_ERR_SHAPE;
            }
            for (int32_t c = 0; c < wd->n; c++) {
                if (p->shift[ch + c] < 1 || p->shift[ch + c] > 62) {
                    return TF_ERR_ARG;
                }
            }
            ch += wd->n;
        } else if (k == 1) {
            const int32_t b = p->in_b[l];
            if (b < 0 || b > l || p->add_shift[l] < 1 || p->add_shift[l] > 62) {
                return TF_ERR_ARG;
            }
            const tf_dims *sb = b ? &out[b - 1] : x_dims;
            if (sb->c != src->c || sb->h != src->h || sb->w != src->w) {
                return TF_ERR_SHAPE;
            }
            out[l] = *src;
        } else {
            return TF_ERR_ARG;
        }
    }
    if (ch != p->n_channels || out[n - 1].c != y_dims->c || out[n - 1].h != y_dims->h || out[n - 1].w != y_dims->w) {
        return TF_ERR_SHAPE;
    }
    for (int32_t l = 0; l < n; l++) { /* fusion: conv -> the depthwise conv right after, its only reader */
        if (!p->fused[l]) {
            continue;
        }
        if (p->kind[l] != 0 || l + 1 >= n || p->kind[l + 1] != 0 || p->in_a[l + 1] != l + 1 ||
            p->groups[l + 1] != out[l].c || out[l + 1].c != out[l].c || (l && p->fused[l - 1])) {
            return TF_ERR_ARG;
        }
        for (int32_t j = l + 2; j < n; j++) {
            if (p->in_a[j] == l + 1 || (p->kind[j] == 1 && p->in_b[j] == l + 1)) {
                return TF_ERR_ARG;
            }
        }
    }
    if (p->tiles_h > y_dims->h || p->tiles_w > y_dims->w) {
        return TF_ERR_ARG;
    }
    return TF_OK;
}

static void unite(rect *dst, int32_t r0, int32_t r1, int32_t c0, int32_t c1, const tf_dims *d) {
    r0 = max32(r0, 0), r1 = min32(r1, d->h), c0 = max32(c0, 0), c1 = min32(c1, d->w);
    if (r0 >= r1 || c0 >= c1) {
        return;
    }
    if (dst->r0 >= dst->r1) {
        dst->r0 = r0, dst->r1 = r1, dst->c0 = c0, dst->c1 = c1;
        return;
    }
    dst->r0 = min32(dst->r0, r0), dst->r1 = max32(dst->r1, r1);
    dst->c0 = min32(dst->c0, c0), dst->c1 = max32(dst->c1, c1);
}

/* need[l]: the region layer l produces for output tile (ti, tj) (engine/patch.py regions). */
static void regions(const tf_patch_params *p, const tf_patch_weights *wt, const tf_dims *out, int32_t ti, int32_t tj,
                    rect *need) {
    const int32_t n = p->n_layers;
    const tf_dims *yd = &out[n - 1];
    for (int32_t l = 0; l < n; l++) {
        need[l].r0 = need[l].r1 = need[l].c0 = need[l].c1 = 0;
    }
    need[n - 1].r0 = (int32_t)((int64_t)ti * yd->h / p->tiles_h);
    need[n - 1].r1 = (int32_t)((int64_t)(ti + 1) * yd->h / p->tiles_h);
    need[n - 1].c0 = (int32_t)((int64_t)tj * yd->w / p->tiles_w);
    need[n - 1].c1 = (int32_t)((int64_t)(tj + 1) * yd->w / p->tiles_w);
    for (int32_t l = n - 1; l >= 0; l--) {
        const rect r = need[l];
        if (r.r0 >= r.r1 || r.c0 >= r.c1) {
            continue;
        }
        const int32_t a = p->in_a[l];
        if (p->kind[l] == 0) {
            if (a) {
                const int32_t sh = p->stride_h[l], sw = p->stride_w[l];
                unite(&need[a - 1], r.r0 * sh - p->pad_h[l], (r.r1 - 1) * sh - p->pad_h[l] + wt->wd[l].h,
                      r.c0 * sw - p->pad_w[l], (r.c1 - 1) * sw - p->pad_w[l] + wt->wd[l].w, &out[a - 1]);
            }
        } else {
            const int32_t b = p->in_b[l];
            if (a) {
                unite(&need[a - 1], r.r0, r.r1, r.c0, r.c1, &out[a - 1]);
            }
            if (b) {
                unite(&need[b - 1], r.r0, r.r1, r.c0, r.c1, &out[b - 1]);
            }
        }
    }
}

int32_t tf_patch_get_buffer_size(const tf_patch_params *p, const tf_patch_weights *wt, const tf_dims *out) {
    rect need[TF_PATCH_MAX_LAYERS];
    int64_t total = 0; /* NOTE: buf_off + a tile's bytes in int64, saturated: 2^31 - 16 + 16 wrapped in int32 */
    for (int32_t ti = 0; ti < p->tiles_h; ti++) {
        for (int32_t tj = 0; tj < p->tiles_w; tj++) {
            regions(p, wt, out, ti, tj, need);
            for (int32_t l = 0; l + 1 < p->n_layers; l++) {
                const int64_t bytes = area(&need[l]) * (p->fused[l] ? 1 : out[l].c);
                if (bytes && p->buf_off[l] < 0) {
                    return -1;
                }
                total = bytes && p->buf_off[l] + bytes > total ? p->buf_off[l] + bytes : total;
            }
        }
    }
    return total > INT32_MAX ? INT32_MAX : (int32_t)total;
}

/* One output channel's requantization: the one-smmla form of tf_conv_rq.h (rqf_t) whenever its exactness
 * conditions hold (shift in [33, 55], int8 zero point, acc + bias never wraps), the 64-bit rq_pre otherwise;
 * then the clamp to [act_min, act_max] (rqf_init also wants the full int8 range: here the clamp is separate). */
typedef struct {
    rq_t rq;
    rqf_t f;
    int fast;
} rqx_t;

static void rqx_init(rqx_t *r, const tf_conv_params *cp, int32_t mult, int32_t shift, int32_t bias, int32_t terms) {
    rq_init(&r->rq, cp, mult, shift, bias);
    tf_conv_params full = *cp;
    full.act_min = -128, full.act_max = 127;
    r->f.mult = r->f.k = r->f.t = r->f.bias = 0;
    r->fast = rqf_init(&r->f, &full, mult, shift, bias, (int64_t)terms * TF_RQF_TAP);
}

static inline int8_t rq_out(const rqx_t *r, int32_t acc) {
    const int32_t pre = r->fast ? rqf_pre(&r->f, acc + r->f.bias) : rq_pre(&r->rq, acc);
    return (int8_t)(pre < r->rq.lo ? r->rq.lo : (pre > r->rq.hi ? r->rq.hi : pre));
}

#if TF_USE_DSP
#define PATCH_PW_CIN 64 /* most input channels of the packed 1x1 path */
/* Four pixels of a row (x at the first, channel ci) x two channels per step: a[i] += x[ci][i] w[ci] +
 * x[ci + 1][i] w[ci + 1] by one SMLAD each (wpk: (w[2k], w[2k + 1]) int16 pairs). */
static inline void pw4_dsp(const int8_t *xp, const uint32_t *wpk, int32_t cin, int32_t plane, int32_t *a) {
    int32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
    for (int32_t k = 0; k < cin / 2; k++, xp += 2 * plane) {
        const uint32_t v0 = tf_load_u32(xp), v1 = tf_load_u32(xp + plane), w = wpk[k];
        const uint32_t e0 = tf_sxtb16(v0), e1 = tf_sxtb16(v1), o0 = tf_sxtb16_ror8(v0), o1 = tf_sxtb16_ror8(v1);
        a0 = tf_smlad(tf_pkhbt(e0, e1), w, a0);
        a2 = tf_smlad(tf_pkhtb(e1, e0), w, a2);
        a1 = tf_smlad(tf_pkhbt(o0, o1), w, a1);
        a3 = tf_smlad(tf_pkhtb(o1, o0), w, a3);
    }
    a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3;
}
#endif

#if TF_USE_DSP
/* n consecutive pixels of a 1x1 conv (x: the first, channel planes `plane` apart) to y, four per pw4_dsp step, a
 * lone pixel by the portable sum; out of line, so the fast requantization's constants (woff folded into the
 * bias) stay in registers. */
static __attribute__((noinline)) void pw_run(const int8_t *x, int32_t plane, int32_t n, const uint32_t *wpk,
                                             const int8_t *wc, int32_t cin, const rqx_t *rq, int32_t woff, int8_t *y) {
    int32_t j = 0;
    if (rq->fast) {
        const int32_t a0 = woff + rq->f.bias, mult = rq->f.mult, k = rq->f.k, t = rq->f.t;
        const int32_t lo = rq->rq.lo, hi = rq->rq.hi;
        for (; j + 4 <= n; j += 4) {
            int32_t a[4] = {a0, a0, a0, a0};
            pw4_dsp(x + j, wpk, cin, plane, a);
            for (int32_t i = 0; i < 4; i++) {
                const int32_t pre = tf_mmla(a[i], mult, k) >> t;
                y[j + i] = (int8_t)(pre < lo ? lo : (pre > hi ? hi : pre));
            }
        }
    }
    for (; j + 4 <= n; j += 4) {
        int32_t a[4] = {woff, woff, woff, woff};
        pw4_dsp(x + j, wpk, cin, plane, a);
        y[j] = rq_out(rq, a[0]), y[j + 1] = rq_out(rq, a[1]), y[j + 2] = rq_out(rq, a[2]);
        y[j + 3] = rq_out(rq, a[3]);
    }
    for (; j < n; j++) {
        int32_t a0 = woff;
        const int8_t *xp = x + j;
        for (int32_t ci = 0; ci < cin; ci++, xp += plane) {
            a0 += xp[0] * wc[ci];
        }
        y[j] = rq_out(rq, a0);
    }
}
#endif

/* 1x1 stride-1 conv: four pixels of a row per pass, the zero-point term folded into woff. */
static void pw_region(const rqx_t *rqp, const int8_t *wc, int32_t cin, int32_t woff, const src_t *s, const int8_t *xg,
                      const rect *r, int8_t *yc, int32_t rstride) {
    /* NOTE: a local copy: int8 stores to y may alias anything reached through a pointer */
    const rqx_t rql = *rqp, *rq = &rql;
    const int32_t plane = s->rows * s->cols, n = r->c1 - r->c0;
#if TF_USE_DSP
    uint32_t wpk[PATCH_PW_CIN / 2];
    const int dsp = cin % 2 == 0 && cin <= PATCH_PW_CIN;
    for (int32_t k = 0; dsp && k < cin / 2; k++) {
        wpk[k] = TF_PACK16(wc[2 * k], wc[2 * k + 1]);
    }
    if (dsp) { /* NOTE: region rows that are whole rows of both x's and y's buffers run as one */
        const int flat = s->c0 == r->c0 && s->cols == n && rstride == n;
        const int8_t *xr = xg + (r->r0 - s->r0) * s->cols + (r->c0 - s->c0);
        for (int32_t oy = r->r0; oy < r->r1; oy++, xr += s->cols) {
            pw_run(xr, plane, flat ? n * (r->r1 - r->r0) : n, wpk, wc, cin, rq, woff, yc + (oy - r->r0) * rstride);
            if (flat) {
                break;
            }
        }
        return;
    }
#endif
    for (int32_t oy = r->r0; oy < r->r1; oy++) {
        const int8_t *xr = xg + (oy - s->r0) * s->cols + (r->c0 - s->c0);
        int8_t *yr = yc + (oy - r->r0) * rstride;
        int32_t j = 0;
        for (; j + 4 <= n; j += 4) {
            int32_t a[4] = {woff, woff, woff, woff};
            const int8_t *xp = xr + j;
#if TF_USE_DSP
            if (dsp) {
                pw4_dsp(xp, wpk, cin, plane, a);
            } else
#endif
            {
                for (int32_t ci = 0; ci < cin; ci++, xp += plane) {
                    const int32_t w = wc[ci];
                    a[0] += xp[0] * w, a[1] += xp[1] * w, a[2] += xp[2] * w, a[3] += xp[3] * w;
                }
            }
            yr[j] = rq_out(rq, a[0]), yr[j + 1] = rq_out(rq, a[1]), yr[j + 2] = rq_out(rq, a[2]);
            yr[j + 3] = rq_out(rq, a[3]);
        }
        for (; j < n; j++) {
            int32_t a0 = woff;
            const int8_t *xp = xr + j;
            for (int32_t ci = 0; ci < cin; ci++, xp += plane) {
                a0 += xp[0] * wc[ci];
            }
            yr[j] = rq_out(rq, a0);
        }
    }
}

/* Sum over the taps of output (oy, ox) that lie inside the layer, (x - zx) w: the border case. */
static int32_t acc_border(const src_t *s, const int8_t *xg, const int8_t *wc, int32_t cin_g, int32_t kh_n, int32_t kw_n,
                          int32_t iy0, int32_t ix0) {
    const int32_t plane = s->rows * s->cols, taps = kh_n * kw_n;
    const int32_t k0 = max32(0, -iy0), k1 = min32(kh_n, s->h - iy0);
    const int32_t j0 = max32(0, -ix0), nj = min32(kw_n, s->w - ix0) - j0;
    int32_t acc = 0;
    for (int32_t ci = 0; ci < cin_g; ci++) {
        const int8_t *wk = wc + ci * taps + j0;
        const int8_t *xc = xg + ci * plane + (ix0 + j0 - s->c0);
        for (int32_t i = k0; i < k1; i++) {
            const int8_t *xr = xc + (iy0 + i - s->r0) * s->cols;
            const int8_t *wr = wk + i * kw_n;
            for (int32_t j = 0; j < nj; j++) {
                acc += ((int32_t)xr[j] + s->off) * wr[j];
            }
        }
    }
    return acc;
}

/* Sum x w over a window wholly inside the layer (x at its top-left tap); the caller adds woff. */
static inline int32_t acc_inside(const int8_t *x, const int8_t *wc, int32_t cin_g, int32_t kh_n, int32_t kw_n,
                                 int32_t cols, int32_t plane) {
    int32_t acc = 0;
    if (kh_n == 3 && kw_n == 3) {
        for (int32_t ci = 0; ci < cin_g; ci++, x += plane, wc += 9) {
            const int8_t *x1 = x + cols, *x2 = x1 + cols;
            acc += x[0] * wc[0] + x[1] * wc[1] + x[2] * wc[2] + x1[0] * wc[3] + x1[1] * wc[4] + x1[2] * wc[5] +
                   x2[0] * wc[6] + x2[1] * wc[7] + x2[2] * wc[8];
        }
        return acc;
    }
    for (int32_t ci = 0; ci < cin_g; ci++, x += plane) {
        for (int32_t i = 0; i < kh_n; i++) {
            const int8_t *xr = x + i * cols;
            for (int32_t j = 0; j < kw_n; j++) {
                acc += xr[j] * *wc++;
            }
        }
    }
    return acc;
}

#if TF_USE_DSP
#define PATCH_DSP_CIN 4 /* input channels of a group the packed 3x3 path takes (the first conv's 3, depthwise 1) */
/* 3x3 window sum x w, two SMLADs per row: (x0, x2).(w0, w2) + (x1, x3).(w1, 0), wp = 6 packed words per input
 * channel; reads one byte after each window row (the caller keeps it inside the buffer). */
static inline int32_t acc3_row(const int8_t *x, uint32_t we, uint32_t wo, int32_t acc) {
    const uint32_t v = tf_load_u32(x);
    return tf_smlad(tf_sxtb16_ror8(v), wo, tf_smlad(tf_sxtb16(v), we, acc));
}

static inline int32_t acc3_dsp(const int8_t *x, const uint32_t *wp, int32_t cin_g, int32_t cols, int32_t plane) {
    int32_t acc = 0;
    for (int32_t ci = 0; ci < cin_g; ci++, x += plane, wp += 6) {
        acc = acc3_row(x, wp[0], wp[1], acc);
        acc = acc3_row(x + cols, wp[2], wp[3], acc);
        acc = acc3_row(x + 2 * cols, wp[4], wp[5], acc);
    }
    return acc;
}

/* A row of n outputs of a 3x3 conv over cin_g (1 or 3, a constant where inlined) input channels, x0 the first
 * window's top-left tap, windows sw apart; wp as acc3_dsp. Out of line with the requantization constants in
 * locals (in conv_region they live on the stack): the fast form with woff folded into the bias, else rq_out. */
static TF_AI void row3_impl(const int8_t *x0, int32_t sw, int32_t n, int32_t cols, int32_t plane, const uint32_t *wp,
                            int32_t cin_g, const rqx_t *rq, int32_t woff, int8_t *yr) {
    if (!rq->fast) {
        for (int32_t i = 0; i < n; i++, x0 += sw) {
            yr[i] = rq_out(rq, woff + acc3_dsp(x0, wp, cin_g, cols, plane));
        }
        return;
    }
    const int32_t a0 = woff + rq->f.bias, mult = rq->f.mult, k = rq->f.k, t = rq->f.t;
    const int32_t lo = rq->rq.lo, hi = rq->rq.hi, c2 = 2 * cols;
    for (int32_t i = 0; i < n; i++, x0 += sw) {
        int32_t acc = a0;
        const int8_t *xc = x0;
        const uint32_t *wc = wp;
        for (int32_t ci = 0; ci < cin_g; ci++, xc += plane, wc += 6) {
            acc = acc3_row(xc, wc[0], wc[1], acc);
            acc = acc3_row(xc + cols, wc[2], wc[3], acc);
            acc = acc3_row(xc + c2, wc[4], wc[5], acc);
        }
        const int32_t pre = tf_mmla(acc, mult, k) >> t;
        yr[i] = (int8_t)(pre < lo ? lo : (pre > hi ? hi : pre));
    }
}

static __attribute__((noinline)) void row3_c1(const int8_t *x0, int32_t sw, int32_t n, int32_t cols, const uint32_t *wp,
                                              const rqx_t *rq, int32_t woff, int8_t *yr) {
    row3_impl(x0, sw, n, cols, 0, wp, 1, rq, woff, yr);
}

static __attribute__((noinline)) void row3_c3(const int8_t *x0, int32_t sw, int32_t n, int32_t cols, int32_t plane,
                                              const uint32_t *wp, const rqx_t *rq, int32_t woff, int8_t *yr) {
    row3_impl(x0, sw, n, cols, plane, wp, 3, rq, woff, yr);
}

/* 5x5 one-channel window: per row (x0, x2).(w0, w2) + (x1, x3).(w1, w3) by two SMLADs, + x4 w4; wp = 3 words per
 * row: the two pairs and w4. Reads only the window. */
static inline int32_t acc5_dsp(const int8_t *x, const uint32_t *wp, int32_t cols, int32_t acc) {
    for (int32_t r = 0; r < 5; r++, x += cols, wp += 3) {
        const uint32_t v = tf_load_u32(x);
        acc = tf_smlad(tf_sxtb16(v), wp[0], acc);
        acc = tf_smlad(tf_sxtb16_ror8(v), wp[1], acc);
        acc += x[4] * (int32_t)wp[2];
    }
    return acc;
}
#endif

/* Output channels [co0, co1) of conv layer l over region r, from s into d (channel co at d.p + (co - d.ch0)
 * cstride). Input positions outside the layer are padding (they add nothing: x - zx = 0); inside, s holds them.
 * Windows wholly inside the layer take acc_inside plus the folded zero-point term (the same integer). */
static void conv_region(const tf_patch_params *p, const tf_patch_weights *wt, int32_t l, const int32_t *mult,
                        const int32_t *shift, const src_t *s, int32_t co0, int32_t co1, const rect *r, const dst_t *d) {
    const tf_filter_dims *wd = &wt->wd[l];
    const int32_t sh = p->stride_h[l], sw = p->stride_w[l], ph = p->pad_h[l], pw = p->pad_w[l];
    const int32_t cin_g = wd->c, kh_n = wd->h, kw_n = wd->w, cout_g = wd->n / p->groups[l];
    const int32_t plane = s->rows * s->cols, taps = kh_n * kw_n, cols = s->cols;
    const tf_conv_params cp = {sh, sw, ph, pw, p->groups[l], s->off, p->zero_point[l], p->act_min[l], p->act_max[l]};
    /* output columns whose window lies inside the layer: ox * sw - pw >= 0 and ox * sw - pw + kw <= w */
    const int32_t oxa = max32(r->c0, (pw + sw - 1) / sw);
    const int32_t oxb = max32(oxa, min32(r->c1, s->w - kw_n + pw >= 0 ? (s->w - kw_n + pw) / sw + 1 : 0));
    for (int32_t co = co0; co < co1; co++) {
        rqx_t rq;
        rqx_init(&rq, &cp, mult[co], shift[co], wt->b[l][co], cin_g * taps);
        const int8_t *wc = wt->w[l] + co * cin_g * taps;
        const int8_t *xg = s->p + ((co / cout_g) * cin_g - s->ch0) * plane;
        int8_t *yc = d->p + (co - d->ch0) * d->cstride;
        int32_t woff = 0;
        for (int32_t t = 0; t < cin_g * taps; t++) {
            woff += wc[t];
        }
        woff *= s->off;
        if (taps == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0) {
            pw_region(&rq, wc, cin_g, woff, s, xg, r, yc, d->rstride);
            continue;
        }
#if TF_USE_DSP
        uint32_t wp[6 * PATCH_DSP_CIN];
        const int dsp = kh_n == 3 && kw_n == 3 && cin_g <= PATCH_DSP_CIN;
        for (int32_t ci = 0; dsp && ci < cin_g; ci++) {
            for (int32_t k = 0; k < 3; k++) {
                const int8_t *w3 = wc + ci * 9 + 3 * k;
                wp[6 * ci + 2 * k] = TF_PACK16(w3[0], w3[2]);
                wp[6 * ci + 2 * k + 1] = TF_PACK16(w3[1], 0);
            }
        }
        const int32_t row_end = s->c0 + s->cols; /* a window's 4th byte must stay inside its buffer row */
        uint32_t wp5[15];
        const int dw5 = kh_n == 5 && kw_n == 5 && cin_g == 1;
        for (int32_t k = 0; dw5 && k < 5; k++) {
            const int8_t *wr = wc + 5 * k;
            wp5[3 * k] = TF_PACK16(wr[0], wr[2]);
            wp5[3 * k + 1] = TF_PACK16(wr[1], wr[3]);
            wp5[3 * k + 2] = (uint32_t)(int32_t)wr[4];
        }
#endif
        for (int32_t oy = r->r0; oy < r->r1; oy++) {
            const int32_t iy0 = oy * sh - ph;
            const int inside = iy0 >= 0 && iy0 + kh_n <= s->h;
            const int32_t a = inside ? oxa : r->c1, b = inside ? oxb : r->c1;
            int8_t *yr = yc + (oy - r->r0) * d->rstride;
            const int32_t c0 = r->c0;
            for (int32_t ox = c0; ox < a; ox++) {
                yr[ox - c0] = rq_out(&rq, acc_border(s, xg, wc, cin_g, kh_n, kw_n, iy0, ox * sw - pw));
            }
            for (int32_t ox = b > a ? b : a; ox < r->c1; ox++) {
                yr[ox - c0] = rq_out(&rq, acc_border(s, xg, wc, cin_g, kh_n, kw_n, iy0, ox * sw - pw));
            }
            if (a >= b) {
                continue;
            }
            int32_t ox = a;
            const int8_t *x0 = xg + (iy0 - s->r0) * s->cols + (a * sw - pw - s->c0);
#if TF_USE_DSP
            if (dw5) {
                for (; ox < b; ox++, x0 += sw) {
                    yr[ox - c0] = rq_out(&rq, acc5_dsp(x0, wp5, cols, woff));
                }
            }
            if (dsp) { /* NOTE: the window's 4th byte stays in its buffer row while ix0 + 3 < row_end */
                const int32_t bd = min32(b, (row_end - 4 + pw) / sw + 1);
                if ((cin_g == 1 || cin_g == 3) && bd - ox >= 6) { /* NOTE: shorter rows: the call costs more */
                    if (cin_g == 1) {
                        row3_c1(x0, sw, bd - ox, cols, wp, &rq, woff, yr + (ox - c0));
                    } else {
                        row3_c3(x0, sw, bd - ox, cols, plane, wp, &rq, woff, yr + (ox - c0));
                    }
                    x0 += (bd - ox) * sw, ox = bd;
                } else if (cin_g == 1) {
                    const uint32_t w0 = wp[0], w1 = wp[1], w2 = wp[2], w3 = wp[3], w4 = wp[4], w5 = wp[5];
                    const int32_t c1 = cols, c2 = 2 * cols; /* NOTE: c1 is a row stride here */
                    for (; ox < bd; ox++, x0 += sw) {
                        int32_t acc = acc3_row(x0, w0, w1, woff);
                        acc = acc3_row(x0 + c1, w2, w3, acc);
                        yr[ox - c0] = rq_out(&rq, acc3_row(x0 + c2, w4, w5, acc));
                    }
                } else {
                    for (; ox < bd; ox++, x0 += sw) {
                        yr[ox - c0] = rq_out(&rq, woff + acc3_dsp(x0, wp, cin_g, cols, plane));
                    }
                }
            }
#endif
            for (; ox < b; ox++, x0 += sw) {
                yr[ox - c0] = rq_out(&rq, woff + acc_inside(x0, wc, cin_g, kh_n, kw_n, cols, plane));
            }
        }
    }
}

static void src_of(const tf_patch_params *p, const tf_dims *x_dims, const int8_t *x, const tf_dims *out,
                   const rect *need, int8_t *scratch, int32_t ref, src_t *s) {
    if (ref == 0) {
        s->p = x, s->h = x_dims->h, s->w = x_dims->w, s->r0 = s->c0 = 0, s->rows = x_dims->h, s->cols = x_dims->w;
        s->off = p->input_offset;
    } else {
        const rect *r = &need[ref - 1];
        s->p = scratch + p->buf_off[ref - 1], s->h = out[ref - 1].h, s->w = out[ref - 1].w;
        s->r0 = r->r0, s->c0 = r->c0, s->rows = r->r1 - r->r0, s->cols = r->c1 - r->c0;
        s->off = -p->zero_point[ref - 1];
    }
    s->ch0 = 0;
}

/* ADD over region r: a, b read at the same positions (both hold them), written to d. */
static void add_region(const tf_patch_params *p, int32_t l, const src_t *a, const src_t *b, int32_t c_n, const rect *r,
                       const dst_t *d) {
    const int64_t half = TF_POW2_I64(p->add_shift[l] - 1);
    for (int32_t c = 0; c < c_n; c++) {
        for (int32_t oy = r->r0; oy < r->r1; oy++) {
            const int8_t *ar = a->p + (c * a->rows + oy - a->r0) * a->cols + (r->c0 - a->c0);
            const int8_t *br = b->p + (c * b->rows + oy - b->r0) * b->cols + (r->c0 - b->c0);
            int8_t *yr = d->p + c * d->cstride + (oy - r->r0) * d->rstride;
            for (int32_t j = 0; j < r->c1 - r->c0; j++) {
                const int64_t v =
                    ((int64_t)ar[j] + a->off) * p->add_mult_a[l] + ((int64_t)br[j] + b->off) * p->add_mult_b[l];
                const int64_t pre = ((v + half) >> p->add_shift[l]) + p->zero_point[l];
                yr[j] = (int8_t)(pre < p->act_min[l] ? p->act_min[l] : (pre > p->act_max[l] ? p->act_max[l] : pre));
            }
        }
    }
}

tf_status tf_patch_s8(const tf_ctx *ctx, const tf_patch_params *p, const tf_patch_weights *wt, const tf_dims *x_dims,
                      const int8_t *x, const tf_dims *y_dims, int8_t *y) {
    tf_dims out[TF_PATCH_MAX_LAYERS];
    rect need[TF_PATCH_MAX_LAYERS];
    const int32_t *mult[TF_PATCH_MAX_LAYERS], *shift[TF_PATCH_MAX_LAYERS];
    tf_status st = tf_patch_check(p, wt, x_dims, y_dims, out);
    if (st != TF_OK) {
        return st;
    }
    const int32_t need_bytes = tf_patch_get_buffer_size(p, wt, out);
    if (need_bytes < 0 || need_bytes > ctx->size || (need_bytes && !ctx->buf)) {
        return TF_ERR_SCRATCH;
    }
    int8_t *scratch = (int8_t *)ctx->buf;
    const int32_t n = p->n_layers;
    for (int32_t l = 0, ch = 0; l < n; l++) { /* per-layer views of the concatenated requantization arrays */
        mult[l] = p->mult + ch;
        shift[l] = p->shift + ch;
        ch += p->kind[l] == 0 ? wt->wd[l].n : 0;
    }
    for (int32_t ti = 0; ti < p->tiles_h; ti++) {
        for (int32_t tj = 0; tj < p->tiles_w; tj++) {
            regions(p, wt, out, ti, tj, need);
            for (int32_t l = 0; l < n; l++) {
                const rect *r = &need[l];
                if (p->fused[l] || area(r) == 0) {
                    continue;
                }
                dst_t d;
                if (l == n - 1) {
                    d.p = y + (r->r0 * y_dims->w + r->c0), d.cstride = y_dims->h * y_dims->w, d.rstride = y_dims->w;
                } else {
                    d.p = scratch + p->buf_off[l], d.rstride = r->c1 - r->c0, d.cstride = area(r);
                }
                d.ch0 = 0;
                src_t a;
                src_of(p, x_dims, x, out, need, scratch, p->in_a[l], &a);
                if (p->kind[l] == 1) {
                    src_t b;
                    src_of(p, x_dims, x, out, need, scratch, p->in_b[l], &b);
                    add_region(p, l, &a, &b, out[l].c, r, &d);
                } else if (l && p->fused[l - 1]) { /* channel c of the fused layer, then its depthwise channel */
                    const int32_t f = l - 1;
                    src_t fs;
                    src_of(p, x_dims, x, out, need, scratch, p->in_a[f], &fs);
                    const rect *rf = &need[f];
                    src_t one = a; /* layer f's buffer, one channel, read as channel c */
                    dst_t fd = {scratch + (p->buf_off[f] < 0 ? 0 : p->buf_off[f]), area(rf), rf->c1 - rf->c0, 0};
                    for (int32_t c = 0; c < out[l].c; c++) {
                        if (area(rf)) {
                            fd.ch0 = c;
                            conv_region(p, wt, f, mult[f], shift[f], &fs, c, c + 1, rf, &fd);
                        }
                        one.ch0 = c;
                        conv_region(p, wt, l, mult[l], shift[l], &one, c, c + 1, r, &d);
                    }
                } else {
                    conv_region(p, wt, l, mult[l], shift[l], &a, 0, out[l].c, r, &d);
                }
            }
        }
    }
    return TF_OK;
}
