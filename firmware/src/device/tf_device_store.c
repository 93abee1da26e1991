/* The device's plan store (flash-like, tf_device.h): LOAD_PLAN / LOAD_UPDATE chunks staged in free space and
 * checked before they replace anything, the plan adopted at boot, the base model update (the delta base) and
 * the store layout after a plan. Every offset and size from a frame is checked overflow-safe before a byte is
 * written; it parses no blob itself (src/wire/ does) and only drops samples when a plan is staged over them. */
#include <string.h>

#include "tf_device_int.h"
#include "tf_frame.h"

/* PLAN_MISMATCH checks (wire/update.py apply_update) plus the board's rule: the update carries every shared
 * trainable tensor (it becomes the delta base). apply: 0 check only, 1 copy the values and point the delta base
 * at them, 2 point the base only (re-attaching after a refused plan). */
static int update_apply(tf_device *d, const tf_update_view *u, int apply) {
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
        tf_plan_tensor(&d->rt.plan, (int32_t)tid, &t);
        if (!tf_is_shared(&t) || t.dtype != dtype || (int32_t)count != t.numel) {
            return TF_WE_PLAN_MISMATCH;
        }
        if (apply == 1) {
            memcpy(d->rt.ptr[tid], r + 12, t.nbytes);
            tf_runtime_reset_optimizer(&d->rt); /* momentum and residuals belong to the old model */
        }
        if (apply) {
            d->base[tid] = r + 12;
        }
        carried++;
        r += 12 + tf_al(t.nbytes, 4);
    }
    uint32_t shared = 0;
    for (uint32_t i = 0; i < d->rt.plan.n_tensors; i++) {
        tf_tensor_info t;
        tf_plan_tensor(&d->rt.plan, (int32_t)i, &t);
        shared += tf_is_shared(&t);
    }
    return carried == shared ? TF_WE_OK : TF_WE_PLAN_MISMATCH;
}

static void base_from_plan(tf_device *d) {
    for (uint32_t i = 0; i < d->rt.plan.n_tensors; i++) {
        tf_tensor_info t;
        tf_plan_tensor(&d->rt.plan, (int32_t)i, &t);
        d->base[i] = t.kind == TF_K_TRAINABLE ? d->rt.plan.blob + t.data_off : NULL;
    }
}

