/* The device behind the UART commands (see tf_device.h): plan store, model updates, samples, training, delta. */
#include "tf_device.h"

#include <string.h>

#include "tf_frame.h"

#define ALIGN_STORE 64u

static uint32_t al(uint32_t n, uint32_t a) { return (n + a - 1) / a * a; } /* n <= 2^32 - a only */

/* n bytes fit at `at` in a region ending at `end`: overflow-safe (at <= end first, then n <= end - at). */
static int fits(uint32_t at, uint32_t n, uint32_t end) { return at <= end && n <= end - at; }
static tf_dev_result res(uint8_t st, uint32_t detail) {
    tf_dev_result r = {st, detail};
    return r;
}

static int tensor_info(const tf_device *d, int32_t id, tf_tensor_info *t) {
    tf_plan_tensor(&d->rt.plan, id, t);
    return 1;
}

/* ---------------------------------------------------------------- model update (TFUP v1) */

typedef struct {
    uint32_t base_version, new_version, n_tensors;
    const uint8_t *plan_hash;
    const uint8_t *records; /* first record */
} upd_view;

static int update_read(const uint8_t *blob, uint32_t n, const tf_verify *v, upd_view *u) {
    const uint8_t *body;
    uint32_t len;
    int e = tf_envelope_open(blob, n, "TFUP", 1, v, &body, &len);
    if (e) {
        return e;
    }
    if (len < 44) {
        return TF_WE_TRUNCATED;
    }
    u->base_version = tf_ld_u32(body), u->new_version = tf_ld_u32(body + 4);
    u->plan_hash = body + 8, u->n_tensors = tf_ld_u32(body + 40);
    u->records = body + 44;
    if (u->new_version <= u->base_version) {
        return TF_WE_BAD_VALUE;
    }
    if (u->n_tensors > 65535) {
        return TF_WE_SIZE_OVERFLOW;
    }
    uint32_t pos = 44;
    int64_t prev = -1;
    for (uint32_t i = 0; i < u->n_tensors; i++) {
        if (len - pos < 12) {
            return TF_WE_TRUNCATED;
        }
        const uint8_t *r = body + pos;
        const uint32_t tid = tf_ld_u32(r), dtype = r[4], count = tf_ld_u32(r + 8);
        if ((int64_t)tid <= prev) {
            return TF_WE_ID_ORDER;
        }
        if (dtype < TF_DT_INT8 || dtype > TF_DT_INT32) {
            return TF_WE_BAD_ENUM;
        }
        if (r[5] || tf_ld_u16(r + 6)) {
            return TF_WE_RESERVED_NONZERO;
        }
        if (count == 0 || count > 0x7FFFFFFFu) {
            return TF_WE_SIZE_OVERFLOW;
        }
        pos += 12;
        const uint64_t nb = (uint64_t)count * (dtype == TF_DT_INT8 ? 1u : dtype == TF_DT_INT16 ? 2u : 4u);
        if (nb > len - pos) {
            return TF_WE_TRUNCATED;
        }
        pos += (uint32_t)nb;
        const uint32_t padn = (uint32_t)(-pos & 3u);
        if (padn > len - pos) {
            return TF_WE_TRUNCATED;
        }
        for (uint32_t k = 0; k < padn; k++) {
            if (body[pos + k]) {
                return TF_WE_RESERVED_NONZERO;
            }
        }
        pos += padn;
        prev = tid;
    }
    return pos == len ? TF_WE_OK : TF_WE_TRAILING_BYTES;
}

int tf_update_read_only(const uint8_t *blob, uint32_t n, const tf_verify *v) {
    upd_view u;
    return update_read(blob, n, v, &u);
}

static int is_shared(const tf_tensor_info *t) { return t->kind == TF_K_TRAINABLE && !(t->flags & 1u); }

/* PLAN_MISMATCH checks (wire/update.py apply_update) plus the board's rule: the update carries every shared
 * trainable tensor (it becomes the delta base). apply: 0 check only, 1 copy the values and point the delta base
 * at them, 2 point the base only (re-attaching after a refused plan). */
