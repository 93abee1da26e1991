/* Host check of CONV2D_UPDATE's fast per-weight forms (and of ADD / APPLY_MASK / GRAD_ACCUM against copies of
 * their straightforward 64-bit versions, random inputs) (UPD_MUL / UPD_SHIFT in tf_conv2d_update_s8.c) against
 * the reference tf_scaled_update + weight clamp, over random and edge inputs in the kernel's domain:
 * |acc| < 2^30, 0 <= m < 2^17 (and beyond, which must fall back to the reference), any e, any rnd, any int8 w. */
#include <stdio.h>
#include <string.h>

/* NOTE: the kernel file is compiled in here a second time under another name, so its static helpers are
 * reachable; the binary also links the normal CORE objects. */
#define tf_conv2d_update_s8 tf_conv2d_update_s8_copy
#include "../../src/kernels/tf_conv2d_update_s8.c"
#undef tf_conv2d_update_s8

/* The straightforward versions (before the fast rewrites), for comparison. */
static void add_ref_all(const tf_add_params *p, int32_t n, const int8_t *a, const int8_t *b, int8_t *y, uint8_t *mask) {
    const int64_t half = TF_POW2_I64(p->shift - 1);
    for (int32_t i = 0; i < n; i++) {
        int64_t s = ((int64_t)a[i] + p->a_offset) * p->mult_a + ((int64_t)b[i] + p->b_offset) * p->mult_b;
        int64_t pre = ((s + half) >> p->shift) + p->output_offset;
        y[i] = (int8_t)tf_clamp_i32(pre, p->act_min, p->act_max);
        tf_mask_put(mask, i, pre >= p->act_min && pre <= p->act_max);
    }
    if (n & 7) {
        mask[n >> 3] &= (uint8_t)((1u << (n & 7)) - 1u);
    }
}
static void grad_accum_ref(int32_t n, const int8_t *g1, int32_t e1, const int8_t *g2, int32_t e2, int8_t *g,
                           int32_t *g_exp) {
    const int32_t e = e1 > e2 ? e1 : e2, s1 = e - e1, s2 = e - e2;
    uint64_t mx = 0;
    for (int32_t i = 0; i < n; i++) {
        uint64_t a = tf_abs64(tf_rshift_round_even(g1[i], s1) + tf_rshift_round_even(g2[i], s2));
        mx = a > mx ? a : mx;
    }
    const int32_t sh = tf_dyn_shift(mx);
    for (int32_t i = 0; i < n; i++) {
        g[i] = (int8_t)tf_rshift_round_even(tf_rshift_round_even(g1[i], s1) + tf_rshift_round_even(g2[i], s2), sh);
    }
    *g_exp = e + sh;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t next_u32(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

static long failures, checks;

static void check(int32_t w, int32_t acc, int32_t m, int32_t e, uint32_t rnd) {
    const upd_rule r = upd_make_rule(m, e);
    const int8_t want = upd_ref((int8_t)w, acc, m, e, rnd);
    const int8_t got = upd_one(&r, (int8_t)w, acc, rnd);
    int8_t row_w = (int8_t)w;
    const uint32_t seed = 0x1234567u * 0x85EBCA77u ^ 77u * 0xC2B2AE3Du;
    /* upd_row at flat index rnd: its own hash must be tf_rng_u32(step, id, idx) */
    const uint32_t idx = rnd;
    upd_row(&r, &acc, &row_w, 1, idx, seed);
    const int8_t want_row = upd_ref((int8_t)w, acc, m, e, tf_rng_u32(0x1234567u, 77u, idx));
    checks++;
    if (got != want || row_w != want_row) {
        if (failures++ < 10) {
            printf("FAIL w=%d acc=%d m=%d e=%d rnd=%u mode=%d: got %d want %d, row %d want %d\n", (int)w, (int)acc,
                   (int)m, (int)e, (unsigned)rnd, (int)r.mode, got, want, row_w, want_row);
        }
    }
}

int main(void) {
    const int32_t acc_edge[] = {
        0,       1,          -1,      2,       -2, 127, -128, 32640, -32640, (1 << 30) - 1, -(1 << 30) + 1,
        1 << 20, -(1 << 20), 0x12345, -0x12345};
    const int32_t m_edge[] = {0, 1, 2, 3, 255, 256, 32767, 32768, 65535, 65536, (1 << 17) - 1, 1 << 17, 1 << 20};
    const uint32_t rnd_edge[] = {0, 1, 0x7FFFFFFFu, 0x80000000u, 0xFFFFFFFFu, 0xFFFFFFFEu, 0x00010000u};
    const int32_t w_edge[] = {-128, -127, -1, 0, 1, 126, 127};
    for (int32_t e = -80; e <= 8; e++) {
        for (unsigned a = 0; a < sizeof acc_edge / sizeof acc_edge[0]; a++) {
            for (unsigned mi = 0; mi < sizeof m_edge / sizeof m_edge[0]; mi++) {
                for (unsigned ri = 0; ri < sizeof rnd_edge / sizeof rnd_edge[0]; ri++) {
                    for (unsigned wi = 0; wi < sizeof w_edge / sizeof w_edge[0]; wi++) {
                        check(w_edge[wi], acc_edge[a], m_edge[mi], e, rnd_edge[ri]);
                    }
                }
            }
        }
    }
    for (long i = 0; i < 4000000; i++) {
        const uint32_t u = next_u32();
        int32_t acc = (int32_t)(next_u32() & ((1u << 30) - 1)) >> (u & 31);
        acc = (u & 32) ? -acc : acc;
        const int32_t m = (int32_t)(next_u32() & ((1u << 17) - 1)) >> ((u >> 6) & 15);
        const int32_t e = -(int32_t)((u >> 10) % 90) + 8;
        const int32_t w = (int32_t)(int8_t)(next_u32() & 0xFF);
        /* small |acc * m / 2^s| too, so the rounding decides the result */
        check(w, acc, m, e, next_u32());
    }
    /* bias updates: |gsum| <= 2^22, any int32 b */
    for (long i = 0; i < 2000000; i++) {
        const uint32_t u = next_u32();
        int32_t acc = (int32_t)(next_u32() & ((1u << 22) - 1)) >> (u & 31);
        acc = (u & 32) ? -acc : acc;
        const int32_t m = (int32_t)(next_u32() & ((1u << 17) - 1)) >> ((u >> 6) & 15);
        const int32_t e = -(int32_t)((u >> 10) % 90) + 8;
        const int32_t bb = (u >> 20) & 1 ? (int32_t)next_u32() : (int32_t)(next_u32() & 0xFFFF) - 32768;
        const uint32_t rnd = next_u32();
        const int64_t want =
            tf_clamp_i32((int64_t)bb - tf_scaled_update(acc, m, e, rnd, INT32_MAX), INT32_MIN, INT32_MAX);
        checks++;
        if (upd_bias(bb, acc, m, e, rnd) != want && failures++ < 10) {
            printf("FAIL bias b=%d acc=%d m=%d e=%d rnd=%u\n", (int)bb, (int)acc, (int)m, (int)e, (unsigned)rnd);
        }
    }
    /* upd_sum_s8 against tf_sum_s8 */
    int8_t buf[300];
    for (int32_t n = 0; n < 300; n++) {
        for (int32_t i = 0; i < n; i++) {
            buf[i] = (int8_t)(next_u32() & 0xFF);
        }
        checks++;
        if (upd_sum_s8(buf, n) != tf_sum_s8(buf, n) && failures++ < 10) {
            printf("FAIL sum n=%d\n", (int)n);
        }
    }
    /* ADD, APPLY_MASK, GRAD_ACCUM against the reference copies */
    static int8_t a[261], b[261], y1[261], y2[261];
    static uint8_t m1[40], m2[40];
    for (int32_t t = 0; t < 20000; t++) {
        const int32_t n = (int32_t)(next_u32() % 261);
        for (int32_t i = 0; i < n; i++) {
            a[i] = (int8_t)next_u32();
            b[i] = (int8_t)next_u32();
        }
        const uint32_t u = next_u32();
        tf_add_params ap;
        ap.shift = 1 + (int32_t)(u % 62);
        ap.mult_a = (int32_t)(next_u32() >> (1 + (u >> 8) % 31)) * ((u >> 14) & 1 ? -1 : 1);
        ap.mult_b = (int32_t)(next_u32() >> (1 + (u >> 16) % 31));
        ap.a_offset = (int32_t)(next_u32() % 257) - 128;
        ap.b_offset = (int32_t)(next_u32() % 257) - 128;
        ap.output_offset = (int32_t)(next_u32() % 301) - 150;
        ap.act_min = -128 + (int32_t)((u >> 20) & 63);
        ap.act_max = 127 - (int32_t)((u >> 26) & 63);
        memset(m1, 0xA5, sizeof m1);
        memset(m2, 0xA5, sizeof m2);
        add_ref_all(&ap, n, a, b, y1, m1);
        tf_add_s8(&ap, n, a, b, y2, m2);
        checks++;
        if ((memcmp(y1, y2, (size_t)n) || memcmp(m1, m2, sizeof m1)) && failures++ < 10) {
            printf("FAIL add n=%d shift=%d\n", (int)n, (int)ap.shift);
        }
        int32_t x1 = 0, x2 = 0;
        const int32_t e1 = (int32_t)(next_u32() % 24) - 12, e2 = (int32_t)(next_u32() % 24) - 12;
        grad_accum_ref(n, a, e1, b, e2, y1, &x1);
        tf_grad_accum_s8(n, a, e1, b, e2, y2, &x2);
        checks++;
        if ((memcmp(y1, y2, (size_t)n) || x1 != x2) && failures++ < 10) {
            printf("FAIL grad_accum n=%d e1=%d e2=%d\n", (int)n, (int)e1, (int)e2);
        }
        for (int32_t i = 0; i < 40; i++) {
            m1[i] = (uint8_t)(next_u32() & next_u32() & 1 ? 0xFF : next_u32());
        }
        memcpy(y1, a, (size_t)n);
        memcpy(y2, a, (size_t)n);
        for (int32_t i = 0; i < n; i++) {
            if (!tf_mask_get(m1, i)) {
                y1[i] = 0;
            }
        }
        tf_apply_mask_s8(n, m1, y2);
        checks++;
        if (memcmp(y1, y2, (size_t)n) && failures++ < 10) {
            printf("FAIL apply_mask n=%d\n", (int)n);
        }
    }
    printf("update fast forms: %ld checks, %ld failures\n", checks, failures);
    return failures ? 1 : 0;
}
