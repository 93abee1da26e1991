/* Kernel micro-benchmark for test builds (-DTF_BENCH, command 0x7E): ticks of four representative kernels on
 * arena data. Used to measure instructions per MAC under QEMU -icount; not part of the production firmware. */
#ifdef TF_BENCH
#include <string.h>

#include "tf_board.h"
#include "tf_kernels.h"

#define TF_BENCH_N 4

#ifdef TF_PROFILE
#include "tf_runtime.h"
extern uint64_t tf_profile_ticks[TF_MAX_OPS];

/* Profiling builds (-DTF_BENCH -DTF_PROFILE): each call returns the ticks of the next 8 ops of the last TRAIN
 * step (tf_runtime.c), wrapping after TF_MAX_OPS; the kernels are not run. */
int32_t tf_bench_run(uint8_t *arena, uint32_t size, uint64_t *out) {
    static uint32_t next;
    (void)arena, (void)size;
    for (int i = 0; i < 8; i++) {
        out[i] = tf_profile_ticks[(next + (uint32_t)i) % TF_MAX_OPS];
    }
    next = (next + 8) % TF_MAX_OPS;
    return 8;
}
#else

/* out: TF_BENCH_N tick counts: linear 256->256, pointwise 16->16 @32x32, depthwise 3x3 16ch @32x32,
 * pointwise update 16->16 @32x32 (MACs: 65536, 262144, 147456, 262144). */
int32_t tf_bench_run(uint8_t *arena, uint32_t size, uint64_t *out) {
    if (size < 64 * 1024) {
        return -1;
    }
    int8_t *x = (int8_t *)arena, *w = x + 16384, *y = w + 65536 + 4096;
    int32_t *b = (int32_t *)(arena + 60000), *mult = b + 256, *shift = mult + 256;
    for (int32_t i = 0; i < 16384 + 65536; i++) {
        x[i] = (int8_t)((i * 37 + 11) % 255 - 127);
    }
    for (int32_t i = 0; i < 256; i++) {
        b[i] = i, mult[i] = 1 << 30, shift[i] = 40;
    }
    tf_per_channel_quant q = {mult, shift};
    tf_conv_params cp = {1, 1, 0, 0, 1, 3, -1, -128, 127};
    tf_dims lx = {256, 1, 1}, ly = {256, 1, 1};
    tf_filter_dims lw = {256, 256, 1, 1};
    uint64_t t0 = tf_board_ticks_aligned();
    tf_conv2d_s8(&cp, &q, &lx, x, &lw, w, b, &ly, y, NULL);
    out[0] = tf_board_ticks() - t0;
    tf_dims px = {16, 32, 32}, py = {16, 32, 32};
    tf_filter_dims pw = {16, 16, 1, 1};
    t0 = tf_board_ticks_aligned();
    tf_conv2d_s8(&cp, &q, &px, x, &pw, w, b, &py, y, NULL);
    out[1] = tf_board_ticks() - t0;
    tf_conv_params dp = {1, 1, 1, 1, 16, 3, -1, -128, 127};
    tf_filter_dims dw = {16, 1, 3, 3};
    t0 = tf_board_ticks_aligned();
    tf_conv2d_s8(&dp, &q, &px, x, &dw, w, b, &py, y, NULL);
    out[2] = tf_board_ticks() - t0;
    int32_t qm[16], qe[16];
    for (int i = 0; i < 16; i++) {
        qm[i] = 20000, qe[i] = -20;
    }
    tf_qas qas = {qm, qe, qm, qe};
    tf_conv_update_params up = {1, 1, 0, 0, 1, 16, 1, 1, 3, 20000, -20, 7, 1, 2};
    t0 = tf_board_ticks_aligned();
    tf_conv2d_update_s8(&up, &qas, &py, x, -10, &px, x + 4096, &pw, w, b);
    out[3] = tf_board_ticks() - t0;
    return TF_BENCH_N;
}
#endif /* TF_PROFILE */
#else
typedef int tf_bench_disabled; /* ISO C forbids an empty translation unit */
#endif