static int update_apply(tf_device *d, const upd_view *u, int apply) {
    if (memcmp(u->plan_hash, d->rt.plan_hash, 32) != 0) {
        return TF_WE_PLAN_MISMATCH;
    }
    const uint8_t *r = u->records;
    uint32_t carried = 0;
    for (uint32_t i = 0; i < u->n_tensors; i++) {
        const uint32_t tid = tf_ld_u32(r), dtype = r[4], count = tf_ld_u32(r + 8);
        tf_tensor_info t;
        if (tid >= d->rt.plan.n_tensors) {
            return TF_WE_PLAN_MISMATCH;
        }
        tensor_info(d, (int32_t)tid, &t);
        if (!is_shared(&t) || t.dtype != dtype || (int32_t)count != t.numel) {
            return TF_WE_PLAN_MISMATCH;
        }
        if (apply == 1) {
            memcpy(d->rt.ptr[tid], r + 12, t.nbytes);
        }
        if (apply) {
            d->base[tid] = r + 12;
        }
        carried++;
        r += 12 + al(t.nbytes, 4);
    }
    uint32_t shared = 0;
    for (uint32_t i = 0; i < d->rt.plan.n_tensors; i++) {
        tf_tensor_info t;
        tensor_info(d, (int32_t)i, &t);
        shared += is_shared(&t);
    }
    return carried == shared ? TF_WE_OK : TF_WE_PLAN_MISMATCH;
}

/* ---------------------------------------------------------------- plan store */

static void base_from_plan(tf_device *d) {
    for (uint32_t i = 0; i < d->rt.plan.n_tensors; i++) {
        tf_tensor_info t;
        tensor_info(d, (int32_t)i, &t);
        d->base[i] = t.kind == TF_K_TRAINABLE ? d->rt.plan.blob + t.data_off : NULL;
    }
}

/* After a plan is in place at store offset 0: sample area and update slot. */
static void layout_after_plan(tf_device *d) {
    tf_tensor_info tin;
    tensor_info(d, d->rt.plan.input_id, &tin);
    uint64_t shared_bytes = 0; /* NOTE: 64-bit sums: every term is < 2^32, n_tensors <= 65535 */
    for (uint32_t i = 0; i < d->rt.plan.n_tensors; i++) {
        tf_tensor_info t;
        tensor_info(d, (int32_t)i, &t);
        if (is_shared(&t)) {
            shared_bytes += (uint64_t)t.nbytes + 3 + 12;
        }
    }
    d->upd_off = al(d->plan_len, ALIGN_STORE); /* plan_len <= store_size, a multiple of 64 */
    const uint64_t used = (uint64_t)d->upd_off + 16 + 44 + shared_bytes + 64 + 4 + ALIGN_STORE;
    /* the input is an arena tensor (arena <= pool), but the slot size is bounded here too */
    d->sample_bytes = tin.nbytes > d->store_size ? 0 : al(tin.nbytes, 4);
    uint64_t cap = used < d->store_size && d->sample_bytes ? (d->store_size - used) / d->sample_bytes : 0;
    d->sample_cap = cap > TF_MAX_SAMPLES ? TF_MAX_SAMPLES : (uint32_t)cap;
    d->samples_at = d->store_size - d->sample_cap * d->sample_bytes;
    d->samples_held = d->sample_head = d->sample_got = d->sample_total = 0;
    memset(d->sample_valid, 0, sizeof(d->sample_valid));
    d->samples_stored = d->batch_total = d->batch_got = 0;
    d->has_update = d->base_lost = 0;
    d->upd_len = 0;
    d->model_version = 0;
    d->delta_ready = 0;
}

static int load_runtime(tf_device *d, const uint8_t *blob, uint32_t n, tf_plan *plan, uint32_t *detail,
                        int copy_params) {
    int e = tf_plan_read(blob, n, &d->verify, plan);
    if (e) {
        *detail = (uint32_t)e;
        return TF_ST_ERR_FORMAT;
    }
    if (tf_runtime_pool_need(plan) > d->pool_size) {
        *detail = d->pool_size;
        return TF_ST_ERR_NO_MEMORY;
    }
    e = tf_runtime_load(&d->rt, plan, d->pool, d->pool_size, copy_params);
    if (e) {
        *detail = TF_PREP_ERROR_BASE + (uint32_t)e;
        return e == TF_RT_NO_MEMORY ? TF_ST_ERR_NO_MEMORY : TF_ST_ERR_FORMAT;
    }
    return TF_ST_OK;
}

/* Re-attach the last good plan (still at offset 0) after a refused one: its trained values, update counter and
 * delta base are untouched (a refused plan never writes the pool). */
