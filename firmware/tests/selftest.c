/* Runs each golden vector (kernel_vectors.h) through its C kernel and compares every byte.
 * Parameter layouts below are the contract with tests/firmware/gen_kernel_vectors.py. */
#include "selftest.h"

#include <string.h>

#include "kernel_vectors.h"
#include "tf_cobs.h"
#include "tf_crc.h"
#include "tf_frame.h"
#include "tf_kernels.h"
#include "tf_qmath.h"

/* conv family params: cin h w cout kh kw oh ow stride_h stride_w pad_h pad_w groups, then per op */
enum { P_CIN, P_H, P_W, P_COUT, P_KH, P_KW, P_OH, P_OW, P_SH, P_SW, P_PH, P_PW, P_G, P_CONV_END };

typedef struct {
    uint8_t *work;
    uint32_t size, used;
    uint32_t crc;
    void (*log)(const char *);
    const tf_vec_case *c;
    int ok;
} run_ctx;

static void *take(run_ctx *r, uint32_t n) {
    n = (n + 7u) & ~7u;
    if (r->used + n > r->size) {
        return NULL;
    }
    void *p = r->work + r->used;
    memset(p, 0xA5, n); /* poison: a kernel that skips an element cannot pass by luck */
    r->used += n;
    return p;
}

static void say(run_ctx *r, const char *a, const char *b) {
    char line[96];
    size_t i = 0;
    for (const char *s = a; *s && i < sizeof(line) - 1; s++) {
        line[i++] = *s;
    }
    for (const char *s = b; s && *s && i < sizeof(line) - 1; s++) {
        line[i++] = *s;
    }
    line[i] = 0;
    if (r->log) {
        r->log(line);
    }
}

/* Compare a computed output against expected buffer bi (and fold it into the run's CRC). */
static void expect(run_ctx *r, int32_t bi, const void *got, int32_t nbytes) {
    const tf_vec_buf *b = &r->c->bufs[bi];
    if (nbytes >= 0) {
        r->crc = tf_crc32_update(r->crc, got, (uint32_t)nbytes);
    }
    if (b->nbytes != nbytes || memcmp(b->data, got, (size_t)nbytes) != 0) {
        if (r->ok) {
            say(r, r->c->name, b->nbytes != nbytes ? ": size mismatch in " : ": bytes differ in ");
            say(r, "  buffer ", b->name);
        }
        r->ok = 0;
    }
}

static void status(run_ctx *r, tf_status st) {
    if (st != TF_OK) {
        say(r, r->c->name, ": kernel returned an error status");
        r->ok = 0;
    }
}

#define BUF(i, T) ((const T *)c->bufs[i].data)

static void conv_dims(const int32_t *p, tf_dims *x, tf_filter_dims *w, tf_dims *y) {
    x->c = p[P_CIN], x->h = p[P_H], x->w = p[P_W];
    w->n = p[P_COUT], w->c = p[P_CIN] / p[P_G], w->h = p[P_KH], w->w = p[P_KW];
    y->c = p[P_COUT], y->h = p[P_OH], y->w = p[P_OW];
}

/* CONV2D: conv params, zx zy act_min act_max | x w b mult shift -> y mask */
static void run_conv2d(run_ctx *r) {
    const tf_vec_case *c = r->c;
    const int32_t *p = c->params;
    tf_dims xd, yd;
    tf_filter_dims wd;
    conv_dims(p, &xd, &wd, &yd);
    tf_conv_params cp = {p[P_SH], p[P_SW], p[P_PH], p[P_PW], p[P_G], -p[13], p[14], p[15], p[16]};
    tf_per_channel_quant q = {BUF(3, int32_t), BUF(4, int32_t)};
    int32_t n = yd.c * yd.h * yd.w;
    int8_t *y = take(r, (uint32_t)n);
    uint8_t *mask = take(r, (uint32_t)(n + 7) / 8);
    if (!y || !mask) {
        r->ok = 0;
        return;
    }
    status(r, tf_conv2d_s8(&cp, &q, &xd, BUF(0, int8_t), &wd, BUF(1, int8_t), BUF(2, int32_t), &yd, y, mask));
    expect(r, 5, y, n);
    expect(r, 6, mask, (n + 7) / 8);
    /* the same y without a mask (frozen layers, PWDW): other kernel instances, e.g. the 2 x 2 depthwise step */
    int8_t *y2 = take(r, (uint32_t)n);
    if (!y2) {
        r->ok = 0;
        return;
    }
    status(r, tf_conv2d_s8(&cp, &q, &xd, BUF(0, int8_t), &wd, BUF(1, int8_t), BUF(2, int32_t), &yd, y2, NULL));
    expect(r, 5, y2, n);
}

