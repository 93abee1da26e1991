/* The delta records section writer (docs/formats.md "Delta", the records of GET_DELTA): per shared trainable
 * tensor a DENSE or TOPK record of new - base values, narrowest width, produced byte by byte so the board never
 * holds the section. It is the C twin of device_agent/wire/delta.py's records writer; it reads only the values it
 * is given and refuses (never wraps) a record size above 2^32 - 1. */
#include <string.h>

#include "tf_wire.h"

static int64_t delta_value(const tf_delta_src *s, const tf_tensor_info *t, int32_t id, uint32_t e) {
    const uint8_t *nw = s->cur[id], *old = s->base[id];
    switch (t->dtype) {
    case TF_DT_INT8:
        return (int64_t)((const int8_t *)nw)[e] - ((const int8_t *)old)[e];
    case TF_DT_INT16: {
        int16_t a, b;
        memcpy(&a, nw + 2 * e, 2), memcpy(&b, old + 2 * e, 2);
        return (int64_t)a - b;
    }
    default: {
        int32_t a, b;
        memcpy(&a, nw + 4 * e, 4), memcpy(&b, old + 4 * e, 4);
        return (int64_t)a - b;
    }
    }
}

static uint64_t absv(int64_t v) { return v < 0 ? (uint64_t)(-v) : (uint64_t)v; }
static int width_of(int64_t lo, int64_t hi) {
    if (lo >= -128 && hi <= 127) {
        return 1;
    }
    if (lo >= -32768 && hi <= 32767) {
        return 2;
    }
    return (lo >= INT32_MIN && hi <= INT32_MAX) ? 4 : 0;
}

static int selected(const tf_delta_rec *r, uint64_t a, uint32_t *ties) {
    if (r->enc == 1) {
        return 1;
    }
    if (a == 0) {
        return 0;
    }
    if (a > r->thresh) {
        return 1;
    }
    if (a == r->thresh && *ties < r->quota) {
        (*ties)++;
        return 1;
    }
    return 0;
}

int tf_delta_record(const tf_delta_src *src, int32_t id, uint32_t k, tf_delta_rec *r) {
    tf_tensor_info t;
    tf_plan_tensor(src->plan, id, &t);
    r->id = id, r->numel = (uint32_t)t.numel;
    int64_t lo = 0, hi = 0;
    uint64_t mx = 0;
    uint32_t nnz = 0;
    for (uint32_t e = 0; e < r->numel; e++) {
        int64_t v = delta_value(src, &t, id, e);
        lo = v < lo ? v : lo, hi = v > hi ? v : hi;
        mx = absv(v) > mx ? absv(v) : mx;
        nnz += v != 0;
    }
    const int w_all = width_of(lo, hi);
    if (!w_all) {
        return TF_WE_BAD_VALUE; /* a delta beyond int32 (as Python's narrowest_dtype refuses) */
    }
    /* NOTE: 64-bit sizes: numel < 2^31 and width <= 4 (the tensor's data lies in the plan, so it fits 32 bits
     * in practice; the record refuses rather than wraps if it ever did not) */
    const uint64_t dense = 16 + (((uint64_t)r->numel * (uint32_t)w_all + 3) & ~3ull);
    if (dense > 0xFFFFFFFFull) {
        return TF_WE_SIZE_OVERFLOW;
    }
    r->enc = 1, r->width = (uint8_t)w_all, r->count = r->numel, r->size = (uint32_t)dense;
    if (!k) {
        return TF_WE_OK;
    }
    /* top-k: threshold T = the k-th largest |v| among non-zeros (binary search on counts) */
    tf_delta_rec s = *r; /* the TOPK candidate */
    s.enc = 2;
    if (nnz <= k) {
        s.thresh = 0, s.quota = 0, s.count = nnz;
    } else {
        uint64_t a = 1, b = mx; /* count(|v| >= T) >= k holds at T = 1; find the largest such T */
        while (a < b) {
            uint64_t m = a + (b - a + 1) / 2, c = 0;
            for (uint32_t e = 0; e < r->numel; e++) {
                c += absv(delta_value(src, &t, id, e)) >= m;
            }
            if (c >= k) {
                a = m;
            } else {
                b = m - 1;
            }
        }
        uint32_t gt = 0;
        for (uint32_t e = 0; e < r->numel; e++) {
            gt += absv(delta_value(src, &t, id, e)) > a;
        }
        s.thresh = (uint32_t)a, s.quota = k - gt, s.count = k;
    }
    int64_t slo = 0, shi = 0;
    uint32_t ties = 0;
    for (uint32_t e = 0; e < r->numel; e++) {
        int64_t v = delta_value(src, &t, id, e);
        if (selected(&s, absv(v), &ties)) {
            slo = v < slo ? v : slo, shi = v > shi ? v : shi;
        }
    }
    s.width = (uint8_t)width_of(slo, shi);
    const uint64_t sparse = 16 + 4ull * s.count + (((uint64_t)s.count * s.width + 3) & ~3ull); /* count <= numel */
    if (sparse < dense) {
        s.size = (uint32_t)sparse;
        *r = s;
    }
    return TF_WE_OK;
}

/* next selected element of record r after the iterator's position */
static uint32_t sel_next(const tf_delta_src *s, const tf_delta_rec *r, tf_sel_iter *it) {
    tf_tensor_info t;
    tf_plan_tensor(s->plan, r->id, &t);
    while (it->elem < r->numel) {
        uint32_t e = it->elem++;
        if (selected(r, absv(delta_value(s, &t, r->id, e)), &it->ties)) {
            it->j++;
            return e;
        }
    }
    return r->numel;
}

/* the selected element with rank j (0-based), using a resumable iterator */
static uint32_t sel_at(const tf_delta_src *s, const tf_delta_rec *r, tf_sel_iter *it, uint32_t j) {
    if (r->enc == 1) {
        return j;
    }
    if (it->j == j + 1) {
        return it->last;
    }
    if (it->j > j + 1) {
        memset(it, 0, sizeof(*it));
    }
    while (it->j <= j) {
        const uint32_t before = it->j;
        it->last = sel_next(s, r, it);
        if (it->j == before) {
            return r->numel; /* cannot happen: count was computed with the same rule */
        }
    }
    return it->last;
}

uint8_t tf_delta_record_byte(const tf_delta_src *s, const tf_delta_rec *r, tf_sel_iter *it_idx, tf_sel_iter *it_val,
                             uint32_t pos) {
    if (pos < 16) {
        uint8_t h[16];
        tf_st_u32(h, (uint32_t)r->id);
        h[4] = r->enc;
        h[5] = r->width == 1 ? TF_DT_INT8 : r->width == 2 ? TF_DT_INT16 : TF_DT_INT32;
        h[6] = h[7] = 0;
        tf_st_u32(h + 8, r->numel);
        tf_st_u32(h + 12, r->count);
        return h[pos];
    }
    pos -= 16;
    if (r->enc == 2) {
        if (pos < 4 * r->count) {
            uint32_t e = sel_at(s, r, it_idx, pos / 4);
            return (uint8_t)(e >> (8 * (pos % 4)));
        }
        pos -= 4 * r->count;
    }
    if (pos >= r->count * r->width) {
        return 0; /* padding */
    }
    const uint32_t j = pos / r->width, e = sel_at(s, r, it_val, j);
    tf_tensor_info t;
    tf_plan_tensor(s->plan, r->id, &t);
    const uint64_t v = (uint64_t)delta_value(s, &t, r->id, e);
    return (uint8_t)(v >> (8 * (pos % r->width)));
}