static void restore_plan(tf_device *d, uint32_t step) {
    tf_plan p;
    uint32_t detail;
    if (!d->has_plan || load_runtime(d, d->store, d->plan_len, &p, &detail, 0) != TF_ST_OK) {
        d->has_plan = 0;
        return;
    }
    d->rt.step = step;
    base_from_plan(d);
    if (d->has_update) {
        upd_view u;
        if (update_read(d->store + d->upd_off, d->upd_len, &d->verify, &u) == TF_WE_OK) {
            update_apply(d, &u, 2);
        }
    }
}

static tf_dev_result finish_plan(tf_device *d) {
    const uint8_t *blob = d->store + d->xfer_at;
    tf_plan p;
    uint32_t detail = 0;
    const uint32_t step = d->rt.step;
    int st = load_runtime(d, blob, d->xfer_total, &p, &detail, 0); /* checked where it was staged */
    if (st != TF_ST_OK) {
        if (d->xfer_at != 0) {
            restore_plan(d, step);
        } else {
            d->has_plan = 0;
        }
        return res((uint8_t)st, detail);
    }
    if (d->xfer_at != 0) {
        memmove(d->store, blob, d->xfer_total); /* NOTE: a real board erases and programs its flash here */
    }
    /* NOTE: the bytes just read, moved: the plan's offsets are relative to its blob, so it is not read (nor its
     * signature verified) a second time */
    p.blob = d->store;
    (void)tf_runtime_load(&d->rt, &p, d->pool, d->pool_size, 1);
    d->has_plan = 1;
    d->plan_len = d->xfer_total;
    layout_after_plan(d);
    base_from_plan(d);
    return res(TF_ST_OK, 0);
}

static tf_dev_result finish_update(tf_device *d) {
    upd_view u;
    const uint8_t *blob = d->store + d->xfer_at;
    int e = update_read(blob, d->xfer_total, &d->verify, &u);
    if (!e) {
        e = update_apply(d, &u, 0);
    }
    if (e) {
        if (d->xfer_at == d->upd_off) {
            d->has_update = 0;
            d->base_lost = 1; /* the old base was overwritten: no delta until a good update arrives */
        }
        return res(TF_ST_ERR_FORMAT, (uint32_t)e);
    }
    /* A DIFF applies only on top of the version held; no update may take the model back (rollback). */
    if ((u.base_version != 0 && u.base_version != d->model_version) ||
        (d->has_update && u.new_version <= d->model_version)) {
        if (d->xfer_at == d->upd_off) {
            d->has_update = 0;
            d->base_lost = 1;
        }
        return res(TF_ST_ERR_STATE, d->model_version);
    }
    if (d->xfer_at != d->upd_off) {
        memmove(d->store + d->upd_off, blob, d->xfer_total);
        update_read(d->store + d->upd_off, d->xfer_total, &d->verify, &u);
    }
    update_apply(d, &u, 1);
    d->has_update = 1;
    d->base_lost = 0;
    d->upd_len = d->xfer_total;
    d->model_version = u.new_version;
    d->delta_ready = 0;
    return res(TF_ST_OK, 0);
}

void tf_device_init(tf_device *d, uint8_t *store, uint32_t store_size, uint8_t *pool, uint32_t pool_size,
                    const tf_verify *verify) {
    memset(d, 0, sizeof(*d));
    d->store = store, d->store_size = store_size, d->pool = pool, d->pool_size = pool_size;
    d->verify = *verify;
}

tf_dev_result tf_device_boot(tf_device *d) {
    if (d->store_size < 16 || memcmp(d->store, "TFPL", 4) != 0) {
        return res(TF_ST_ERR_STATE, 0); /* nothing provisioned: wait for LOAD_PLAN */
    }
    const uint32_t len = tf_ld_u32(d->store + 8);
    if (len < 20 || len > d->store_size) { /* the plan lies inside the store */
        return res(TF_ST_ERR_FORMAT, TF_WE_BAD_LENGTH);
    }
    d->xfer_at = 0, d->xfer_total = len;
    return finish_plan(d); /* the full plan reader, as after the last LOAD_PLAN chunk */
}

