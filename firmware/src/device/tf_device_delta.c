/* GET_DELTA: the device's delta records section (new trainable values - the base update's), planned when offset
 * is 0 and streamed in chunks by the records writer (src/wire/tf_delta_write.c); personal tensors never go out. */
#include <string.h>

#include "tf_device_int.h"

tf_dev_result tf_device_delta(tf_device *d, uint32_t offset, uint32_t max_len, uint32_t topk_permille, uint8_t *out,
                              uint32_t *n, uint32_t *total) {
    *n = 0;
    const tf_delta_src src = {&d->rt.plan, (const uint8_t *const *)d->rt.ptr, d->base};
    if (!d->has_plan || d->base_lost) {
        return tf_res(TF_ST_ERR_STATE, 0);
    }
    if (offset == 0) {
        d->delta_n = 0;
        uint64_t pos = 4; /* NOTE: 64-bit sum of record sizes, refused above 2^32 - 1 */
        for (uint32_t i = 0; i < d->rt.plan.n_tensors; i++) {
            tf_tensor_info t;
            tf_plan_tensor(&d->rt.plan, (int32_t)i, &t);
            if (!tf_is_shared(&t)) {
                continue;
            }
            if (d->delta_n == TF_MAX_DELTA_TENSORS) {
                return tf_res(TF_ST_ERR_NO_MEMORY, TF_MAX_DELTA_TENSORS);
            }
            uint32_t k = 0;
            if (topk_permille) {
                uint64_t kk = ((uint64_t)(uint32_t)t.numel * topk_permille + 999) / 1000;
                k = kk < 1 ? 1 : (uint32_t)kk;
            }
            tf_delta_rec *r = &d->delta[d->delta_n++];
            int e = tf_delta_record(&src, (int32_t)i, k, r);
            if (e) {
                return tf_res(TF_ST_ERR_FORMAT, (uint32_t)e);
            }
            r->start = (uint32_t)pos;
            pos += r->size;
            if (pos > 0xFFFFFFFFull) {
                return tf_res(TF_ST_ERR_FORMAT, TF_WE_SIZE_OVERFLOW);
            }
        }
        d->delta_total = (uint32_t)pos;
        d->delta_ready = 1;
        d->it_rec = -1;
    } else if (!d->delta_ready) {
        return tf_res(TF_ST_ERR_STATE, 0);
    }
    *total = d->delta_total;
    if (offset > d->delta_total) {
        return tf_res(TF_ST_ERR_BAD_PAYLOAD, 0);
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
        out[b] = tf_delta_record_byte(&src, &d->delta[ri], &d->it_idx, &d->it_val, pos - d->delta[ri].start);
    }
    *n = len;
    return tf_res(TF_ST_OK, 0);
}
