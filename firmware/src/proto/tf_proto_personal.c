/* The personal command family (TF_CMD_PERSONAL_FIRST .. _LAST in tf_frame.h; payloads in
 * device_agent/wire/frames_personal.py): PERSONAL_SETUP 0x20, PERSONALIZE 0x21, PERSONAL_HASH 0x22, served by
 * src/device/tf_device_personal.c. It only unpacks and packs; the personal copy itself never leaves the board. */
#include <string.h>

#include "tf_device.h"
#include "tf_frame.h"
#include "tf_proto_ext.h"

enum { CMD_SETUP = 0x20, CMD_PERSONALIZE = 0x21, CMD_HASH = 0x22 };

static uint8_t *put32(uint8_t *p, uint32_t v) {
    tf_st_u32(p, v);
    return p + 4;
}

/* ERR_STATE / ERR_NO_MEMORY carry their detail (u32) as tf_proto.c's device commands do */
static uint8_t answer(tf_dev_result r, uint8_t *out, int32_t *out_len, int32_t ok_len) {
    if (r.status == TF_ST_OK) {
        *out_len = ok_len;
    } else if (r.status == TF_ST_ERR_STATE || r.status == TF_ST_ERR_NO_MEMORY) {
        *out_len = (int32_t)(put32(out, r.detail) - out);
    } else {
        *out_len = 0;
    }
    return r.status;
}

uint8_t tf_proto_personal(struct tf_device_s *dev, uint8_t cmd, const uint8_t *in, int32_t in_len, uint8_t *out,
                          int32_t *out_len) {
    static uint8_t list[TF_FRAME_MAX_PAYLOAD]; /* the request's u16 list, read out before the answer is written */
    *out_len = 0;
    if (cmd != CMD_SETUP && cmd != CMD_PERSONALIZE && cmd != CMD_HASH) {
        return TF_ST_ERR_UNKNOWN_COMMAND;
    }
    if (!dev) {
        return TF_ST_ERR_STATE;
    }
    tf_device *d = dev;
    if (cmd == CMD_SETUP) { /* req <BBHi method, reserved, count, lam_q15 + count x u16 ids; resp <III */
        if (in_len < 8 || (uint32_t)in_len != 8u + 2u * tf_ld_u16(in + 2)) {
            return TF_ST_ERR_BAD_PAYLOAD;
        }
        const uint32_t method = in[0], count = tf_ld_u16(in + 2);
        const int32_t lam = (int32_t)tf_ld_u32(in + 4);
        memcpy(list, in + 8, 2 * count);
        tf_dev_result r = tf_device_personal_setup(d, method, lam, list, count);
        const uint32_t need = d->has_plan ? (tf_runtime_pool_need(&d->rt.plan) + 7u) / 8u * 8u : 0;
        uint8_t *q = put32(put32(out, d->pers_bytes), 0); /* sram_bytes, flash_bytes (the copy lives in SRAM) */
        q = put32(q, need + d->pers_bytes <= d->pool_size ? d->pool_size - need - d->pers_bytes : 0);
        return answer(r, out, out_len, (int32_t)(q - out));
    }
    if (cmd == CMD_PERSONALIZE) { /* req <iiBBH lr_m, lr_e, flags (1: restart), reserved, count + slots */
        if (in_len < 12 || (uint32_t)in_len != 12u + 2u * tf_ld_u16(in + 10) || (in[8] & ~1u)) {
            return TF_ST_ERR_BAD_PAYLOAD;
        }
        const int32_t lr_m = (int32_t)tf_ld_u32(in), lr_e = (int32_t)tf_ld_u32(in + 4);
        const int restart = in[8] & 1;
        const uint32_t count = tf_ld_u16(in + 10);
        memcpy(list, in + 12, 2 * count);
        uint32_t correct = 0;
        tf_dev_result r = tf_device_personalize(d, list, count, lr_m, lr_e, restart, &correct);
        uint8_t *q = put32(put32(out, r.status == TF_ST_OK ? count : 0), correct);
        q = put32(q, d->pers_steps_done);
        return answer(r, out, out_len, (int32_t)(q - out));
    }
    if (in_len != 0) { /* PERSONAL_HASH: resp <32sBBHII hash, method, has, reserved, sram_bytes, personal_steps */
        return TF_ST_ERR_BAD_PAYLOAD;
    }
    if (!d->has_plan) {
        const tf_dev_result none = {TF_ST_ERR_STATE, 0};
        return answer(none, out, out_len, 0);
    }
    tf_device_personal_hash(d, out);
    out[32] = d->pers_method, out[33] = d->pers_has, out[34] = out[35] = 0;
    uint8_t *q = put32(put32(out + 36, d->pers_bytes), d->pers_steps_done);
    *out_len = (int32_t)(q - out);
    return TF_ST_OK;
}
