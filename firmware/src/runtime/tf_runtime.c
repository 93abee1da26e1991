/* Plan executor (see tf_runtime.h). One function per op does both the prepare checks (exec = 0, once at load)
 * and the work (exec = 1, every step), so a step can never run an op its prepare did not check.
 * (Over 400 lines for that reason: one such function per op type; splitting them apart would part each op's
 * checks from its work.) */
#include "tf_runtime.h"

#include <string.h>

#include "tf_kernels.h"
#include "tf_qmath.h"
#include "tf_recipe.h"
#include "tf_sha256.h"

#ifdef TF_PROFILE
#include "tf_board.h"
uint64_t tf_profile_ticks[TF_MAX_OPS]; /* profiling builds only: board ticks of each op in the last step */
#endif

#define MAX_ATTRS 20

typedef struct {
    const int32_t *v[MAX_ATTRS];
    int32_t n[MAX_ATTRS];
} attrs_t;

typedef struct {
    tf_tensor_info t;
    uint8_t *p;
    int32_t id;
} ten_t;

typedef struct {
    int32_t label, lr_m, lr_e;
    tf_step_result *res;
    int32_t apply, add; /* recipe: this sample ends a mini-batch; the scheduled rate is not zero */
} step_ctx;

static void parse_attrs(const tf_op_view *op, attrs_t *a) {
    const char *spec = tf_op_attr_spec(op->type);
    const int32_t *q = op->attrs;
    for (int i = 0; spec[i]; i++) {
        if (spec[i] == 'a') {
            a->n[i] = *q++;
            a->v[i] = q;
            q += a->n[i];
        } else {
            a->n[i] = 1;
            a->v[i] = q++;
        }
    }
}

static void get(const tf_runtime *rt, int32_t id, ten_t *x) {
    x->id = id;
    if (id < 0) {
        memset(&x->t, 0, sizeof(x->t));
        x->p = NULL;
        return;
    }
    tf_plan_tensor(&rt->plan, id, &x->t);
    x->p = rt->ptr[id];
}

static tf_dims dims3(const ten_t *x) {
    tf_dims d = {x->t.dims[0], x->t.rank >= 2 ? x->t.dims[1] : 1, x->t.rank >= 3 ? x->t.dims[2] : 1};
    return d;
}
static tf_filter_dims fdims(const ten_t *x) {
    tf_filter_dims d = {x->t.dims[0], x->t.dims[1], x->t.dims[2], x->t.dims[3]};
    return d;
}
static int is_act(const ten_t *x, int dtype) { return x->p && x->t.dtype == dtype && x->t.rank >= 1 && x->t.rank <= 3; }
static int writable(const ten_t *x) {
    return x->p && (x->t.kind == TF_K_ACTIVATION || x->t.kind == TF_K_GRADIENT || x->t.kind == TF_K_MASK);
}
static int is_filter(const ten_t *x) { return x->p && x->t.dtype == TF_DT_INT8 && x->t.rank == 4; }
static int is_vec32(const ten_t *x, int32_t n) { return x->p && x->t.dtype == TF_DT_INT32 && x->t.numel == n; }
static int act_range(int32_t lo, int32_t hi) { return -128 <= lo && lo <= hi && hi <= 127; }
static int shifts_ok(const int32_t *s, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        if (s[i] < 1 || s[i] > 62) {
            return 0;
        }
    }
    return 1;
}
static int exps_ok(const int32_t *e, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        if (e[i] < -TF_EXP_LIMIT || e[i] > TF_EXP_LIMIT) {
            return 0;
        }
    }
    return 1;
}
static int64_t bitlen32(int64_t v) {
    int64_t n = 0;
    for (uint64_t q = (uint64_t)(v < 0 ? -v : v); q; q >>= 1) {
        n++;
    }
    return n;
}

/* The bytes of x and y do not overlap (either may be NULL). */
static int apart(const ten_t *x, const ten_t *y) {
    return !x->p || !y->p || x->p + x->t.nbytes <= y->p || y->p + y->t.nbytes <= x->p;
}
static int mask_ok(const ten_t *m, int32_t numel) {
    return m->t.dtype == TF_DT_MASK && m->t.numel == numel && writable(m);
}

#define REQ(c)                                                                                                         \
    do {                                                                                                               \
        if (!(c)) {                                                                                                    \
            return TF_RT_BAD_OP;                                                                                       \
        }                                                                                                              \
    } while (0)
#define KERNEL(call)                                                                                                   \
    do {                                                                                                               \
        tf_status st_ = (call);                                                                                        \
        if (st_ != TF_OK) {                                                                                            \
            rt->err_status = (int32_t)st_;                                                                             \
            return TF_RT_KERNEL;                                                                                       \
        }                                                                                                              \
    } while (0)

static void move(uint8_t *dst, const uint8_t *src, uint32_t n) {
    if (dst != src) {
        memmove(dst, src, n);
    }
}

/* rt->scratch[i] <= GAP_BASE: op i uses the free arena gap at byte offset 8 * (GAP_BASE - scratch[i]). */
#define GAP_BASE (-2)
#define GAP_MAX_LIVE 64

/* Lowest 8-aligned arena offset of `need` bytes that no tensor live at op i touches, or -1. Lifetimes are the
 * planner's (fleet/compiler/planner.py buffers()): inclusive first..last op that names the tensor, INPUT and
 * LABEL from op 0, an op's scratch tensor at that op only. Bytes outside every live tensor hold nothing that is
 * read later, so a kernel may use them as scratch while op i runs. With *got < need: failing that, the offset
 * of the largest such gap of at least *got bytes, its size in *got (else *got = need). */
