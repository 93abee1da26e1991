/* Kernel entry points called directly with the hostile values fuzz_plan found (session 11), under UBSan: each
 * must refuse or answer without undefined behaviour. The runtime now refuses these plans before it calls the
 * kernels (tf_runtime.c run_patch); this checks the kernels themselves (firmware/src/kernels/, fixes proposed in
 * the session report). Built and run by tests/firmware/test_fuzz_kernel_edges.py; exit 0 when every case is
 * answered, a UBSan report (non-zero exit) otherwise. Test code only. */
#include <stdint.h>
#include <stdio.h>

#include "tf_kernels.h"

/* One 3x3 conv layer (1 -> 1 channel) then a 1x1 conv, over a 1 x 8 x 8 input, 2 x 2 tiles. */
typedef struct {
    int32_t kind[2], in_a[2], in_b[2], sh[2], sw[2], ph[2], pw[2], groups[2], lo[2], hi[2], zp[2], ma[2], mb[2], ash[2],
        fused[2], buf_off[2], mult[2], shift[2];
} table;

static void fill(const table *t, tf_patch_params *p, tf_patch_weights *wt, const int8_t *w, const int32_t *b) {
    const tf_patch_params q = {2,     2,     2,      2,        0,          t->kind, t->in_a, t->in_b,
                               t->sh, t->sw, t->ph,  t->pw,    t->groups,  t->lo,   t->hi,   t->zp,
                               t->ma, t->mb, t->ash, t->fused, t->buf_off, t->mult, t->shift};
    *p = q;
    const tf_filter_dims d0 = {1, 1, 3, 3}, d1 = {1, 1, 1, 1};
    wt->w[0] = w, wt->b[0] = b, wt->wd[0] = d0;
    wt->w[1] = w, wt->b[1] = b, wt->wd[1] = d1;
}

int main(void) {
    static const int8_t w[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    static const int32_t b[1] = {0};
    const tf_dims x = {1, 8, 8}, y = {1, 8, 8};
    tf_dims out[TF_PATCH_MAX_LAYERS];
    tf_patch_params p;
    tf_patch_weights wt;
    table t = {{0, 0}, {0, 1},       {-1, -1},           {1, 1},  {1, 1}, {1, 0}, {1, 0},
               {1, 1}, {-128, -128}, {127, 127},         {0, 0},  {0, 0}, {0, 0}, {0, 0},
               {0, 0}, {0, -1},      {1 << 30, 1 << 30}, {38, 38}};
    fill(&t, &p, &wt, w, b);
    /* the legal table: accepted; a 4 x 4 tile of the 1x1 layer needs a 1 x 4 x 4 region of the first */
    if (tf_patch_check(&p, &wt, &x, &y, out) != TF_OK || tf_patch_get_buffer_size(&p, &wt, out) != 16) {
        printf("legal table refused\n");
        return 2;
    }
    /* tf_patch_s8.c:57: src.h + 2 * pad_h with pad_h = 2^30 must be refused, not overflow */
    t.ph[0] = 1 << 30;
    fill(&t, &p, &wt, w, b);
    if (tf_patch_check(&p, &wt, &x, &y, out) == TF_OK) {
        printf("pad 2^30 accepted\n");
        return 2;
    }
    /* tf_patch_s8.c:164: buf_off + a tile's bytes with buf_off = 2^31 - 16: -1 or INT32_MAX, not a wrap */
    t.ph[0] = 1;
    t.buf_off[0] = INT32_MAX - 15;
    fill(&t, &p, &wt, w, b);
    if (tf_patch_check(&p, &wt, &x, &y, out) != TF_OK) {
        printf("buf_off table refused by the check\n");
        return 2;
    }
    const int32_t need = tf_patch_get_buffer_size(&p, &wt, out);
    if (need >= 0 && need != INT32_MAX) {
        printf("buffer size %d\n", need);
        return 2;
    }
    printf("ok\n");
    return 0;
}
