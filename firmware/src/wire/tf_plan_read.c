/* The plan blob reader (docs/formats.md "Plan blob"), check for check the order of device_agent/wire/plan.py, so a
 * bad plan gets the same WireError in C and Python. Reads in place, copies nothing, never reads past the bytes;
 * every size is compared exactly (64-bit sums), never saturated or wrapped. */
#include <string.h>

#include "tf_wire.h"

#define MAX_NUMEL 0x7FFFFFFFu

/* ---- bounds-checked cursor over the body (positions absolute in the blob) ---- */
typedef struct {
    const uint8_t *blob;
    uint32_t pos, end;
} cur;

static int need(const cur *c, uint64_t n) { return n <= (uint64_t)(c->end - c->pos) ? TF_WE_OK : TF_WE_TRUNCATED; }
static int rd_u32(cur *c, uint32_t *v) {
    if (need(c, 4)) {
        return TF_WE_TRUNCATED;
    }
    *v = tf_ld_u32(c->blob + c->pos);
    c->pos += 4;
    return TF_WE_OK;
}
static int pad4(cur *c) {
    uint32_t k = (uint32_t)(-c->pos & 3u);
    if (need(c, k)) {
        return TF_WE_TRUNCATED;
    }
    for (uint32_t i = 0; i < k; i++) {
        if (c->blob[c->pos + i]) {
            return TF_WE_RESERVED_NONZERO;
        }
    }
    c->pos += k;
    return TF_WE_OK;
}

/* Strict UTF-8 (as Python's decoder: no overlongs, no surrogates, <= U+10FFFF). */
static int utf8_ok(const uint8_t *s, uint32_t n) {
    uint32_t i = 0;
    while (i < n) {
        uint8_t b = s[i];
        uint32_t len, cp;
        if (b < 0x80) {
            i++;
            continue;
        } else if (b >= 0xC2 && b <= 0xDF) {
            len = 2, cp = b & 0x1F;
        } else if (b >= 0xE0 && b <= 0xEF) {
            len = 3, cp = b & 0x0F;
        } else if (b >= 0xF0 && b <= 0xF4) {
            len = 4, cp = b & 0x07;
        } else {
            return 0;
        }
        if (i + len > n) {
            return 0;
        }
        for (uint32_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) {
                return 0;
            }
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
            (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) {
            return 0;
        }
        i += len;
    }
    return 1;
}

static int rd_string(cur *c) {
    uint32_t n;
    if (rd_u32(c, &n)) {
        return TF_WE_TRUNCATED;
    }
    if (n > 255) {
        return TF_WE_BAD_STRING;
    }
    if (need(c, n)) {
        return TF_WE_TRUNCATED;
    }
    const uint8_t *s = c->blob + c->pos;
    c->pos += n;
    int e = pad4(c);
    if (e) {
        return e;
    }
    return utf8_ok(s, n) ? TF_WE_OK : TF_WE_BAD_STRING;
}

/* Attribute layout per op type: 's' scalar i32, 'a' array (u32 count, count x i32). = ir.OP_ATTRS */
const char *tf_op_attr_spec(uint32_t t) {
    switch (t) {
    case TF_OP_CONV2D:
        return "sssssssaa";
    case TF_OP_ADD:
        return "sssss";
    case TF_OP_AVGPOOL:
        return "ss";
    case TF_OP_RESHAPE:
        return "";
    case TF_OP_EMBEDDING:
        return "";
    case TF_OP_CLAMP:
        return "ss";
    case TF_OP_SAVE_CHANNELS:
        return "s";
    case TF_OP_PWDW:
        return "ssaasssssssaa";
    case TF_OP_PATCH:
        return "ssaaaaaaaaaaaaaaaaaa";
    case TF_OP_SOFTMAX_CE:
        return "a";
    case TF_OP_APPLY_MASK:
        return "";
    case TF_OP_CONV2D_BWD_INPUT:
        return "sssssas";
    case TF_OP_CONV2D_UPDATE:
        return "ssssssssaaaa";
    case TF_OP_GRAD_ACCUM:
        return "";
    case TF_OP_AVGPOOL_BWD:
        return "s";
    case TF_OP_RESHAPE_BWD:
        return "";
    case TF_OP_EMBEDDING_UPDATE:
        return "ss";
    default:
        return NULL;
    }
}