/* ADD: n za zb zy mult_a mult_b shift act_min act_max | a b -> y mask */
static void run_add(run_ctx *r) {
    const tf_vec_case *c = r->c;
    const int32_t *p = c->params;
    tf_add_params ap = {-p[1], -p[2], p[4], p[5], p[6], p[3], p[7], p[8]};
    int8_t *y = take(r, (uint32_t)p[0]);
    uint8_t *mask = take(r, (uint32_t)(p[0] + 7) / 8);
    status(r, tf_add_s8(&ap, p[0], BUF(0, int8_t), BUF(1, int8_t), y, mask));
    expect(r, 2, y, p[0]);
    expect(r, 3, mask, (p[0] + 7) / 8);
}

/* AVGPOOL: c h w zx zy mult shift | x -> y */
static void run_avgpool(run_ctx *r) {
    const tf_vec_case *c = r->c;
    const int32_t *p = c->params;
    tf_avgpool_params ap = {-p[3], p[4], p[5], p[6]};
    tf_dims xd = {p[0], p[1], p[2]};
    int8_t *y = take(r, (uint32_t)p[0]);
    status(r, tf_avgpool_s8(&ap, &xd, BUF(0, int8_t), y));
    expect(r, 1, y, p[0]);
}

/* CLAMP: n act_min act_max | x -> y mask */
static void run_clamp(run_ctx *r) {
    const tf_vec_case *c = r->c;
    const int32_t *p = c->params;
    int8_t *y = take(r, (uint32_t)p[0]);
    uint8_t *mask = take(r, (uint32_t)(p[0] + 7) / 8);
    status(r, tf_clamp_s8(p[1], p[2], p[0], BUF(0, int8_t), y, mask));
    expect(r, 1, y, p[0]);
    expect(r, 2, mask, (p[0] + 7) / 8);
}

/* SOFTMAX_CE: k label g_exp p_label_q15 correct | logits exp_lut -> g */
static void run_softmax_ce(run_ctx *r) {
    const tf_vec_case *c = r->c;
    const int32_t *p = c->params;
    int8_t *g = take(r, (uint32_t)p[0]);
    int32_t e = 0;
    tf_ce_result res = {0, 0};
    status(r, tf_softmax_ce_s8(BUF(1, int32_t), p[0], BUF(0, int8_t), p[1], g, &e, &res));
    expect(r, 2, g, p[0]);
    if (e != p[2] || res.p_label_q15 != p[3] || res.correct != p[4]) {
        say(r, c->name, ": exponent / p_label / correct differ");
        r->ok = 0;
    }
}

/* APPLY_MASK: n | g mask -> out */
static void run_apply_mask(run_ctx *r) {
    const tf_vec_case *c = r->c;
    const int32_t n = c->params[0];
    int8_t *g = take(r, (uint32_t)n);
    memcpy(g, c->bufs[0].data, (size_t)n);
    status(r, tf_apply_mask_s8(n, BUF(1, uint8_t), g));
    expect(r, 2, g, n);
}

/* GRAD_ACCUM: n e1 e2 e_out | g1 g2 -> g */
static void run_grad_accum(run_ctx *r) {
    const tf_vec_case *c = r->c;
    const int32_t *p = c->params;
    int8_t *g = take(r, (uint32_t)p[0]);
    int32_t e = 0;
    status(r, tf_grad_accum_s8(p[0], BUF(0, int8_t), p[1], BUF(1, int8_t), p[2], g, &e));
    expect(r, 2, g, p[0]);
    if (e != p[3]) {
        say(r, c->name, ": exponent differs");
        r->ok = 0;
    }
}

