/* Personalization on the board (PERSONAL_SETUP, PERSONALIZE, PERSONAL_HASH), bit-exact with
 * device_agent/engine/personal.py: a personal copy of some shared trainable tensors, kept in SRAM after the
 * runtime's part of the pool, trained on the stored samples after a model update and never sent. The global
 * values it starts from, is restored to and is pulled toward are the delta base (the model update in the store),
 * so the runtime ends every PERSONALIZE holding the global model and its own update counter (deltas unchanged).
 * It refuses plans with a training recipe or plan-level personal tensors (neither is handled here). */
#include <string.h>

#include "tf_device_int.h"
#include "tf_sha256.h"

static uint8_t *pers_area(const tf_device *d) { return d->pool + tf_al(tf_runtime_pool_need(&d->rt.plan), 8); }

static void info(const tf_device *d, uint32_t id, tf_tensor_info *t) { tf_plan_tensor(&d->rt.plan, (int32_t)id, t); }

tf_dev_result tf_device_personal_setup(tf_device *d, uint32_t method, int32_t lam_q15, const uint8_t *ids,
                                       uint32_t count) {
    d->pers_method = TF_PERS_NONE;
    d->pers_has = 0;
    d->pers_n = d->pers_bytes = d->pers_steps_done = 0;
    if (method > TF_PERS_BIAS || lam_q15 < 0 || lam_q15 > 32768 || count > TF_MAX_PERSONAL_TENSORS ||
        (method == TF_PERS_NONE) != (count == 0)) {
        return tf_res(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    if (method == TF_PERS_NONE) {
        return tf_res(TF_ST_OK, 0);
    }
    if (!d->has_plan || d->rt.plan.has_recipe) {
        return tf_res(TF_ST_ERR_STATE, 0);
    }
    for (uint32_t i = 0; i < d->rt.plan.n_tensors; i++) {
        tf_tensor_info t;
        info(d, i, &t);
        if (t.kind == TF_K_TRAINABLE && !tf_is_shared(&t)) {
            return tf_res(TF_ST_ERR_STATE, i); /* a plan-level personal tensor: not handled here */
        }
    }
    uint64_t bytes = 0;
    for (uint32_t k = 0; k < count; k++) {
        const uint32_t id = tf_ld_u16(ids + 2 * k);
        tf_tensor_info t;
        if (id >= d->rt.plan.n_tensors || (k && id <= d->pers_ids[k - 1])) {
            return tf_res(TF_ST_ERR_BAD_PAYLOAD, 0);
        }
        info(d, id, &t);
        if (!tf_is_shared(&t)) {
            return tf_res(TF_ST_ERR_BAD_PAYLOAD, 0);
        }
        d->pers_ids[k] = (uint16_t)id;
        d->pers_off[k] = (uint32_t)bytes;
        bytes += tf_al(t.nbytes, 4);
    }
    const uint64_t at = (uint64_t)(pers_area(d) - d->pool);
    if (at + bytes > d->pool_size) {
        return tf_res(TF_ST_ERR_NO_MEMORY, at < d->pool_size ? d->pool_size - (uint32_t)at : 0);
    }
    d->pers = pers_area(d);
    d->pers_n = count;
    d->pers_bytes = (uint32_t)bytes;
    d->pers_method = (uint8_t)method;
    d->pers_lam_q15 = lam_q15;
    return tf_res(TF_ST_OK, 0);
}

static int is_personal(const tf_device *d, uint32_t id) {
    for (uint32_t k = 0; k < d->pers_n; k++) {
        if (d->pers_ids[k] == id) {
            return 1;
        }
    }
    return 0;
}

/* floor(v / 2^15) without relying on the sign behaviour of >> */
static int64_t floor_q15(int64_t v) { return v >= 0 ? v >> 15 : -((-v + 32767) >> 15); }

/* p <- clamp(p - floor(((p - g) * lam + 2^14) / 2^15)) over n values of an int8 or int32 tensor (ditto_pull). */
static void ditto_pull(uint8_t *p, const uint8_t *g, const tf_tensor_info *t, int32_t lam) {
    for (int32_t i = 0; i < t->numel; i++) {
        int64_t pv, gv;
        if (t->dtype == TF_DT_INT8) {
            pv = ((const int8_t *)p)[i], gv = ((const int8_t *)g)[i];
        } else {
            int32_t a, b;
            memcpy(&a, p + 4 * i, 4), memcpy(&b, g + 4 * i, 4);
            pv = a, gv = b;
        }
        int64_t v = pv - floor_q15((pv - gv) * lam + (1 << 14));
        if (t->dtype == TF_DT_INT8) {
            ((int8_t *)p)[i] = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v);
        } else {
            const int32_t w = (int32_t)(v < INT32_MIN ? INT32_MIN : v > INT32_MAX ? INT32_MAX : v);
            memcpy(p + 4 * i, &w, 4);
        }
    }
}

/* every shared trainable tensor (only = 0), or only those not in the copy (only = 1), back to the global values */
static void restore_global(tf_device *d, int only_rest) {
    for (uint32_t i = 0; i < d->rt.plan.n_tensors; i++) {
        tf_tensor_info t;
        info(d, i, &t);
        if (tf_is_shared(&t) && !(only_rest && is_personal(d, i))) {
            memcpy(d->rt.ptr[i], d->base[i], t.nbytes);
        }
    }
}

tf_dev_result tf_device_personalize(tf_device *d, const uint8_t *slots, uint32_t count, int32_t lr_m, int32_t lr_e,
                                    int restart, uint32_t *correct) {
    *correct = 0;
    if (!d->has_plan || d->pers_method == TF_PERS_NONE || d->base_lost || d->trained_since_update) {
        return tf_res(TF_ST_ERR_STATE, 0);
    }
    const tf_dev_result lr = tf_device_check_lr(d, lr_m, lr_e);
    if (lr.status != TF_ST_OK) {
        return lr;
    }
    for (uint32_t s = 0; s < count; s++) {
        const uint32_t slot = tf_ld_u16(slots + 2 * s);
        if (slot >= d->sample_cap) {
            return tf_res(TF_ST_ERR_BAD_PAYLOAD, 0);
        }
        if (!d->sample_valid[slot]) {
            return tf_res(TF_ST_ERR_STATE, slot);
        }
    }
    if (d->pers_has && !(restart && d->pers_method == TF_PERS_FINETUNE)) {
        for (uint32_t k = 0; k < d->pers_n; k++) {
            tf_tensor_info t;
            info(d, d->pers_ids[k], &t);
            memcpy(d->rt.ptr[d->pers_ids[k]], d->pers + d->pers_off[k], t.nbytes);
        }
    }
    /* NOTE: personal steps draw stochastic rounding from their own counter, as Personalizer.update does */
    const uint32_t shared_step = d->rt.step;
    d->rt.step = TF_PERSONAL_STEP0 + d->pers_steps_done;
    for (uint32_t s = 0; s < count; s++) {
        const uint32_t slot = tf_ld_u16(slots + 2 * s);
        tf_step_result r;
        const int e = tf_runtime_step(&d->rt, tf_sample_slot(d, slot), d->labels[slot], lr_m, lr_e, &r);
        if (e) { /* the copy keeps its last good values; the runtime gets the global model back */
            restore_global(d, 0);
            d->rt.step = shared_step;
            return tf_res(e == TF_RT_BAD_SAMPLE ? TF_ST_ERR_BAD_PAYLOAD : TF_ST_ERR_INTERNAL, (uint32_t)e);
        }
        d->pers_steps_done++;
        *correct += (uint32_t)r.correct;
        restore_global(d, 1); /* = training the personal tensors only */
        if (d->pers_method == TF_PERS_DITTO) {
            for (uint32_t k = 0; k < d->pers_n; k++) {
                tf_tensor_info t;
                const uint32_t id = d->pers_ids[k];
                info(d, id, &t);
                ditto_pull(d->rt.ptr[id], d->base[id], &t, d->pers_lam_q15);
            }
        }
    }
    for (uint32_t k = 0; k < d->pers_n; k++) {
        tf_tensor_info t;
        info(d, d->pers_ids[k], &t);
        memcpy(d->pers + d->pers_off[k], d->rt.ptr[d->pers_ids[k]], t.nbytes);
    }
    d->pers_has = 1;
    restore_global(d, 0);
    d->rt.step = shared_step;
    return tf_res(TF_ST_OK, 0);
}

void tf_device_personal_hash(const tf_device *d, uint8_t out[32]) {
    tf_sha256_ctx c;
    tf_sha256_init(&c);
    uint32_t k = 0;
    for (uint32_t i = 0; d->has_plan && i < d->rt.plan.n_tensors; i++) {
        tf_tensor_info t;
        info(d, i, &t);
        if (t.kind != TF_K_TRAINABLE) {
            continue;
        }
        while (k < d->pers_n && d->pers_ids[k] < i) {
            k++;
        }
        const int own = d->pers_has && k < d->pers_n && d->pers_ids[k] == i;
        tf_sha256_update(&c, own ? d->pers + d->pers_off[k] : d->rt.ptr[i], t.nbytes);
    }
    tf_sha256_final(&c, out);
}