__attribute__((noinline)) static int32_t free_gap(const tf_runtime *rt, uint32_t i, uint32_t need, uint32_t *got) {
    uint8_t before[TF_MAX_TENSORS / 8], after[TF_MAX_TENSORS / 8];
    uint32_t lo[GAP_MAX_LIVE], hi[GAP_MAX_LIVE], n_live = 0;
    memset(before, 0, sizeof(before));
    memset(after, 0, sizeof(after));
#define MARK(set, t) ((set)[(uint32_t)(t) >> 3] |= (uint8_t)(1u << ((uint32_t)(t)&7)))
#define HAS(set, t) (((set)[(uint32_t)(t) >> 3] >> ((uint32_t)(t)&7)) & 1)
    for (uint32_t j = 0; j < rt->plan.n_ops; j++) {
        tf_op_view op;
        tf_plan_op(&rt->plan, rt->op_off[j], &op);
        for (int k = 0; k <= op.n_in + op.n_out; k++) {
            const int32_t t = k < op.n_in + op.n_out ? op.ids[k] : rt->scratch[j];
            if (t < 0 || (uint32_t)t >= rt->plan.n_tensors) {
                continue;
            }
            if (j <= i) {
                MARK(before, t);
            }
            if (j >= i) {
                MARK(after, t);
            }
        }
    }
    if (rt->plan.input_id >= 0) {
        MARK(before, rt->plan.input_id);
    }
    if (rt->plan.label_id >= 0) {
        MARK(before, rt->plan.label_id);
    }
    for (uint32_t t = 0; t < rt->plan.n_tensors; t++) {
        if (!HAS(before, t) || !HAS(after, t)) {
            continue;
        }
        tf_tensor_info ti;
        tf_plan_tensor(&rt->plan, (int32_t)t, &ti);
        if (ti.kind == TF_K_CONST || ti.kind == TF_K_TRAINABLE || ti.offset < 0 || ti.nbytes == 0) {
            continue;
        }
        if (n_live == GAP_MAX_LIVE) {
            return -1;
        }
        lo[n_live] = (uint32_t)ti.offset;
        hi[n_live++] = (uint32_t)ti.offset + ti.nbytes;
    }
#undef MARK
#undef HAS
    int32_t best = -1, part = -1;
    uint32_t part_len = *got;
    for (uint32_t c = 0; c <= n_live; c++) { /* candidates: offset 0 and the end of every live tensor */
        const uint32_t start = c == n_live ? 0 : (hi[c] + 7u) & ~7u;
        if (start >= rt->plan.arena_bytes || start / 8 > (uint32_t)(GAP_BASE - INT16_MIN)) {
            continue;
        }
        uint32_t end = rt->plan.arena_bytes; /* the gap from start: up to the next live tensor */
        for (uint32_t k = 0; k < n_live; k++) {
            end = lo[k] <= start && start < hi[k] ? start : (lo[k] > start && lo[k] < end ? lo[k] : end);
        }
        if (end - start >= need && (best < 0 || start < (uint32_t)best)) {
            best = (int32_t)start;
        } else if (end - start >= part_len && end - start < need && (part < 0 || end - start > part_len)) {
            part = (int32_t)start, part_len = end - start;
        }
    }
    *got = best >= 0 || part < 0 ? need : part_len;
    return best >= 0 ? best : part;
}

/* The optimizer slot of the CONV2D_UPDATE at op i (slots in op order): at prepare (rt->opt_cursor advancing) its
 * offsets must be the canonical layout (recipe.layout_optimizer): wbuf (4 B per trained weight) and bbuf (4 B per
 * bias) when accum_steps > 1 or momentum, frac (F/8 B per trained weight, padded to 4) when F > 0, -1 otherwise.
 * Fills the state pointers. */
static int recipe_slot(tf_runtime *rt, uint32_t i, const tf_filter_dims *wd, int32_t groups, int32_t k, int uw, int ub,
                       tf_recipe_state *rs) {
    const tf_plan *pl = &rt->plan;
    if (rt->slot_next >= pl->n_slots || groups < 1 || wd->n % groups) {
        return TF_RT_BAD_OP;
    }
    const uint8_t *sl = pl->blob + pl->slots_off + 16 * rt->slot_next++;
    if (tf_ld_u32(sl) != i) {
        return TF_RT_BAD_OP;
    }
    int64_t nw = 0;
    const int32_t per_group = wd->n / groups;
    for (int32_t c = 0; uw && c < wd->n; c++) {
        const int32_t left = k - (c / per_group) * wd->c;
        nw += left <= 0 ? 0 : left < wd->c ? left : wd->c;
    }
    nw *= (int64_t)wd->h * wd->w;
    const int buf = pl->accum_steps > 1 || pl->beta_q15 > 0;
    const int64_t sizes[3] = {4 * nw, ub ? 4 * (int64_t)wd->n : 0, nw * (int64_t)pl->frac_bits / 8};
    const int present[3] = {buf && nw > 0, buf && sizes[1] > 0, pl->frac_bits > 0 && nw > 0};
    void *ptr[3];
    for (int j = 0; j < 3; j++) {
        const int32_t off = (int32_t)tf_ld_u32(sl + 4 + 4 * j);
        ptr[j] = NULL;
        if (!present[j]) {
            if (off != -1) {
                return TF_RT_BAD_OP;
            }
            continue;
        }
        if (off < 0 || (uint32_t)off != rt->opt_cursor || (uint64_t)off + (uint64_t)sizes[j] > pl->opt_bytes) {
            return TF_RT_BAD_OP;
        }
        rt->opt_cursor = (uint32_t)off + (uint32_t)((sizes[j] + 3) & ~3);
        ptr[j] = rt->opt + off;
    }
    rs->beta_q15 = (int32_t)pl->beta_q15;
    rs->frac_bits = (int32_t)pl->frac_bits;
    rs->apply = rs->add = 0;
    rs->wbuf = (int32_t *)ptr[0];
    rs->bbuf = (int32_t *)ptr[1];
    rs->frac = ptr[2];
    return TF_RT_OK;
}

