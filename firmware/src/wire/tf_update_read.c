/* The model update reader (docs/formats.md "Model update", TFUP v1: the version the board speaks), check for
 * check the order of device_agent/wire/update.py. It checks the envelope and every record's bounds; whether the
 * records match the plan held is the device's check (tf_device_store.c), not the reader's. */
#include "tf_wire.h"

int tf_update_read(const uint8_t *blob, uint32_t n, const tf_verify *v, tf_update_view *u) {
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
    uint32_t pos = 44; /* NOTE: invariant pos <= len, so every `len - pos` below is the bytes left, never a wrap */
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
    tf_update_view u;
    return tf_update_read(blob, n, v, &u);
}
