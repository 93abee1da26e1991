/* The device's private samples in the store's sample slots (tf_device.h): PUSH_SAMPLE fills a ring, oldest
 * first; STORE_SAMPLES writes records into addressed slots. Both are chunked; every offset, size and slot index
 * from a frame is checked overflow-safe before a byte is written. Samples never leave the board. */
#include <string.h>

#include "tf_device_int.h"

tf_dev_result tf_device_push_sample(tf_device *d, uint32_t offset, uint32_t total, int32_t label, const uint8_t *chunk,
                                    uint32_t n, uint32_t *received) {
    if (!d->has_plan || d->sample_cap == 0) {
        return tf_res(d->has_plan ? TF_ST_ERR_NO_MEMORY : TF_ST_ERR_STATE, 0);
    }
    tf_tensor_info tin;
    tf_plan_tensor(&d->rt.plan, d->rt.plan.input_id, &tin);
    if (total != tin.nbytes || total > d->sample_bytes || offset > total || n > total - offset) {
        return tf_res(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    if (offset != 0 && offset == d->sample_last_off && offset <= d->sample_got && n == d->sample_got - offset &&
        d->sample_total == total) {
        *received = d->sample_got;
        return tf_res(TF_ST_OK, 0);
    }
    if (offset == 0) {
        if (d->samples_held == d->sample_cap) {
            d->samples_held--; /* the ring is full: the oldest sample's slot is reused now */
        }
        d->sample_total = total;
        d->samples_stored -= d->sample_valid[d->sample_head];
        d->sample_valid[d->sample_head] = 0;
    } else if (offset != d->sample_got) {
        return tf_res(TF_ST_ERR_STATE, d->sample_got);
    }
    memcpy(tf_sample_slot(d, d->sample_head) + offset, chunk, n);
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
    return tf_res(TF_ST_OK, 0);
}

/* One record of a STORE_SAMPLES batch: label i32 | input bytes | zero pad to 4 (d->sample_bytes = tf_al(nbytes, 4)). */
static uint32_t record_size(const tf_device *d) { return 4 + d->sample_bytes; }

tf_dev_result tf_device_store_samples(tf_device *d, uint32_t first, uint32_t offset, uint32_t total,
                                      const uint8_t *chunk, uint32_t n, uint32_t *received) {
    *received = 0;
    if (!d->has_plan) {
        return tf_res(TF_ST_ERR_STATE, 0);
    }
    if (total == 0) {
        return n == 0 && offset == 0 ? tf_res(TF_ST_OK, 0) : tf_res(TF_ST_ERR_BAD_PAYLOAD, 0); /* a query */
    }
    const uint32_t rec = record_size(d);
    if (total % rec != 0 || offset > total || n > total - offset) {
        return tf_res(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    if (first >= d->sample_cap || total / rec > d->sample_cap - first) {
        return tf_res(TF_ST_ERR_NO_MEMORY, d->sample_cap);
    }
    if (offset != 0 && offset == d->batch_last_off && offset <= d->batch_got && n == d->batch_got - offset &&
        total == d->batch_total && first == d->batch_first) {
        *received = d->batch_got; /* the bridge re-sent the last chunk: idempotent */
        return tf_res(TF_ST_OK, 0);
    }
    if (offset == 0) {
        for (uint32_t k = 0; k < total / rec; k++) { /* these slots are being overwritten */
            d->samples_stored -= d->sample_valid[first + k];
            d->sample_valid[first + k] = 0;
        }
        d->samples_held = d->sample_head = 0; /* addressed slots end the PUSH_SAMPLE ring */
        d->batch_first = first, d->batch_total = total, d->batch_got = 0;
    } else if (offset != d->batch_got || total != d->batch_total || first != d->batch_first) {
        return tf_res(TF_ST_ERR_STATE, first == d->batch_first && total == d->batch_total ? d->batch_got : 0);
    }
    tf_tensor_info tin;
    tf_plan_tensor(&d->rt.plan, d->rt.plan.input_id, &tin);
    for (uint32_t i = 0; i < n; i++) {
        const uint32_t pos = offset + i, slot = first + pos / rec, at = pos % rec;
        if (at < 4) {
            const uint32_t sh = 8u * at, old = (uint32_t)d->labels[slot] & ~(0xFFu << sh);
            d->labels[slot] = (int32_t)(old | (uint32_t)chunk[i] << sh);
        } else if (at - 4 < (uint32_t)tin.nbytes) {
            tf_sample_slot(d, slot)[at - 4] = chunk[i]; /* NOTE: flash program on a real board */
        } else if (chunk[i] != 0) {
            d->batch_got = d->batch_total = 0; /* padding must be zero: the batch is refused */
            return tf_res(TF_ST_ERR_BAD_PAYLOAD, 0);
        }
        if (at == rec - 1) {
            d->sample_valid[slot] = 1;
            d->samples_stored++;
        }
    }
    d->batch_last_off = offset;
    d->batch_got = offset + n;
    *received = d->batch_got;
    return tf_res(TF_ST_OK, 0);
}