/* PATCH (attrs = ir.OP_ATTRS[PATCH]: tiles_h, tiles_w, then 18 arrays): the layer table, its conv weights from
 * inputs 1.. in (w, b) pairs, checked by tf_patch_check; scratch = tf_patch_get_buffer_size. Its own frame so
 * the table's stack is live only while a PATCH op runs. */
static __attribute__((noinline)) int run_patch(tf_runtime *rt, const tf_op_view *op, const attrs_t *a, const ten_t *x,
                                               const ten_t *y, const tf_ctx *ctx, int exec) {
    tf_patch_weights wt;
    tf_dims out[TF_PATCH_MAX_LAYERS];
    const int32_t n = a->n[2];
    if (n < 1 || n > TF_PATCH_MAX_LAYERS) {
        return TF_RT_BAD_OP;
    }
    for (int k = 3; k < 18; k++) {
        if (a->n[k] != n) {
            return TF_RT_BAD_OP;
        }
    }
    /* NOTE: tf_patch_check computes each conv layer's span (h + 2 pad - kh) in int32 before its conv check
     * refuses the pad: pads are bounded first, as tf_conv_check bounds them (0 <= pad <= kernel; a fuzzed pad of
     * 2^30 overflowed there) */
    int32_t wi = 1, ch = 0;
    for (int32_t l = 0; l < n; l++) {
        wt.w[l] = NULL, wt.b[l] = NULL;
        memset(&wt.wd[l], 0, sizeof(wt.wd[l]));
        if (a->v[2][l] != 0) {
            continue;
        }
        ten_t w, b;
        if (wi + 1 >= op->n_in) {
            return TF_RT_BAD_OP;
        }
        get(rt, op->ids[wi], &w);
        get(rt, op->ids[wi + 1], &b);
        if (!is_filter(&w) || !is_vec32(&b, w.t.dims[0])) {
            return TF_RT_BAD_OP;
        }
        if (a->v[7][l] < 0 || a->v[7][l] > w.t.dims[2] || a->v[8][l] < 0 || a->v[8][l] > w.t.dims[3]) {
            return TF_RT_BAD_OP;
        }
        wt.w[l] = (const int8_t *)w.p, wt.b[l] = (const int32_t *)(const void *)b.p, wt.wd[l] = fdims(&w);
        ch += w.t.dims[0];
        wi += 2;
    }
    if (wi != op->n_in || a->n[18] != ch || a->n[19] != ch) {
        return TF_RT_BAD_OP;
    }
    const tf_patch_params p = {n,        *a->v[0], *a->v[1], ch,       -x->t.zero_point, a->v[2],  a->v[3],  a->v[4],
                               a->v[5],  a->v[6],  a->v[7],  a->v[8],  a->v[9],          a->v[10], a->v[11], a->v[12],
                               a->v[13], a->v[14], a->v[15], a->v[16], a->v[17],         a->v[18], a->v[19]};
    const tf_dims xd = dims3(x), yd = dims3(y);
    if (tf_patch_check(&p, &wt, &xd, &yd, out) != TF_OK) {
        return TF_RT_BAD_OP;
    }
    /* NOTE: tf_patch_get_buffer_size computes tile bounds (ti + 1) x H and sums buf_off + a tile's buffer in
     * int32: tiles x H (W) must fit, and a layer whose whole buffer at its buf_off passes 2^31 - 1 bytes is
     * refused (engine/patch.py refuses the same), so neither can wrap */
    if ((int64_t)p.tiles_h * yd.h > INT32_MAX || (int64_t)p.tiles_w * yd.w > INT32_MAX) {
        return TF_RT_BAD_OP;
    }
    for (int32_t l = 0; l + 1 < n; l++) {
        const int64_t whole = (int64_t)(a->v[16][l] ? 1 : out[l].c) * out[l].h * out[l].w;
        if (a->v[17][l] + whole > INT32_MAX) {
            return TF_RT_NO_SCRATCH;
        }
    }
    const int32_t need = tf_patch_get_buffer_size(&p, &wt, out);
    if (need < 0 || ctx->size < need) {
        return TF_RT_NO_SCRATCH;
    }
    if (exec) {
        KERNEL(tf_patch_s8(ctx, &p, &wt, &xd, (const int8_t *)x->p, &yd, (int8_t *)y->p));
    }
    return TF_RT_OK;
}

