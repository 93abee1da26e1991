/* TRAIN and TRAIN_LIST (tf_device.h): which stored samples to train on, in which order; both run the one step
 * loop below (tf_runtime_step per sample). It neither stores samples nor touches the plan store. */
#include <stddef.h>

#include "tf_device_int.h"

/* lr = lr_m 2^lr_e: a mantissa in 1..2^15, an exponent within TF_EXP_LIMIT (the runtime sums it with the plan's
 * exponents in int32; fuzz_cmds found a TRAIN_LIST lr_e of 2^31 - 1 overflowing the update kernels' sum) */
tf_dev_result tf_device_check_lr(const tf_device *d, int32_t lr_m, int32_t lr_e) {
    if (!d->has_plan) {
        return tf_res(TF_ST_ERR_STATE, 0);
    }
    return lr_m <= 0 || lr_m > 32768 || lr_e < -TF_EXP_LIMIT || lr_e > TF_EXP_LIMIT ? tf_res(TF_ST_ERR_BAD_PAYLOAD, 0)
                                                                                    : tf_res(TF_ST_OK, 0);
}

static uint32_t list_slot(const uint8_t *slots, uint32_t s) { return (uint32_t)(slots[2 * s] | slots[2 * s + 1] << 8); }

/* The one step loop: `steps` N = 1 steps, step s on the slot `slots[s]` (u16 list) or, without a list, on the
 * TRAIN ring order (of the u newest held samples, the (s mod u)-th oldest). Every slot holds a sample (the
 * callers checked). On success: the round id is kept and a delta must be rebuilt. */
static tf_dev_result run_steps(tf_device *d, uint32_t steps, const uint8_t *slots, uint32_t u, int32_t lr_m,
                               int32_t lr_e, uint32_t round_id, uint32_t *correct) {
    d->trained_since_update = 1; /* NOTE: the runtime no longer holds the delta base (PERSONALIZE needs it) */
    for (uint32_t s = 0; s < steps; s++) {
        uint32_t slot;
        if (slots) {
            slot = list_slot(slots, s);
        } else {
            const uint32_t j = d->samples_held - u + s % u; /* 0 = oldest held */
            slot = (d->sample_head + d->sample_cap - d->samples_held + j) % d->sample_cap;
        }
        tf_step_result r;
        int e = tf_runtime_step(&d->rt, tf_sample_slot(d, slot), d->labels[slot], lr_m, lr_e, &r);
        if (e) {
            return tf_res(e == TF_RT_BAD_SAMPLE ? TF_ST_ERR_BAD_PAYLOAD : TF_ST_ERR_INTERNAL, (uint32_t)e);
        }
        *correct += (uint32_t)r.correct;
        d->last_p_label_q15 = r.p_label_q15;
        d->steps_total++;
    }
    d->round_id = round_id;
    d->delta_ready = 0;
    return tf_res(TF_ST_OK, 0);
}

tf_dev_result tf_device_train(tf_device *d, uint32_t steps, int32_t lr_m, int32_t lr_e, uint32_t round_id,
                              uint32_t *used, uint32_t *correct) {
    *used = *correct = 0;
    if (d->has_plan && d->samples_held == 0) {
        return tf_res(TF_ST_ERR_STATE, 0);
    }
    tf_dev_result r = tf_device_check_lr(d, lr_m, lr_e);
    if (r.status != TF_ST_OK) {
        return r;
    }
    const uint32_t u = steps < d->samples_held ? steps : d->samples_held;
    r = run_steps(d, steps, NULL, u, lr_m, lr_e, round_id, correct);
    *used = r.status == TF_ST_OK ? u : 0;
    return r;
}

tf_dev_result tf_device_train_list(tf_device *d, const uint8_t *slots, uint32_t count, int32_t lr_m, int32_t lr_e,
                                   uint32_t round_id, uint32_t *correct) {
    *correct = 0;
    tf_dev_result r = tf_device_check_lr(d, lr_m, lr_e);
    if (r.status != TF_ST_OK) {
        return r;
    }
    for (uint32_t s = 0; s < count; s++) { /* check the whole list before training any of it */
        const uint32_t slot = list_slot(slots, s);
        if (slot >= d->sample_cap) {
            return tf_res(TF_ST_ERR_BAD_PAYLOAD, 0);
        }
        if (!d->sample_valid[slot]) {
            return tf_res(TF_ST_ERR_STATE, slot);
        }
    }
    return run_steps(d, count, slots, 0, lr_m, lr_e, round_id, correct);
}