/* (inputs, allowed outputs bitmask) = wire/plan.py ARITY */
static void arity(uint32_t t, uint32_t *n_in, uint32_t *outs) {
    switch (t) {
    case TF_OP_CONV2D:
        *n_in = 3, *outs = 6;
        break;
    case TF_OP_ADD:
        *n_in = 2, *outs = 6;
        break;
    case TF_OP_EMBEDDING:
    case TF_OP_SOFTMAX_CE:
    case TF_OP_APPLY_MASK:
    case TF_OP_CONV2D_BWD_INPUT:
    case TF_OP_GRAD_ACCUM:
        *n_in = 2, *outs = 2;
        break;
    case TF_OP_CLAMP:
        *n_in = 1, *outs = 6;
        break;
    case TF_OP_PWDW:
        *n_in = 5, *outs = 2;
        break;
    case TF_OP_PATCH:
        *n_in = 0, *outs = 2;
        break; /* x then (w, b) per conv layer: odd, <= TF_PATCH_MAX_IN */
    case TF_OP_CONV2D_UPDATE:
        *n_in = 4, *outs = 1;
        break;
    case TF_OP_EMBEDDING_UPDATE:
        *n_in = 3, *outs = 1;
        break;
    default:
        *n_in = 1, *outs = 2;
        break; /* AVGPOOL RESHAPE SAVE_CHANNELS AVGPOOL_BWD RESHAPE_BWD */
    }
}

static int read_op(cur *c, uint32_t nt) {
    const uint32_t start = c->pos;
    if (need(c, 8)) {
        return TF_WE_TRUNCATED;
    }
    const uint8_t *h = c->blob + c->pos;
    const uint32_t typ = h[0], n_in = h[1], n_out = h[2], reserved = h[3], size = tf_ld_u32(h + 4);
    c->pos += 8;
    const char *attrs = tf_op_attr_spec(typ);
    if (!attrs) {
        return TF_WE_BAD_ENUM;
    }
    if (reserved) {
        return TF_WE_RESERVED_NONZERO;
    }
    uint32_t want_in, outs;
    arity(typ, &want_in, &outs);
    const int in_ok = want_in ? n_in == want_in : (n_in & 1) && n_in <= TF_PATCH_MAX_IN;
    if (!in_ok || n_out > 2 || !((outs >> n_out) & 1)) {
        return TF_WE_BAD_VALUE;
    }
    if (need(c, 4u * (n_in + n_out))) {
        return TF_WE_TRUNCATED;
    }
    for (uint32_t i = 0; i < n_in + n_out; i++) {
        int32_t tid = (int32_t)tf_ld_u32(c->blob + c->pos + 4 * i);
        int optional = typ == TF_OP_CONV2D_UPDATE && i == 1;
        if (!((tid >= 0 && (uint32_t)tid < nt) || (tid == -1 && optional))) {
            return TF_WE_BAD_INDEX;
        }
    }
    c->pos += 4 * (n_in + n_out);
    for (const char *a = attrs; *a; a++) {
        uint32_t v;
        if (rd_u32(c, &v)) {
            return TF_WE_TRUNCATED;
        }
        if (*a == 'a') {
            if (need(c, 4ull * v)) {
                return TF_WE_TRUNCATED;
            }
            c->pos += 4 * v;
        }
    }
    return size == c->pos - start ? TF_WE_OK : TF_WE_BAD_LENGTH;
}

/* Exact byte size of `numel` elements (numel <= 2^31: at most 2^33 bytes, no wrap in 64 bits). */
static uint64_t nbytes64(uint32_t dtype, uint64_t numel) {
    return dtype == TF_DT_MASK ? (numel + 7) / 8 : numel * (dtype == TF_DT_INT16 ? 2u : dtype == TF_DT_INT32 ? 4u : 1u);
}