static int run_op(tf_runtime *rt, uint32_t i, int exec, const step_ctx *sc) {
    tf_op_view op;
    attrs_t a;
    ten_t in[5], out[2];
    tf_plan_op(&rt->plan, rt->op_off[i], &op);
    parse_attrs(&op, &a);
    for (int k = 0; k < op.n_in && k < 5; k++) { /* PATCH reads its weight inputs itself (run_patch) */
        get(rt, op.ids[k], &in[k]);
    }
    for (int k = 0; k < op.n_out; k++) {
        get(rt, op.ids[op.n_in + k], &out[k]);
    }
    const ten_t *y = &out[0];
    tf_ctx ctx = {NULL, 0};
    if (rt->scratch[i] >= 0) {
        ten_t s;
        get(rt, rt->scratch[i], &s);
        ctx.buf = s.p;
        ctx.size = (int32_t)s.t.nbytes;
    }
#define A(k) (*a.v[k])
    switch (op.type) {
    case TF_OP_CONV2D: {
        REQ(is_act(&in[0], TF_DT_INT8) && is_filter(&in[1]) && is_vec32(&in[2], in[1].t.dims[0]));
        REQ(is_act(y, TF_DT_INT8) && writable(y) && (op.n_out < 2 || mask_ok(&out[1], y->t.numel)));
        const tf_dims xd = dims3(&in[0]), yd = dims3(y);
        const tf_filter_dims wd = fdims(&in[1]);
        REQ(a.n[7] == wd.n && a.n[8] == wd.n && shifts_ok(a.v[8], wd.n) && act_range(A(5), A(6)));
        REQ(tf_conv_check(&xd, &wd, &yd, A(4), A(0), A(1), A(2), A(3)) == TF_OK);
        if (exec) {
            const tf_conv_params p = {A(0), A(1), A(2), A(3), A(4), -in[0].t.zero_point, y->t.zero_point, A(5), A(6)};
            const tf_per_channel_quant q = {a.v[7], a.v[8]};
            KERNEL(tf_conv2d_s8(&p, &q, &xd, (const int8_t *)in[0].p, &wd, (const int8_t *)in[1].p,
                                (const int32_t *)(const void *)in[2].p, &yd, (int8_t *)y->p,
                                op.n_out > 1 ? out[1].p : NULL));
        }
        return TF_RT_OK;
    }
    case TF_OP_ADD: {
        const int32_t n = y->t.numel;
        REQ(is_act(&in[0], TF_DT_INT8) && is_act(&in[1], TF_DT_INT8) && in[0].t.numel == n && in[1].t.numel == n);
        REQ(is_act(y, TF_DT_INT8) && writable(y) && (op.n_out < 2 || mask_ok(&out[1], n)));
        REQ(A(2) >= 1 && A(2) <= 62 && act_range(A(3), A(4)));
        if (exec) {
            const tf_add_params p = {
                -in[0].t.zero_point, -in[1].t.zero_point, A(0), A(1), A(2), y->t.zero_point, A(3), A(4)};
            KERNEL(tf_add_s8(&p, n, (const int8_t *)in[0].p, (const int8_t *)in[1].p, (int8_t *)y->p,
                             op.n_out > 1 ? out[1].p : NULL));
        }
        return TF_RT_OK;
    }
    case TF_OP_AVGPOOL: {
        REQ(is_act(&in[0], TF_DT_INT8) && is_act(y, TF_DT_INT8) && writable(y) && y->t.numel == in[0].t.dims[0]);
        REQ(A(1) >= 1 && A(1) <= 62);
        if (exec) {
            const tf_avgpool_params p = {-in[0].t.zero_point, y->t.zero_point, A(0), A(1)};
            const tf_dims xd = dims3(&in[0]);
            KERNEL(tf_avgpool_s8(&p, &xd, (const int8_t *)in[0].p, (int8_t *)y->p));
        }
        return TF_RT_OK;
    }
    case TF_OP_RESHAPE:
    case TF_OP_RESHAPE_BWD: {
        REQ(in[0].p && writable(y) && y->t.dtype == in[0].t.dtype && y->t.numel == in[0].t.numel);
        if (exec) {
            move(y->p, in[0].p, y->t.nbytes);
            rt->exp[y->id] = rt->exp[in[0].id];
        }
        return TF_RT_OK;
    }
    case TF_OP_EMBEDDING: {
        const ten_t *ids = &in[0], *tab = &in[1];
        REQ(ids->p && ids->t.dtype == TF_DT_INT32 && ids->t.rank == 1 && tab->p && tab->t.dtype == TF_DT_INT8 &&
            tab->t.rank == 2);
        REQ(writable(y) && y->t.dtype == TF_DT_INT8 && y->t.numel == (int64_t)tab->t.dims[1] * ids->t.numel);
        /* NOTE: the kernel checks every id, then writes y while reading ids again: y over the ids would turn the
         * checked ids into unchecked ones (fuzz_plan: ids at arena offset 16 inside y, an id of 4e8 read) */
        REQ(apart(ids, y) && apart(tab, y));
        if (exec) {
            KERNEL(tf_embedding_s8(tab->t.dims[0], tab->t.dims[1], ids->t.numel, (const int32_t *)(const void *)ids->p,
                                   (const int8_t *)tab->p, (int8_t *)y->p));
        }
        return TF_RT_OK;
    }
    case TF_OP_CLAMP: {
        const int32_t n = y->t.numel;
        REQ(is_act(&in[0], TF_DT_INT8) && in[0].t.numel == n && is_act(y, TF_DT_INT8) && writable(y));
        REQ((op.n_out < 2 || mask_ok(&out[1], n)) && act_range(A(0), A(1)));
        if (exec) {
            KERNEL(tf_clamp_s8(A(0), A(1), n, (const int8_t *)in[0].p, (int8_t *)y->p, op.n_out > 1 ? out[1].p : NULL));
        }
        return TF_RT_OK;
    }
    case TF_OP_SAVE_CHANNELS: {
        const tf_dims xd = dims3(&in[0]), yd = dims3(y);
        REQ(is_act(&in[0], TF_DT_INT8) && is_act(y, TF_DT_INT8) && writable(y));
        REQ(A(0) >= 0 && A(0) <= xd.c && yd.c == A(0) && yd.h == xd.h && yd.w == xd.w);
        if (exec) {
            move(y->p, in[0].p, (uint32_t)(A(0) * xd.h * xd.w));
        }
        return TF_RT_OK;
    }
    case TF_OP_PWDW: {
        REQ(is_act(&in[0], TF_DT_INT8) && is_filter(&in[1]) && is_filter(&in[3]) && is_act(y, TF_DT_INT8) &&
            writable(y));
        const tf_dims xd = dims3(&in[0]), yd = dims3(y);
        const tf_filter_dims pw = fdims(&in[1]), dw = fdims(&in[3]);
        REQ(is_vec32(&in[2], pw.n) && is_vec32(&in[4], dw.n) && pw.c == xd.c && pw.h == 1 && pw.w == 1);
        REQ(a.n[2] == pw.n && a.n[3] == pw.n && a.n[11] == dw.n && a.n[12] == dw.n && shifts_ok(a.v[3], pw.n) &&
            shifts_ok(a.v[12], dw.n) && act_range(A(0), A(1)) && act_range(A(9), A(10)) && A(4) >= -128 && A(4) <= 127);
        const tf_dims mid = {pw.n, xd.h, xd.w};
        REQ(tf_conv_check(&mid, &dw, &yd, pw.n, A(5), A(6), A(7), A(8)) == TF_OK);
        /* NOTE: four expanded channels per pass (their 1x1 shares every x unpack) where a free arena gap holds
         * 4 x H x W bytes (free_gap, found once at load, as for CONV2D_BWD_INPUT); else one channel at a time
         * in the planner's H x W scratch. Same numbers, no extra SRAM. */
        const int64_t need4 = 4 * (int64_t)tf_pwdw_get_buffer_size(&xd);
        if (!exec && rt->scratch[i] >= 0 && pw.n >= 4 && need4 <= INT32_MAX) {
            uint32_t got = (uint32_t)need4;
            const int32_t off = free_gap(rt, i, (uint32_t)need4, &got);
            rt->scratch[i] = off >= 0 ? (int16_t)(GAP_BASE - off / 8) : rt->scratch[i];
        }
        if (rt->scratch[i] <= GAP_BASE) {
            ctx.buf = rt->arena + 8 * (uint32_t)(GAP_BASE - rt->scratch[i]);
            ctx.size = (int32_t)need4;
        }
        if (ctx.size < tf_pwdw_get_buffer_size(&xd)) {
            return TF_RT_NO_SCRATCH;
        }
        if (exec) {
            const tf_pwdw_params p = {-in[0].t.zero_point,
                                      A(0),
                                      A(1),
                                      a.v[2],
                                      a.v[3],
                                      A(4),
                                      A(5),
                                      A(6),
                                      A(7),
                                      A(8),
                                      A(9),
                                      A(10),
                                      a.v[11],
                                      a.v[12],
                                      y->t.zero_point};
            KERNEL(tf_pwdw_s8(&ctx, &p, &xd, (const int8_t *)in[0].p, &pw, (const int8_t *)in[1].p,
                              (const int32_t *)(const void *)in[2].p, &dw, (const int8_t *)in[3].p,
                              (const int32_t *)(const void *)in[4].p, &yd, (int8_t *)y->p));
        }
        return TF_RT_OK;
    }
    case TF_OP_PATCH:
        REQ(is_act(&in[0], TF_DT_INT8) && is_act(y, TF_DT_INT8) && writable(y));
        return run_patch(rt, &op, &a, &in[0], y, &ctx, exec);
    case TF_OP_SOFTMAX_CE: {
        const int32_t k = in[0].t.numel;
        REQ(is_act(&in[0], TF_DT_INT8) && k <= TF_MAX_CLASSES && in[1].p && in[1].t.dtype == TF_DT_INT32);
        REQ(writable(y) && y->t.dtype == TF_DT_INT8 && y->t.numel == k && a.n[0] == 256);
        if (!exec) {
            rt->n_classes = k;
            return TF_RT_OK;
        }
        memcpy(rt->logits, in[0].p, (uint32_t)k);
        tf_ce_result r;
        int32_t label;
        memcpy(&label, in[1].p, 4);
        KERNEL(tf_softmax_ce_s8(a.v[0], k, (const int8_t *)in[0].p, label, (int8_t *)y->p, &rt->exp[y->id], &r));
        if (sc && sc->res) {
            sc->res->correct = r.correct;
            sc->res->p_label_q15 = r.p_label_q15;
        }
        return TF_RT_OK;
    }
    case TF_OP_APPLY_MASK: {
        const int32_t n = y->t.numel;
        REQ(in[0].p && in[0].t.dtype == TF_DT_INT8 && in[0].t.numel == n && in[1].p && in[1].t.dtype == TF_DT_MASK &&
            in[1].t.numel == n && writable(y) && y->t.dtype == TF_DT_INT8);
        if (exec) {
            move(y->p, in[0].p, (uint32_t)n);
            rt->exp[y->id] = rt->exp[in[0].id];
            KERNEL(tf_apply_mask_s8(n, in[1].p, (int8_t *)y->p));
        }
        return TF_RT_OK;
    }
    case TF_OP_CONV2D_BWD_INPUT: {
        REQ(is_act(&in[0], TF_DT_INT8) && is_filter(&in[1]) && is_act(y, TF_DT_INT8) && writable(y));
        const tf_dims gy = dims3(&in[0]), gx = dims3(y);
        const tf_filter_dims wd = fdims(&in[1]);
        REQ(a.n[5] == wd.n && exps_ok(a.v[6], 1) &&
            tf_conv_check(&gx, &wd, &gy, A(4), A(0), A(1), A(2), A(3)) == TF_OK);
        const tf_conv_bwd_params p = {A(0), A(1), A(2), A(3), A(4), A(6)};
        /* NOTE: the planner gives this op no scratch; the one-pass kernel paths use arena bytes that no tensor
         * live at this op occupies (free_gap), found once at load: same numbers, no extra SRAM. */
        int32_t need = tf_conv2d_bwd_input_fast_buffer_size(&p, &wd, &gx);
        need = need >= 0 ? need : tf_conv2d_bwd_input_get_buffer_size(&gy, &gx, 1);
        /* NOTE: failing a gap of `need` bytes, the largest of at least need / 256: the kernels' chunked path keeps
         * what fits and computes the rest twice (gap_frac: its size as need x frac / 256, rounded down to 8) */
        if (!exec && rt->scratch[i] < 0) {
            uint32_t got = (uint32_t)need / 256 + 8;
            const int32_t off = free_gap(rt, i, (uint32_t)need, &got);
            rt->scratch[i] = (int16_t)(off >= 0 ? GAP_BASE - off / 8 : -1);
            rt->gap_frac[i] = (uint8_t)(got < (uint32_t)need ? (uint64_t)got * 256 / (uint32_t)need : 0);
        }
        if (rt->scratch[i] <= GAP_BASE) {
            ctx.buf = rt->arena + 8 * (uint32_t)(GAP_BASE - rt->scratch[i]);
            ctx.size = rt->gap_frac[i] ? (int32_t)(((uint64_t)need * rt->gap_frac[i] / 256) & ~7u) : need;
        }
        if (exec) {
            KERNEL(tf_conv2d_bwd_input_s8(&ctx, &p, a.v[5], &gy, (const int8_t *)in[0].p, rt->exp[in[0].id], &wd,
                                          (const int8_t *)in[1].p, &gx, (int8_t *)y->p, &rt->exp[y->id]));
        }
        return TF_RT_OK;
    }
    case TF_OP_CONV2D_UPDATE: {
        const ten_t *g = &in[0], *xs = &in[1], *w = &in[2], *b = &in[3];
        REQ(is_act(g, TF_DT_INT8) && is_filter(w) && is_vec32(b, w->t.dims[0]));
        const tf_filter_dims wd = fdims(w);
        const tf_dims gy = dims3(g);
        const int32_t k = A(5);
        const int uw = A(6) && k > 0, ub = A(7) != 0;
        REQ(a.n[8] == wd.n && a.n[9] == wd.n && a.n[10] == wd.n && a.n[11] == wd.n && gy.c == wd.n);
        REQ(exps_ok(a.v[9], wd.n) && exps_ok(a.v[11], wd.n)); /* qas_w_e, qas_b_e: summed with lr_e and e_y */
        tf_dims xd = {0, 0, 0};
        if (uw) {
            /* NOTE: groups <= C_out (tf_conv_check's C_out % groups refuses more) is checked before the product */
            REQ(is_act(xs, TF_DT_INT8) && w->t.kind == TF_K_TRAINABLE && xs->t.dims[0] >= k && A(4) >= 1 &&
                A(4) <= wd.n);
            xd = dims3(xs);
            xd.c = wd.c * A(4);
            REQ(k <= xd.c && tf_conv_check(&xd, &wd, &gy, A(4), A(0), A(1), A(2), A(3)) == TF_OK);
        }
        REQ(!ub || b->t.kind == TF_K_TRAINABLE);
        tf_recipe_state rs;
        if (rt->plan.has_recipe) {
            REQ(recipe_slot(rt, i, &wd, A(4), k, uw, ub, &rs) == TF_RT_OK);
        }
        if (exec && (uw || ub)) {
            const tf_conv_update_params p = {A(0),
                                             A(1),
                                             A(2),
                                             A(3),
                                             A(4),
                                             k,
                                             uw,
                                             ub,
                                             uw ? -xs->t.zero_point : 0,
                                             sc->lr_m,
                                             sc->lr_e,
                                             rt->step,
                                             (uint32_t)w->id,
                                             (uint32_t)b->id};
            const tf_qas q = {a.v[8], a.v[9], a.v[10], a.v[11]};
            if (rt->plan.has_recipe) {
                /* NOTE: the recipe's per-sample delta is rshift_round(clamp(sum m, +-2^56), -(e + bits)): a left
                 * shift that could take the largest sum (2^30 weights, 2^22 bias) x m past 2^62 is refused (UB in
                 * C, a wrap in the reference's numpy), as by engine/recipe.py fixed_delta (fuzz_plan: a plan's
                 * qas_b_e made it a shift of 249 bits) */
                for (int32_t c = 0; sc->add && c < wd.n; c++) {
                    const int64_t e = (int64_t)sc->lr_e + 15 + rt->exp[g->id];
                    if ((uw && e + a.v[9][c] + TF_RECIPE_ACC_BITS_W + TF_RECIPE_ACC_MAX_BITS_W +
                                       bitlen32(tf_rshift_round((int64_t)sc->lr_m * a.v[8][c], 15)) >
                                   62) ||
                        (ub && e + a.v[11][c] + TF_RECIPE_ACC_BITS_B + TF_RECIPE_ACC_MAX_BITS_B +
                                       bitlen32(tf_rshift_round((int64_t)sc->lr_m * a.v[10][c], 15)) >
                                   62)) {
                        rt->err_status = (int32_t)TF_ERR_OVERFLOW;
                        return TF_RT_KERNEL;
                    }
                }
                rs.apply = sc->apply;
                rs.add = sc->add;
                KERNEL(tf_conv2d_update_recipe_s8(&p, &q, &rs, &gy, (const int8_t *)g->p, rt->exp[g->id],
                                                  uw ? &xd : NULL, uw ? (const int8_t *)xs->p : NULL, &wd,
                                                  uw ? (int8_t *)w->p : NULL, ub ? (int32_t *)(void *)b->p : NULL));
            } else {
                KERNEL(tf_conv2d_update_s8(&p, &q, &gy, (const int8_t *)g->p, rt->exp[g->id], uw ? &xd : NULL,
                                           uw ? (const int8_t *)xs->p : NULL, &wd, uw ? (int8_t *)w->p : NULL,
                                           ub ? (int32_t *)(void *)b->p : NULL));
            }
        }
        return TF_RT_OK;
    }
    case TF_OP_GRAD_ACCUM: {
        const int32_t n = y->t.numel;
        REQ(in[0].p && in[1].p && in[0].t.dtype == TF_DT_INT8 && in[1].t.dtype == TF_DT_INT8 && in[0].t.numel == n &&
            in[1].t.numel == n && writable(y) && y->t.dtype == TF_DT_INT8);
        if (exec) {
            KERNEL(tf_grad_accum_s8(n, (const int8_t *)in[0].p, rt->exp[in[0].id], (const int8_t *)in[1].p,
                                    rt->exp[in[1].id], (int8_t *)y->p, &rt->exp[y->id]));
        }
        return TF_RT_OK;
    }
    case TF_OP_AVGPOOL_BWD: {
        REQ(is_act(&in[0], TF_DT_INT8) && is_act(y, TF_DT_INT8) && writable(y) && in[0].t.numel == y->t.dims[0]);
        if (exec) {
            const tf_dims gx = dims3(y);
            KERNEL(tf_avgpool_bwd_s8(A(0), &gx, (const int8_t *)in[0].p, rt->exp[in[0].id], (int8_t *)y->p,
                                     &rt->exp[y->id]));
        }
        return TF_RT_OK;
    }
    case TF_OP_EMBEDDING_UPDATE: {
        const ten_t *g = &in[0], *ids = &in[1], *tab = &in[2];
        REQ(g->p && g->t.dtype == TF_DT_INT8 && ids->p && ids->t.dtype == TF_DT_INT32 && tab->p &&
            tab->t.kind == TF_K_TRAINABLE && tab->t.dtype == TF_DT_INT8 && tab->t.rank == 2 && exps_ok(a.v[1], 1) &&
            g->t.numel == (int64_t)tab->t.dims[1] * ids->t.numel);
        if (exec) {
            const tf_embedding_update_params p = {A(0), A(1), sc->lr_m, sc->lr_e, rt->step, (uint32_t)tab->id};
            KERNEL(tf_embedding_update_s8(&p, tab->t.dims[0], tab->t.dims[1], ids->t.numel, (const int8_t *)g->p,
                                          rt->exp[g->id], (const int32_t *)(const void *)ids->p, (int8_t *)tab->p));
        }
        return TF_RT_OK;
    }
    default:
        return TF_RT_BAD_OP;
    }
#undef A
}