/* After a plan is in place at store offset 0: sample area and update slot. */
static void layout_after_plan(tf_device *d) {
    tf_tensor_info tin;
    tf_plan_tensor(&d->rt.plan, d->rt.plan.input_id, &tin);
    uint64_t shared_bytes = 0; /* NOTE: 64-bit sums: every term is < 2^32, n_tensors <= 65535 */
    for (uint32_t i = 0; i < d->rt.plan.n_tensors; i++) {
        tf_tensor_info t;
        tf_plan_tensor(&d->rt.plan, (int32_t)i, &t);
        if (tf_is_shared(&t)) {
            shared_bytes += (uint64_t)t.nbytes + 3 + 12;
        }
    }
    d->upd_off = tf_al(d->plan_len, ALIGN_STORE); /* plan_len <= store_size, a multiple of 64 */
    const uint64_t used = (uint64_t)d->upd_off + 16 + 44 + shared_bytes + 64 + 4 + ALIGN_STORE;
    /* the input is an arena tensor (arena <= pool), but the slot size is bounded here too */
    d->sample_bytes = tin.nbytes > d->store_size ? 0 : tf_al(tin.nbytes, 4);
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
    d->trained_since_update = 0;
    d->pers_method = TF_PERS_NONE; /* a new plan: the personal copy belonged to the old one */
    d->pers_has = 0;
    d->pers_n = d->pers_bytes = d->pers_steps_done = 0;
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
static void restore_plan(tf_device *d, uint32_t step, uint32_t pending) {
    tf_plan p;
    uint32_t detail;
    if (!d->has_plan || load_runtime(d, d->store, d->plan_len, &p, &detail, 0) != TF_ST_OK) {
        d->has_plan = 0;
        return;
    }
    d->rt.step = step;
    d->rt.pending = pending; /* the optimizer region is untouched, like the trained values */
    base_from_plan(d);
    if (d->has_update) {
        tf_update_view u;
        if (tf_update_read(d->store + d->upd_off, d->upd_len, &d->verify, &u) == TF_WE_OK) {
            update_apply(d, &u, 2);
        }
    }
}

static tf_dev_result finish_plan(tf_device *d) {
    const uint8_t *blob = d->store + d->xfer_at;
    tf_plan p;
    uint32_t detail = 0;
    const uint32_t step = d->rt.step, pending = d->rt.pending;
    int st = load_runtime(d, blob, d->xfer_total, &p, &detail, 0); /* checked where it was staged */
    if (st != TF_ST_OK) {
        if (d->xfer_at != 0) {
            restore_plan(d, step, pending);
        } else {
            d->has_plan = 0;
        }
        return tf_res((uint8_t)st, detail);
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
    return tf_res(TF_ST_OK, 0);
}

static tf_dev_result finish_update(tf_device *d) {
    tf_update_view u;
    const uint8_t *blob = d->store + d->xfer_at;
    int e = tf_update_read(blob, d->xfer_total, &d->verify, &u);
    if (!e) {
        e = update_apply(d, &u, 0);
    }
    if (e) {
        if (d->xfer_at == d->upd_off) {
            d->has_update = 0;
            d->base_lost = 1; /* the old base was overwritten: no delta until a good update arrives */
        }
        return tf_res(TF_ST_ERR_FORMAT, (uint32_t)e);
    }
    /* A DIFF applies only on top of the version held; no update may take the model back (rollback). */
    if ((u.base_version != 0 && u.base_version != d->model_version) ||
        (d->has_update && u.new_version <= d->model_version)) {
        if (d->xfer_at == d->upd_off) {
            d->has_update = 0;
            d->base_lost = 1;
        }
        return tf_res(TF_ST_ERR_STATE, d->model_version);
    }
    if (d->xfer_at != d->upd_off) {
        memmove(d->store + d->upd_off, blob, d->xfer_total);
        tf_update_read(d->store + d->upd_off, d->xfer_total, &d->verify, &u);
    }
    update_apply(d, &u, 1);
    d->has_update = 1;
    d->base_lost = 0;
    d->upd_len = d->xfer_total;
    d->model_version = u.new_version;
    d->delta_ready = 0;
    d->trained_since_update = 0;
    return tf_res(TF_ST_OK, 0);
}

void tf_device_init(tf_device *d, uint8_t *store, uint32_t store_size, uint8_t *pool, uint32_t pool_size,
                    const tf_verify *verify) {
    memset(d, 0, sizeof(*d));
    d->store = store, d->store_size = store_size, d->pool = pool, d->pool_size = pool_size;
    d->verify = *verify;
}

tf_dev_result tf_device_boot(tf_device *d) {
    if (d->store_size < 16 || memcmp(d->store, "TFPL", 4) != 0) {
        return tf_res(TF_ST_ERR_STATE, 0); /* nothing provisioned: wait for LOAD_PLAN */
    }
    const uint32_t len = tf_ld_u32(d->store + 8);
    if (len < 20 || len > d->store_size) { /* the plan lies inside the store */
        return tf_res(TF_ST_ERR_FORMAT, TF_WE_BAD_LENGTH);
    }
    d->xfer_at = 0, d->xfer_total = len;
    return finish_plan(d); /* the full plan reader, as after the last LOAD_PLAN chunk */
}

tf_dev_result tf_device_load(tf_device *d, uint8_t cmd, uint32_t offset, uint32_t total, const uint8_t *chunk,
                             uint32_t n, uint32_t *received) {
    if (cmd == TF_CMD_LOAD_UPDATE && !d->has_plan) {
        return tf_res(TF_ST_ERR_STATE, 0);
    }
    if (offset != 0 && d->xfer_cmd == cmd && offset == d->xfer_last_off && offset <= d->xfer_got &&
        n == d->xfer_got - offset && total == d->xfer_total) {
        *received = d->xfer_got; /* the bridge re-sent the last chunk: idempotent */
        return tf_res(TF_ST_OK, 0);
    }
    if (offset == 0) {
        /* choose where to stage: free space first, overwrite only if it does not fit */
        const uint32_t free_lo = d->has_plan ? tf_al(d->upd_off + (d->has_update ? d->upd_len : 0), ALIGN_STORE) : 0;
        const uint32_t free_hi = d->has_plan ? d->samples_at : d->store_size;
        if (cmd == TF_CMD_LOAD_PLAN) {
            if (total > d->store_size) {
                return tf_res(TF_ST_ERR_NO_MEMORY, d->store_size);
            }
            if (d->has_plan && tf_fits(free_lo, total, free_hi)) {
                d->xfer_at = free_lo;
            } else if (d->has_plan && tf_fits(free_lo, total, d->store_size)) {
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
            if (!tf_fits(d->upd_off, total, d->samples_at)) {
                return tf_res(TF_ST_ERR_NO_MEMORY, d->upd_off <= d->samples_at ? d->samples_at - d->upd_off : 0);
            }
            const uint32_t lo = tf_al(d->upd_off + (d->has_update ? d->upd_len : 0), ALIGN_STORE);
            d->xfer_at = tf_fits(lo, total, d->samples_at) ? lo : d->upd_off;
            if (d->xfer_at == d->upd_off && d->has_update) {
                d->has_update = 0;
                d->base_lost = 1;
            }
        }
        d->xfer_cmd = cmd, d->xfer_total = total, d->xfer_got = 0;
    } else if (d->xfer_cmd != cmd || offset != d->xfer_got || total != d->xfer_total) {
        return tf_res(TF_ST_ERR_STATE, d->xfer_cmd == cmd ? d->xfer_got : 0);
    }
    if (offset > total || n > total - offset) { /* offset == xfer_got <= total here; kept for the reader */
        return tf_res(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    /* invariant: xfer_at + total <= store_size (checked at offset 0), so [xfer_at + offset, + n) is inside */
    memcpy(d->store + d->xfer_at + offset, chunk, n); /* NOTE: flash program on a real board */
    d->xfer_last_off = offset;
    d->xfer_got = offset + n;
    *received = d->xfer_got;
    if (d->xfer_got < total) {
        return tf_res(TF_ST_OK, 0);
    }
    d->xfer_cmd = 0;
    return cmd == TF_CMD_LOAD_PLAN ? finish_plan(d) : finish_update(d);
}