tf_dev_result tf_device_load(tf_device *d, uint8_t cmd, uint32_t offset, uint32_t total, const uint8_t *chunk,
                             uint32_t n, uint32_t *received) {
    if (cmd == TF_CMD_LOAD_UPDATE && !d->has_plan) {
        return res(TF_ST_ERR_STATE, 0);
    }
    if (offset != 0 && d->xfer_cmd == cmd && offset == d->xfer_last_off && offset <= d->xfer_got &&
        n == d->xfer_got - offset && total == d->xfer_total) {
        *received = d->xfer_got; /* the bridge re-sent the last chunk: idempotent */
        return res(TF_ST_OK, 0);
    }
    if (offset == 0) {
        /* choose where to stage: free space first, overwrite only if it does not fit */
        const uint32_t free_lo = d->has_plan ? al(d->upd_off + (d->has_update ? d->upd_len : 0), ALIGN_STORE) : 0;
        const uint32_t free_hi = d->has_plan ? d->samples_at : d->store_size;
        if (cmd == TF_CMD_LOAD_PLAN) {
            if (total > d->store_size) {
                return res(TF_ST_ERR_NO_MEMORY, d->store_size);
            }
            if (d->has_plan && fits(free_lo, total, free_hi)) {
                d->xfer_at = free_lo;
            } else if (d->has_plan && fits(free_lo, total, d->store_size)) {
                d->xfer_at = free_lo;
                d->samples_held = d->samples_stored = 0; /* staging runs over the samples */
                memset(d->sample_valid, 0, sizeof(d->sample_valid));
            } else {
                d->xfer_at = 0;
                d->has_plan = 0; /* does not fit beside the current plan: it is replaced */
            }
        } else {
            /* NOTE: overflow-safe: `upd_off + total > samples_at` wrapped for total near 2^32, and the chunks
             * that followed were written past the store (where a real board keeps its key slot) */
            if (!fits(d->upd_off, total, d->samples_at)) {
                return res(TF_ST_ERR_NO_MEMORY, d->upd_off <= d->samples_at ? d->samples_at - d->upd_off : 0);
            }
            const uint32_t lo = al(d->upd_off + (d->has_update ? d->upd_len : 0), ALIGN_STORE);
            d->xfer_at = fits(lo, total, d->samples_at) ? lo : d->upd_off;
            if (d->xfer_at == d->upd_off && d->has_update) {
                d->has_update = 0;
                d->base_lost = 1;
            }
        }
        d->xfer_cmd = cmd, d->xfer_total = total, d->xfer_got = 0;
    } else if (d->xfer_cmd != cmd || offset != d->xfer_got || total != d->xfer_total) {
        return res(TF_ST_ERR_STATE, d->xfer_cmd == cmd ? d->xfer_got : 0);
    }
    if (offset > total || n > total - offset) { /* offset == xfer_got <= total here; kept for the reader */
        return res(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    /* invariant: xfer_at + total <= store_size (checked at offset 0), so [xfer_at + offset, + n) is inside */
    memcpy(d->store + d->xfer_at + offset, chunk, n); /* NOTE: flash program on a real board */
    d->xfer_last_off = offset;
    d->xfer_got = offset + n;
    *received = d->xfer_got;
    if (d->xfer_got < total) {
        return res(TF_ST_OK, 0);
    }
    d->xfer_cmd = 0;
    return cmd == TF_CMD_LOAD_PLAN ? finish_plan(d) : finish_update(d);
}

/* ---------------------------------------------------------------- samples and training */

static uint8_t *sample_slot(tf_device *d, uint32_t slot) { return d->store + d->samples_at + slot * d->sample_bytes; }

tf_dev_result tf_device_push_sample(tf_device *d, uint32_t offset, uint32_t total, int32_t label,
                                    const uint8_t *chunk, uint32_t n, uint32_t *received) {
    if (!d->has_plan || d->sample_cap == 0) {
        return res(d->has_plan ? TF_ST_ERR_NO_MEMORY : TF_ST_ERR_STATE, 0);
    }
    tf_tensor_info tin;
    tensor_info(d, d->rt.plan.input_id, &tin);
    if (total != tin.nbytes || total > d->sample_bytes || offset > total || n > total - offset) {
        return res(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    if (offset != 0 && offset == d->sample_last_off && offset <= d->sample_got && n == d->sample_got - offset &&
        d->sample_total == total) {
        *received = d->sample_got;
        return res(TF_ST_OK, 0);
    }
    if (offset == 0) {
        if (d->samples_held == d->sample_cap) {
            d->samples_held--; /* the ring is full: the oldest sample's slot is reused now */
        }
        d->sample_total = total;
        d->samples_stored -= d->sample_valid[d->sample_head];
        d->sample_valid[d->sample_head] = 0;
    } else if (offset != d->sample_got) {
        return res(TF_ST_ERR_STATE, d->sample_got);
    }
    memcpy(sample_slot(d, d->sample_head) + offset, chunk, n);
    d->sample_last_off = offset;
    d->sample_got = offset + n;
    *received = d->sample_got;
    if (d->sample_got == total) {
        d->labels[d->sample_head] = label;
        d->sample_valid[d->sample_head] = 1;
        d->samples_stored++;
        d->sample_head = (d->sample_head + 1) % d->sample_cap;
        d->samples_held++;
        d->sample_got = 0;
        d->sample_last_off = 0xFFFFFFFFu;
    }
    return res(TF_ST_OK, 0);
}

tf_dev_result tf_device_train(tf_device *d, uint32_t steps, int32_t lr_m, int32_t lr_e, uint32_t round_id,
                              uint32_t *used, uint32_t *correct) {
    *used = *correct = 0;
    if (!d->has_plan || d->samples_held == 0) {
        return res(TF_ST_ERR_STATE, 0);
    }
    if (lr_m <= 0 || lr_m > 32768) {
        return res(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    const uint32_t u = steps < d->samples_held ? steps : d->samples_held;
    for (uint32_t s = 0; s < steps; s++) {
        const uint32_t j = d->samples_held - u + s % u; /* 0 = oldest held */
        const uint32_t slot = (d->sample_head + d->sample_cap - d->samples_held + j) % d->sample_cap;
        tf_step_result r;
        int e = tf_runtime_step(&d->rt, sample_slot(d, slot), d->labels[slot], lr_m, lr_e, &r);
        if (e) {
            return res(e == TF_RT_BAD_SAMPLE ? TF_ST_ERR_BAD_PAYLOAD : TF_ST_ERR_INTERNAL, (uint32_t)e);
        }
        *correct += (uint32_t)r.correct;
        d->last_p_label_q15 = r.p_label_q15;
        d->steps_total++;
    }
    *used = u;
    d->round_id = round_id;
    d->delta_ready = 0;
    return res(TF_ST_OK, 0);
}

/* One record of a STORE_SAMPLES batch: label i32 | input bytes | zero pad to 4 (d->sample_bytes = al(nbytes, 4)). */
static uint32_t record_size(const tf_device *d) { return 4 + d->sample_bytes; }

tf_dev_result tf_device_store_samples(tf_device *d, uint32_t first, uint32_t offset, uint32_t total,
                                      const uint8_t *chunk, uint32_t n, uint32_t *received) {
    *received = 0;
    if (!d->has_plan) {
        return res(TF_ST_ERR_STATE, 0);
    }
    if (total == 0) {
        return n == 0 && offset == 0 ? res(TF_ST_OK, 0) : res(TF_ST_ERR_BAD_PAYLOAD, 0); /* a query */
    }
    const uint32_t rec = record_size(d);
    if (total % rec != 0 || offset > total || n > total - offset) {
        return res(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    if (first >= d->sample_cap || total / rec > d->sample_cap - first) {
        return res(TF_ST_ERR_NO_MEMORY, d->sample_cap);
    }
    if (offset != 0 && offset == d->batch_last_off && offset <= d->batch_got && n == d->batch_got - offset &&
        total == d->batch_total && first == d->batch_first) {
        *received = d->batch_got; /* the bridge re-sent the last chunk: idempotent */
        return res(TF_ST_OK, 0);
    }
    if (offset == 0) {
        for (uint32_t k = 0; k < total / rec; k++) { /* these slots are being overwritten */
            d->samples_stored -= d->sample_valid[first + k];
            d->sample_valid[first + k] = 0;
        }
        d->samples_held = d->sample_head = 0; /* addressed slots end the PUSH_SAMPLE ring */
        d->batch_first = first, d->batch_total = total, d->batch_got = 0;
    } else if (offset != d->batch_got || total != d->batch_total || first != d->batch_first) {
        return res(TF_ST_ERR_STATE, first == d->batch_first && total == d->batch_total ? d->batch_got : 0);
    }
    tf_tensor_info tin;
    tensor_info(d, d->rt.plan.input_id, &tin);
    for (uint32_t i = 0; i < n; i++) {
        const uint32_t pos = offset + i, slot = first + pos / rec, at = pos % rec;
        if (at < 4) {
            const uint32_t sh = 8u * at, old = (uint32_t)d->labels[slot] & ~(0xFFu << sh);
            d->labels[slot] = (int32_t)(old | (uint32_t)chunk[i] << sh);
        } else if (at - 4 < (uint32_t)tin.nbytes) {
            sample_slot(d, slot)[at - 4] = chunk[i]; /* NOTE: flash program on a real board */
        } else if (chunk[i] != 0) {
            d->batch_got = d->batch_total = 0; /* padding must be zero: the batch is refused */
            return res(TF_ST_ERR_BAD_PAYLOAD, 0);
        }
        if (at == rec - 1) {
            d->sample_valid[slot] = 1;
            d->samples_stored++;
        }
    }
    d->batch_last_off = offset;
    d->batch_got = offset + n;
    *received = d->batch_got;
    return res(TF_ST_OK, 0);
}

tf_dev_result tf_device_train_list(tf_device *d, const uint8_t *slots, uint32_t count, int32_t lr_m, int32_t lr_e,
                                   uint32_t round_id, uint32_t *correct) {
    *correct = 0;
    if (!d->has_plan) {
        return res(TF_ST_ERR_STATE, 0);
    }
    if (lr_m <= 0 || lr_m > 32768) {
        return res(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    for (uint32_t s = 0; s < count; s++) { /* check the whole list before training any of it */
        const uint32_t slot = (uint32_t)(slots[2 * s] | slots[2 * s + 1] << 8);
        if (slot >= d->sample_cap) {
            return res(TF_ST_ERR_BAD_PAYLOAD, 0);
        }
        if (!d->sample_valid[slot]) {
            return res(TF_ST_ERR_STATE, slot);
        }
    }
    for (uint32_t s = 0; s < count; s++) {
        const uint32_t slot = (uint32_t)(slots[2 * s] | slots[2 * s + 1] << 8);
        tf_step_result r;
        int e = tf_runtime_step(&d->rt, sample_slot(d, slot), d->labels[slot], lr_m, lr_e, &r);
        if (e) {
            return res(e == TF_RT_BAD_SAMPLE ? TF_ST_ERR_BAD_PAYLOAD : TF_ST_ERR_INTERNAL, (uint32_t)e);
        }
        *correct += (uint32_t)r.correct;
        d->last_p_label_q15 = r.p_label_q15;
        d->steps_total++;
    }
    d->round_id = round_id;
    d->delta_ready = 0;
    return res(TF_ST_OK, 0);
}

/* ---------------------------------------------------------------- delta records section */

static int64_t delta_value(const tf_device *d, const tf_tensor_info *t, int32_t id, uint32_t e) {
    const uint8_t *nw = d->rt.ptr[id], *old = d->base[id];
    switch (t->dtype) {
    case TF_DT_INT8: return (int64_t)((const int8_t *)nw)[e] - ((const int8_t *)old)[e];
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

static int build_record(tf_device *d, int32_t id, uint32_t k, tf_delta_rec *r) {
    tf_tensor_info t;
    tensor_info(d, id, &t);
    r->id = id, r->numel = (uint32_t)t.numel;
    int64_t lo = 0, hi = 0;
    uint64_t mx = 0;
    uint32_t nnz = 0;
    for (uint32_t e = 0; e < r->numel; e++) {
        int64_t v = delta_value(d, &t, id, e);
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
    tf_delta_rec s = *r;
    s.enc = 2;
    if (nnz <= k) {
        s.thresh = 0, s.quota = 0, s.count = nnz;
    } else {
        uint64_t a = 1, b = mx; /* count(|v| >= T) >= k holds at T = 1; find the largest such T */
        while (a < b) {
            uint64_t m = a + (b - a + 1) / 2, c = 0;
            for (uint32_t e = 0; e < r->numel; e++) {
                c += absv(delta_value(d, &t, id, e)) >= m;
            }
            if (c >= k) {
                a = m;
            } else {
                b = m - 1;
            }
        }
        uint32_t gt = 0;
        for (uint32_t e = 0; e < r->numel; e++) {
            gt += absv(delta_value(d, &t, id, e)) > a;
        }
        s.thresh = (uint32_t)a, s.quota = k - gt, s.count = k;
    }
    int64_t slo = 0, shi = 0;
    uint32_t ties = 0;
    for (uint32_t e = 0; e < r->numel; e++) {
        int64_t v = delta_value(d, &t, id, e);
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
static uint32_t sel_next(const tf_device *d, const tf_delta_rec *r, tf_sel_iter *it) {
    tf_tensor_info t;
    tf_plan_tensor(&d->rt.plan, r->id, &t);
    while (it->elem < r->numel) {
        uint32_t e = it->elem++;
        if (selected(r, absv(delta_value(d, &t, r->id, e)), &it->ties)) {
            it->j++;
            return e;
        }
    }
    return r->numel;
}

/* the selected element with rank j (0-based), using a resumable iterator */
static uint32_t sel_at(const tf_device *d, const tf_delta_rec *r, tf_sel_iter *it, uint32_t j) {
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
        it->last = sel_next(d, r, it);
        if (it->j == before) {
            return r->numel; /* cannot happen: count was computed with the same rule */
        }
    }
    return it->last;
}

static uint8_t record_byte(tf_device *d, const tf_delta_rec *r, uint32_t pos) {
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
            uint32_t e = sel_at(d, r, &d->it_idx, pos / 4);
            return (uint8_t)(e >> (8 * (pos % 4)));
        }
        pos -= 4 * r->count;
    }
    if (pos >= r->count * r->width) {
        return 0; /* padding */
    }
    const uint32_t j = pos / r->width, e = sel_at(d, r, &d->it_val, j);
    tf_tensor_info t;
    tf_plan_tensor(&d->rt.plan, r->id, &t);
    const uint64_t v = (uint64_t)delta_value(d, &t, r->id, e);
    return (uint8_t)(v >> (8 * (pos % r->width)));
}

tf_dev_result tf_device_delta(tf_device *d, uint32_t offset, uint32_t max_len, uint32_t topk_permille,
                              uint8_t *out, uint32_t *n, uint32_t *total) {
    *n = 0;
    if (!d->has_plan || d->base_lost) {
        return res(TF_ST_ERR_STATE, 0);
    }
    if (offset == 0) {
        d->delta_n = 0;
        uint64_t pos = 4; /* NOTE: 64-bit sum of record sizes, refused above 2^32 - 1 */
        for (uint32_t i = 0; i < d->rt.plan.n_tensors; i++) {
            tf_tensor_info t;
            tensor_info(d, (int32_t)i, &t);
            if (!is_shared(&t)) {
                continue;
            }
            if (d->delta_n == TF_MAX_DELTA_TENSORS) {
                return res(TF_ST_ERR_NO_MEMORY, TF_MAX_DELTA_TENSORS);
            }
            uint32_t k = 0;
            if (topk_permille) {
                uint64_t kk = ((uint64_t)(uint32_t)t.numel * topk_permille + 999) / 1000;
                k = kk < 1 ? 1 : (uint32_t)kk;
            }
            tf_delta_rec *r = &d->delta[d->delta_n++];
            int e = build_record(d, (int32_t)i, k, r);
            if (e) {
                return res(TF_ST_ERR_FORMAT, (uint32_t)e);
            }
            r->start = (uint32_t)pos;
            pos += r->size;
            if (pos > 0xFFFFFFFFull) {
                return res(TF_ST_ERR_FORMAT, TF_WE_SIZE_OVERFLOW);
            }
        }
        d->delta_total = (uint32_t)pos;
        d->delta_ready = 1;
        d->it_rec = -1;
    } else if (!d->delta_ready) {
        return res(TF_ST_ERR_STATE, 0);
    }
    *total = d->delta_total;
    if (offset > d->delta_total) {
        return res(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    uint32_t len = d->delta_total - offset < max_len ? d->delta_total - offset : max_len;
    for (uint32_t b = 0; b < len; b++) {
        const uint32_t pos = offset + b;
        if (pos < 4) {
            out[b] = (uint8_t)(d->delta_n >> (8 * pos));
            continue;
        }
        uint32_t ri = 0;
        while (ri + 1 < d->delta_n && d->delta[ri + 1].start <= pos) {
            ri++;
        }
        if ((int32_t)ri != d->it_rec) {
            memset(&d->it_idx, 0, sizeof(d->it_idx));
            memset(&d->it_val, 0, sizeof(d->it_val));
            d->it_rec = (int32_t)ri;
        }
        out[b] = record_byte(d, &d->delta[ri], pos - d->delta[ri].start);
    }
    *n = len;
    return res(TF_ST_OK, 0);
}