static uint32_t align_up(uint32_t n, uint32_t a) { return (n + a - 1) / a * a; }

uint32_t tf_runtime_pool_need(const tf_plan *plan) {
    /* NOTE: summed in 64 bits and saturated: arena (< 2^31) + trainables could pass 2^32 and wrap below the pool */
    uint64_t need = ((uint64_t)plan->arena_bytes + 7) & ~7ull;
    for (uint32_t i = 0; i < plan->n_tensors; i++) {
        tf_tensor_info t;
        tf_plan_tensor(plan, (int32_t)i, &t);
        if (t.kind == TF_K_TRAINABLE) {
            need += ((uint64_t)t.nbytes + 3) & ~3ull;
        }
    }
    need += plan->has_recipe ? plan->opt_bytes : 0;
    return need > 0xFFFFFFFFull ? 0xFFFFFFFFu : (uint32_t)need;
}

void tf_runtime_reset_optimizer(tf_runtime *rt) {
    if (rt->plan.has_recipe) {
        memset(rt->opt, 0, rt->plan.opt_bytes);
    }
    rt->pending = 0;
}

void tf_runtime_reset_params(tf_runtime *rt) {
    tf_runtime_reset_optimizer(rt);
    for (uint32_t i = 0; i < rt->plan.n_tensors; i++) {
        tf_tensor_info t;
        tf_plan_tensor(&rt->plan, (int32_t)i, &t);
        if (t.kind == TF_K_TRAINABLE) {
            memcpy(rt->ptr[i], rt->plan.blob + t.data_off, t.nbytes);
        }
    }
}