void tf_plan_tensor(const tf_plan *p, int32_t id, tf_tensor_info *t) {
    const uint8_t *r = p->blob + p->tensors_off + (uint32_t)id * TF_PLAN_TENSOR_REC;
    t->kind = r[0], t->dtype = r[1], t->rank = r[2], t->flags = r[3];
    uint64_t numel = 1;
    for (int i = 0; i < 4; i++) {
        uint32_t d = tf_ld_u32(r + 4 + 4 * i);
        t->dims[i] = d > MAX_NUMEL ? (int32_t)MAX_NUMEL : (int32_t)d;
        if (i < t->rank && i < 4) {
            numel *= d;
            if (numel > MAX_NUMEL + 1ull) {
                numel = MAX_NUMEL + 1ull; /* saturate: already too big */
            }
        }
    }
    t->numel = numel > MAX_NUMEL ? -1 : (int32_t)numel;
    t->zero_point = (int32_t)tf_ld_u32(r + 20);
    t->offset = (int32_t)tf_ld_u32(r + 24);
    t->n_scales = tf_ld_u32(r + 28);
    t->scales_off = tf_ld_u32(r + 32);
    t->data_off = tf_ld_u32(r + 36);
    t->data_len = tf_ld_u32(r + 40);
    const uint64_t nb = nbytes64(t->dtype, numel);
    t->nbytes = nb > 0xFFFFFFFFull ? 0xFFFFFFFFu : (uint32_t)nb; /* saturated: only for tensors the reader refuses */
}

static int read_tensor(cur *c, const tf_plan *p, int32_t i) {
    tf_tensor_info t;
    tf_plan_tensor(p, i, &t);
    if (t.kind < TF_K_INPUT || t.kind > TF_K_TRAINABLE) {
        return TF_WE_BAD_ENUM;
    }
    if (t.dtype < TF_DT_INT8 || t.dtype > TF_DT_MASK) {
        return TF_WE_BAD_ENUM;
    }
    if (t.flags & ~1u) {
        return TF_WE_RESERVED_NONZERO;
    }
    if ((t.flags & 1u) && t.kind != TF_K_TRAINABLE) {
        return TF_WE_BAD_VALUE;
    }
    if (t.rank > 4) {
        return TF_WE_BAD_SHAPE;
    }
    const uint8_t *r = p->blob + p->tensors_off + (uint32_t)i * TF_PLAN_TENSOR_REC;
    for (uint32_t k = 0; k < 4; k++) {
        uint32_t d = tf_ld_u32(r + 4 + 4 * k);
        if ((k < t.rank && d == 0) || (k >= t.rank && d != 0)) {
            return TF_WE_BAD_SHAPE;
        }
    }
    if (t.numel < 0) {
        return TF_WE_SIZE_OVERFLOW;
    }
    if (t.dtype == TF_DT_INT8 && (t.zero_point < -128 || t.zero_point > 127)) {
        return TF_WE_BAD_VALUE;
    }
    /* NOTE: the exact size, not t.nbytes: that saturates at 2^32 - 1, which a data_len of 0xFFFFFFFF would
     * "match" (an INT32 tensor of 2^30 elements is 2^32 bytes: BAD_LENGTH, as in Python) */
    const uint64_t nbytes = nbytes64(t.dtype, (uint64_t)t.numel);
    if (t.offset != -1 && (t.offset < 0 || (uint64_t)(uint32_t)t.offset + nbytes > p->arena_bytes)) {
        return TF_WE_OUT_OF_ARENA;
    }
    /* NOTE: kernels read INT32 tensors and int32 scratch in place: a misaligned offset is refused (fuzz_plan found
     * an EMBEDDING reading its ids at arena offset 1; the planner aligns every offset to 4) */
    if (t.offset != -1 && ((uint32_t)t.offset & (TF_PLAN_ARENA_ALIGN - 1u))) {
        return TF_WE_BAD_OFFSET;
    }
    if (t.n_scales != 1 && !(t.rank >= 1 && t.n_scales == tf_ld_u32(r + 4))) {
        return TF_WE_BAD_SHAPE;
    }
    if (t.scales_off != c->pos) {
        return TF_WE_BAD_OFFSET;
    }
    if (need(c, 4ull * t.n_scales)) {
        return TF_WE_TRUNCATED;
    }
    for (uint32_t k = 0; k < t.n_scales; k++) {
        uint32_t bits = tf_ld_u32(c->blob + c->pos + 4 * k);
        if ((bits & 0x80000000u) || ((bits >> 23) & 0xFFu) == 0xFFu || bits == 0) {
            return TF_WE_BAD_SCALE;
        }
    }
    c->pos += 4 * t.n_scales;
    if (t.kind == TF_K_CONST || t.kind == TF_K_TRAINABLE) {
        if ((uint64_t)t.data_len != nbytes) {
            return TF_WE_BAD_LENGTH;
        }
        if (t.data_off != c->pos) {
            return TF_WE_BAD_OFFSET;
        }
        if (need(c, nbytes)) {
            return TF_WE_TRUNCATED;
        }
        c->pos += (uint32_t)nbytes; /* <= end - pos (need) */
        return pad4(c);
    }
    return (t.data_off || t.data_len) ? TF_WE_BAD_VALUE : TF_WE_OK;
}