/* AVGPOOL_BWD: c h w inv_hw e_y e_x | g_y -> g_x */
static void run_avgpool_bwd(run_ctx *r) {
    const tf_vec_case *c = r->c;
    const int32_t *p = c->params;
    tf_dims gd = {p[0], p[1], p[2]};
    int32_t n = p[0] * p[1] * p[2], e = 0;
    int8_t *g = take(r, (uint32_t)n);
    status(r, tf_avgpool_bwd_s8(p[3], &gd, BUF(0, int8_t), p[4], g, &e));
    expect(r, 1, g, n);
    if (e != p[5]) {
        say(r, c->name, ": exponent differs");
        r->ok = 0;
    }
}

/* CONV2D_BWD_INPUT: conv params, wscale_p e_y e_x | g_y w wscale_q -> g_x. Run with the one-pass scratch, with
 * 1/2, 1/3 and 1/7 of the 1x1 / depthwise fast path's (the chunked path: some sums kept, the rest twice), with
 * the two-pass scratch. */
static void run_conv_bwd_input(run_ctx *r) {
    const tf_vec_case *c = r->c;
    const int32_t *p = c->params;
    tf_dims xd, yd;
    tf_filter_dims wd;
    conv_dims(p, &xd, &wd, &yd);
    tf_conv_bwd_params bp = {p[P_SH], p[P_SW], p[P_PH], p[P_PW], p[P_G], p[13]};
    int32_t n = xd.c * xd.h * xd.w;
    const int32_t fast = tf_conv2d_bwd_input_fast_buffer_size(&bp, &wd, &xd);
    const int32_t sizes[5] = {tf_conv2d_bwd_input_get_buffer_size(&yd, &xd, 1), fast / 2 & ~3, fast / 3 & ~3,
                              fast / 7 & ~3, tf_conv2d_bwd_input_get_buffer_size(&yd, &xd, 0)};
    const uint32_t used = r->used;
    for (int k = 0; k < 5; k++) {
        const int32_t need = sizes[k];
        if (k > 0 && k < 4 && fast <= 0) {
            continue;
        }
        r->used = used;
        tf_ctx ctx = {take(r, (uint32_t)need), need};
        int8_t *g = take(r, (uint32_t)n);
        int32_t e = 0;
        if (!ctx.buf || !g) {
            r->ok = 0;
            return;
        }
        status(r, tf_conv2d_bwd_input_s8(&ctx, &bp, BUF(2, int32_t), &yd, BUF(0, int8_t), p[14], &wd, BUF(1, int8_t),
                                         &xd, g, &e));
        expect(r, 3, g, n);
        if (e != p[15]) {
            say(r, c->name, ": exponent differs");
            r->ok = 0;
        }
    }
}

/* CONV2D_UPDATE: conv params, k update_weight update_bias zx lr_m lr_e step w_id b_id e_y
 * | g_y x_saved w b qas_w_m qas_w_e qas_b_m qas_b_e -> w_new b_new */
static void run_conv_update(run_ctx *r) {
    const tf_vec_case *c = r->c;
    const int32_t *p = c->params;
    tf_dims xd, yd;
    tf_filter_dims wd;
    conv_dims(p, &xd, &wd, &yd);
    tf_conv_update_params up = {p[P_SH], p[P_SW], p[P_PH], p[P_PW], p[P_G],          p[13],           p[14],
                                p[15],   -p[16],  p[17],   p[18],   (uint32_t)p[19], (uint32_t)p[20], (uint32_t)p[21]};
    tf_qas qas = {BUF(4, int32_t), BUF(5, int32_t), BUF(6, int32_t), BUF(7, int32_t)};
    int8_t *w = take(r, (uint32_t)c->bufs[2].nbytes);
    int32_t *b = take(r, (uint32_t)c->bufs[3].nbytes);
    memcpy(w, c->bufs[2].data, (size_t)c->bufs[2].nbytes);
    memcpy(b, c->bufs[3].data, (size_t)c->bufs[3].nbytes);
    status(r, tf_conv2d_update_s8(&up, &qas, &yd, BUF(0, int8_t), p[22], &xd, BUF(1, int8_t), &wd, w, b));
    expect(r, 8, w, c->bufs[2].nbytes);
    expect(r, 9, b, c->bufs[3].nbytes);
}

