/* Host check of CONV2D_UPDATE's fast per-weight forms (UPD_MUL / UPD_SHIFT in tf_conv2d_update_s8.c) against
 * the reference tf_scaled_update + weight clamp, over random and edge inputs in the kernel's domain:
 * |acc| < 2^30, 0 <= m < 2^17 (and beyond, which must fall back to the reference), any e, any rnd, any int8 w. */
#include <stdio.h>

/* NOTE: the kernel file is compiled in here a second time under another name, so its static helpers are
 * reachable; the binary also links the normal CORE objects. */
#define tf_conv2d_update_s8 tf_conv2d_update_s8_copy
#include "../../src/kernels/tf_conv2d_update_s8.c"
#undef tf_conv2d_update_s8

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
    const int32_t acc_edge[] = {0, 1, -1, 2, -2, 127, -128, 32640, -32640, (1 << 30) - 1, -(1 << 30) + 1, 1 << 20,
                                -(1 << 20), 0x12345, -0x12345};
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
    printf("update fast forms: %ld checks, %ld failures\n", checks, failures);
    return failures ? 1 : 0;
}