/* The RECIPE section (wire/plan.py _read_recipe, same checks in the same order). */
static int read_recipe(cur *c, tf_plan *p) {
    if (need(c, 24)) {
        return TF_WE_TRUNCATED;
    }
    const uint8_t *r = c->blob + c->pos;
    const uint32_t accum = tf_ld_u16(r), beta = tf_ld_u16(r + 2), frac = r[4], reserved = r[5];
    const uint32_t lr_min = tf_ld_u16(r + 6), warmup = tf_ld_u32(r + 8), total = tf_ld_u32(r + 12);
    const uint32_t opt_bytes = tf_ld_u32(r + 16), n_slots = tf_ld_u32(r + 20);
    c->pos += 24;
    if (reserved) {
        return TF_WE_RESERVED_NONZERO;
    }
    if (!(accum >= 1 && beta <= 32767 && (frac == 0 || frac == 8 || frac == 16) && lr_min <= 32768 &&
          (total == 0 || total > warmup))) {
        return TF_WE_BAD_VALUE;
    }
    if (opt_bytes > 0x7FFFFFFFu) {
        return TF_WE_SIZE_OVERFLOW;
    }
    uint32_t n_upd = 0, emb = 0, off = p->ops_off;
    for (uint32_t i = 0; i < p->n_ops; i++) {
        const uint8_t typ = c->blob[off];
        n_upd += typ == TF_OP_CONV2D_UPDATE;
        emb |= typ == TF_OP_EMBEDDING_UPDATE;
        off += tf_ld_u32(c->blob + off + 4);
    }
    const int active = accum > 1 || beta > 0 || frac > 0 || warmup > 0 || total > 0;
    if (!active || n_slots != n_upd || emb) {
        return TF_WE_BAD_VALUE;
    }
    if (need(c, 16ull * n_slots)) {
        return TF_WE_TRUNCATED;
    }
    p->slots_off = c->pos;
    off = p->ops_off;
    for (uint32_t i = 0; i < p->n_ops; i++) {
        if (c->blob[off] == TF_OP_CONV2D_UPDATE) {
            const uint8_t *sl = c->blob + c->pos;
            if (tf_ld_u32(sl) != i) {
                return TF_WE_BAD_INDEX;
            }
            for (uint32_t k = 1; k < 4; k++) {
                const int32_t o = (int32_t)tf_ld_u32(sl + 4 * k);
                if (o != -1 && !(o >= 0 && (uint32_t)o < opt_bytes && (o & 3) == 0)) {
                    return TF_WE_BAD_OFFSET;
                }
            }
            c->pos += 16;
        }
        off += tf_ld_u32(c->blob + off + 4);
    }
    p->has_recipe = 1;
    p->accum_steps = accum, p->beta_q15 = beta, p->frac_bits = frac, p->lr_min_q15 = lr_min;
    p->warmup = warmup, p->total = total, p->opt_bytes = opt_bytes, p->n_slots = n_slots;
    return TF_WE_OK;
}