/* atoms: RNG n step tid | idx -> out; SCALED_UPDATE n limit_is_255 | acc mult exp rnd -> out;
 * DYN_REQUANT n e_in e_out | acc -> g */
static void run_atom(run_ctx *r) {
    const tf_vec_case *c = r->c;
    const int32_t *p = c->params;
    const int32_t n = p[0];
    if (c->op == 100) {
        uint32_t *out = take(r, (uint32_t)n * 4);
        for (int32_t i = 0; i < n; i++) {
            out[i] = tf_rng_u32((uint32_t)p[1], (uint32_t)p[2], BUF(0, uint32_t)[i]);
        }
        expect(r, 1, out, n * 4);
    } else if (c->op == 101) {
        int64_t *out = take(r, (uint32_t)n * 8);
        for (int32_t i = 0; i < n; i++) {
            out[i] = tf_scaled_update(BUF(0, int64_t)[i], BUF(1, int32_t)[i], BUF(2, int32_t)[i], BUF(3, uint32_t)[i],
                                      p[1] ? 255 : INT32_MAX);
        }
        expect(r, 4, out, n * 8);
    } else if (c->op == 102) {
        int8_t *g = take(r, (uint32_t)n);
        int32_t e = 0;
        status(r, tf_dyn_requant_s32(n, BUF(0, int32_t), p[1], g, &e));
        expect(r, 1, g, n);
        if (e != p[2]) {
            say(r, c->name, ": exponent differs");
            r->ok = 0;
        }
    } else if (c->op == 110) { /* FRAME n_raw crc16 | raw encoded: COBS both ways and CRC16 as frames.py */
        const int32_t n_enc = c->bufs[1].nbytes;
        uint8_t *enc = take(r, (uint32_t)TF_COBS_MAX_ENCODED(n) + 1);
        uint8_t *dec = take(r, (uint32_t)n_enc);
        int32_t got = tf_cobs_encode(BUF(0, uint8_t), n, enc, TF_COBS_MAX_ENCODED(n) + 1);
        expect(r, 1, enc, got);
        got = tf_cobs_decode(BUF(1, uint8_t), n_enc, dec, n_enc);
        expect(r, 0, dec, got);
        if (tf_crc16(BUF(0, uint8_t), (uint32_t)n - 2) != (uint16_t)p[1]) {
            say(r, c->name, ": crc16 differs");
            r->ok = 0;
        }
    } else {
        say(r, c->name, ": unknown op id");
        r->ok = 0;
    }
}

int32_t tf_selftest_case_count(void) { return TF_KERNEL_VECTORS_N; }

void tf_selftest_run(uint8_t *work, uint32_t work_size, void (*log)(const char *line), int verbose,
                     tf_selftest_result *res) {
    run_ctx r = {work, work_size, 0, 0xFFFFFFFFu, log, NULL, 1};
    res->cases = TF_KERNEL_VECTORS_N;
    res->passed = 0;
    res->first_failed = -1;
    for (int32_t i = 0; i < TF_KERNEL_VECTORS_N; i++) {
        r.c = &tf_kernel_vectors[i];
        r.used = 0;
        r.ok = 1;
        switch (r.c->op) {
        case 1:
            run_conv2d(&r);
            break;
        case 2:
            run_add(&r);
            break;
        case 3:
            run_avgpool(&r);
            break;
        case 6:
            run_clamp(&r);
            break;
        case 16:
            run_softmax_ce(&r);
            break;
        case 17:
            run_apply_mask(&r);
            break;
        case 18:
            run_conv_bwd_input(&r);
            break;
        case 20:
            run_grad_accum(&r);
            break;
        case 21:
            run_avgpool_bwd(&r);
            break;
        case 19:
            run_conv_update(&r);
            break;
        default:
            run_atom(&r);
            break;
        }
        if (r.ok) {
            res->passed++;
            if (verbose) {
                say(&r, "ok   ", r.c->name);
            }
        } else if (res->first_failed < 0) {
            res->first_failed = i;
        }
    }
    res->crc32 = r.crc ^ 0xFFFFFFFFu;
}