/* Scratch tensors are named "<op name>#<op index>.scratch" (fleet/compiler/planner.py add_scratch). */
static int32_t scratch_op_index(const char *s, uint32_t n) {
    static const char suffix[] = ".scratch";
    const uint32_t ls = sizeof(suffix) - 1;
    if (n <= ls || memcmp(s + n - ls, suffix, ls) != 0) {
        return -1;
    }
    uint32_t end = n - ls, j = end;
    while (j > 0 && s[j - 1] >= '0' && s[j - 1] <= '9') {
        j--;
    }
    if (j == end || j == 0 || s[j - 1] != '#' || end - j > 5) {
        return -1;
    }
    int32_t v = 0;
    for (uint32_t q = j; q < end; q++) {
        v = v * 10 + (s[q] - '0');
    }
    return v;
}

int tf_runtime_load(tf_runtime *rt, const tf_plan *plan, uint8_t *pool, uint32_t pool_size, int copy_params) {
    memset(rt, 0, sizeof(*rt));
    rt->plan = *plan;
    rt->err_op = -1;
    tf_content_hash(plan->blob, plan->blob_len, rt->plan_hash);
    if (plan->n_tensors > TF_MAX_TENSORS || plan->n_ops > TF_MAX_OPS) {
        return TF_RT_TOO_BIG;
    }
    if (tf_runtime_pool_need(plan) > pool_size) {
        return TF_RT_NO_MEMORY;
    }
    rt->arena = pool;
    rt->params = pool + align_up(plan->arena_bytes, 8);
    uint32_t off = 0;
    for (uint32_t i = 0; i < plan->n_tensors; i++) {
        tf_tensor_info t;
        tf_plan_tensor(plan, (int32_t)i, &t);
        if (t.kind == TF_K_TRAINABLE) {
            rt->ptr[i] = rt->params + off;
            off += align_up(t.nbytes, 4);
            rt->n_trainable++;
        } else if (t.kind == TF_K_CONST) {
            rt->ptr[i] = (uint8_t *)(uintptr_t)(plan->blob + t.data_off); /* read only: never an op output */
        } else if (t.offset >= 0) {
            rt->ptr[i] = rt->arena + t.offset;
        }
    }
    rt->params_bytes = off;
    rt->opt = rt->params + off; /* 4-aligned: the arena part is 8-aligned, every copy 4-aligned */
    uint32_t pos = plan->ops_off;
    for (uint32_t i = 0; i < plan->n_ops; i++) {
        rt->op_off[i] = pos;
        rt->scratch[i] = -1;
        rt->gap_frac[i] = 0;
        pos += tf_ld_u32(plan->blob + pos + 4);
    }
    for (uint32_t i = 0; i < plan->n_tensors; i++) {
        uint32_t n;
        const char *s = tf_plan_string(plan, 2 + i, &n);
        int32_t oi = scratch_op_index(s, n);
        if (oi >= 0 && (uint32_t)oi < plan->n_ops && rt->ptr[i]) {
            rt->scratch[oi] = (int16_t)i;
        }
    }
    tf_tensor_info tin;
    tf_plan_tensor(plan, plan->input_id, &tin);
    if (!rt->ptr[plan->input_id] || tin.kind != TF_K_INPUT || (plan->label_id >= 0 && !rt->ptr[plan->label_id])) {
        return TF_RT_BAD_OP;
    }
    for (uint32_t i = 0; i < plan->n_ops; i++) {
        int e = run_op(rt, i, 0, NULL);
        if (e) {
            rt->err_op = (int32_t)i;
            return e;
        }
    }
    if (plan->has_recipe && (rt->slot_next != plan->n_slots || rt->opt_cursor != plan->opt_bytes)) {
        return TF_RT_BAD_OP; /* the region is exactly the slots' canonical layout */
    }
    if (copy_params) {
        tf_runtime_reset_params(rt);
    }
    return TF_RT_OK;
}