int tf_plan_read(const uint8_t *blob, uint32_t n, const tf_verify *v, tf_plan *out) {
    const uint8_t *body;
    uint32_t body_len;
    int e = tf_envelope_open(blob, n, "TFPL", TF_PLAN_VERSION, v, &body, &body_len);
    if (e) {
        return e;
    }
    tf_plan p;
    memset(&p, 0, sizeof(p));
    p.blob = blob, p.blob_len = n;
    cur c = {blob, 16, 16 + body_len};
    if (need(&c, 40)) {
        return TF_WE_TRUNCATED;
    }
    const uint8_t *h = blob + 16;
    p.n_tensors = tf_ld_u32(h), p.n_ops = tf_ld_u32(h + 4);
    p.input_id = (int32_t)tf_ld_u32(h + 8), p.label_id = (int32_t)tf_ld_u32(h + 12);
    p.logits_id = (int32_t)tf_ld_u32(h + 16), p.arena_bytes = tf_ld_u32(h + 20);
    const uint32_t sflags = tf_ld_u32(h + 28), n_ratios = tf_ld_u32(h + 32), data_abs = tf_ld_u32(h + 36);
    c.pos += 40;
    const uint32_t nt = p.n_tensors;
    if (nt > 65535 || p.n_ops > 65535) {
        return TF_WE_SIZE_OVERFLOW;
    }
    if (p.input_id < 0 || (uint32_t)p.input_id >= nt ||
        !(p.label_id == -1 || (p.label_id >= 0 && (uint32_t)p.label_id < nt)) || p.logits_id < 0 ||
        (uint32_t)p.logits_id >= nt) {
        return TF_WE_BAD_INDEX;
    }
    if (p.arena_bytes > 0x7FFFFFFFu) {
        return TF_WE_SIZE_OVERFLOW;
    }
    if (sflags & ~(3u | TF_PLAN_FLAG_RECIPE)) {
        return TF_WE_RESERVED_NONZERO;
    }
    if (need(&c, 8ull * n_ratios)) {
        return TF_WE_TRUNCATED;
    }
    int64_t prev = -1;
    for (uint32_t i = 0; i < n_ratios; i++, c.pos += 8) {
        uint32_t conv = tf_ld_u32(blob + c.pos), eighths = tf_ld_u32(blob + c.pos + 4);
        if ((int64_t)conv <= prev) {
            return TF_WE_ID_ORDER;
        }
        if (eighths > 8) {
            return TF_WE_BAD_VALUE;
        }
        prev = conv;
    }
    if (need(&c, (uint64_t)TF_PLAN_TENSOR_REC * nt)) {
        return TF_WE_TRUNCATED;
    }
    p.tensors_off = c.pos;
    c.pos += TF_PLAN_TENSOR_REC * nt;
    p.ops_off = c.pos;
    for (uint32_t i = 0; i < p.n_ops; i++) {
        if ((e = read_op(&c, nt)) != 0) {
            return e;
        }
    }
    if ((sflags & TF_PLAN_FLAG_RECIPE) && (e = read_recipe(&c, &p)) != 0) {
        return e;
    }
    p.strings_off = c.pos;
    for (uint32_t i = 0; i < 2 + nt + p.n_ops; i++) {
        if ((e = rd_string(&c)) != 0) {
            return e;
        }
    }
    if (c.pos != data_abs) {
        return TF_WE_BAD_OFFSET;
    }
    for (uint32_t i = 0; i < nt; i++) {
        if ((e = read_tensor(&c, &p, (int32_t)i)) != 0) {
            return e;
        }
    }
    if (c.pos != c.end) {
        return TF_WE_TRAILING_BYTES;
    }
    *out = p;
    return TF_WE_OK;
}

void tf_plan_op(const tf_plan *p, uint32_t off, tf_op_view *op) {
    const uint8_t *h = p->blob + off;
    op->type = h[0], op->n_in = h[1], op->n_out = h[2];
    op->size = tf_ld_u32(h + 4);
    op->ids = (const int32_t *)(const void *)(h + 8);
    op->attrs = op->ids + op->n_in + op->n_out;
}

const char *tf_plan_string(const tf_plan *p, uint32_t index, uint32_t *len) {
    uint32_t pos = p->strings_off;
    for (uint32_t i = 0;; i++) {
        uint32_t n = tf_ld_u32(p->blob + pos);
        if (i == index) {
            *len = n;
            return (const char *)(p->blob + pos + 4);
        }
        pos += 4 + ((n + 3u) & ~3u);
    }
}