int tf_runtime_step(tf_runtime *rt, const uint8_t *sample, int32_t label, int32_t lr_m, int32_t lr_e,
                    tf_step_result *res) {
    tf_tensor_info tin;
    tf_plan_tensor(&rt->plan, rt->plan.input_id, &tin);
    if (lr_e < -TF_EXP_LIMIT || lr_e > TF_EXP_LIMIT) {
        return TF_RT_BAD_SAMPLE; /* before the sums of lr_e with the plan's exponents could wrap */
    }
    if (label < 0 || (rt->n_classes && label >= rt->n_classes) || rt->plan.label_id < 0) {
        return TF_RT_BAD_SAMPLE;
    }
    memcpy(rt->ptr[rt->plan.input_id], sample, tin.nbytes);
    memcpy(rt->ptr[rt->plan.label_id], &label, 4);
    step_ctx sc = {label, lr_m, lr_e, res, 0, 1};
    const tf_plan *pl = &rt->plan;
    if (pl->has_recipe) {
        sc.apply = rt->pending + 1 >= pl->accum_steps;
        int32_t m, e;
        tf_per_sample_lr(lr_m, lr_e, pl->accum_steps, &m, &e);
        sc.add = tf_scaled_lr(m, e, tf_lr_factor_q15(rt->step, pl->warmup, pl->total, (int32_t)pl->lr_min_q15),
                              &sc.lr_m, &sc.lr_e);
    }
    rt->slot_next = rt->opt_cursor = 0;
    if (res) {
        res->correct = 0;
        res->p_label_q15 = 0;
    }
    for (uint32_t i = 0; i < rt->plan.n_ops; i++) {
#ifdef TF_PROFILE
        const uint64_t t0 = tf_board_ticks();
        int e = run_op(rt, i, 1, &sc);
        tf_profile_ticks[i] = tf_board_ticks() - t0;
#else
        int e = run_op(rt, i, 1, &sc);
#endif
        if (e) {
            rt->err_op = (int32_t)i;
            return e == TF_RT_KERNEL && rt->err_status == TF_ERR_ARG ? TF_RT_BAD_SAMPLE : e;
        }
    }
    if (pl->has_recipe && !sc.apply) {
        rt->pending++;
        return TF_RT_OK;
    }
    rt->pending = 0;
    rt->step++;
    return TF_RT_OK;
}

void tf_runtime_state_hash(const tf_runtime *rt, uint8_t out[32]) {
    tf_sha256_ctx c;
    tf_sha256_init(&c);
    for (uint32_t i = 0; i < rt->plan.n_tensors; i++) {
        tf_tensor_info t;
        tf_plan_tensor(&rt->plan, (int32_t)i, &t);
        if (t.kind == TF_K_TRAINABLE) {
            tf_sha256_update(&c, rt->ptr[i], t.nbytes);
        }
    }
    tf_sha256_final(&c, out);
}
