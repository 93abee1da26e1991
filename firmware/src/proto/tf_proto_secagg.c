/* The secagg command family (0x30-0x3F, device_agent/wire/frames_secagg.py is the layout table): unpacks each
 * request, runs the step of src/crypto/tf_secagg_device.c and packs its answer. Every command mixes the tick
 * count into the board's DRBG. A refusal answers ERR_STATE (u32 reason), ERR_FORMAT (u16 reason, u16 0),
 * ERR_NO_MEMORY (u32 capacity) or ERR_BAD_PAYLOAD (a malformed request). */
#include <string.h>

#include "tf_board.h"
#include "tf_frame.h"
#include "tf_proto_ext.h"
#include "tf_secagg_device.h"

enum {
    SA_SEAL = 0x30,
    SA_BEGIN = 0x31,
    SA_ROSTER = 0x32,
    SA_ROSTER_ADD = 0x33,
    SA_SHARE_KEYS = 0x34,
    SA_GET_SHARE = 0x35,
    SA_PUT_SHARE = 0x36,
    SA_MASK = 0x37,
    SA_GET_MASKED = 0x38,
    SA_UNMASK = 0x39,
    SA_GET_REVEAL = 0x3A,
    SA_STATS = 0x3B,
};
#define SA_N_STEPS (SA_GET_REVEAL - SA_SEAL + 1)

static tf_secagg_dev SA;
static uint64_t step_ticks[SA_N_STEPS]; /* core ticks spent in each step since reset (SA_STATS) */

static uint32_t ld32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint16_t ld16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static void st32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}
static void st16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }

static uint8_t answer(tf_sa_result r, uint8_t *out, int32_t *out_len) {
    if (r.status == TF_ST_ERR_STATE || r.status == TF_ST_ERR_NO_MEMORY) {
        st32(out, r.reason), *out_len = 4;
    } else if (r.status == TF_ST_ERR_FORMAT) {
        st16(out, r.reason), st16(out + 2, 0), *out_len = 4;
    } else if (r.status != TF_ST_OK) {
        *out_len = 0;
    }
    return r.status;
}

static tf_sa_result bad(void) {
    tf_sa_result r = {TF_ST_ERR_BAD_PAYLOAD, 0};
    return r;
}

static uint8_t step(struct tf_device_s *dev, uint8_t cmd, const uint8_t *in, uint32_t n, uint8_t *out,
                    int32_t *out_len);

uint8_t tf_proto_secagg(struct tf_device_s *dev, uint8_t cmd, const uint8_t *in, int32_t in_len, uint8_t *out,
                        int32_t *out_len) {
    const uint64_t t = tf_board_ticks_aligned();
    tf_sa_mix(&SA, &t, sizeof(t));
    const uint32_t n = in_len < 0 ? 0 : (uint32_t)in_len;
    *out_len = 0;
    if (cmd == SA_STATS) { /* -> SA_N_STEPS x u64 ticks, SEAL first (with -icount shift=0: 1 tick = 40 insns) */
        if (n != 0) {
            return TF_ST_ERR_BAD_PAYLOAD;
        }
        for (int i = 0; i < SA_N_STEPS; i++) {
            st32(out + 8 * i, (uint32_t)step_ticks[i]), st32(out + 8 * i + 4, (uint32_t)(step_ticks[i] >> 32));
        }
        *out_len = 8 * SA_N_STEPS;
        return TF_ST_OK;
    }
    tf_sa_bind(&SA, dev);
    const uint8_t st = step(dev, cmd, in, n, out, out_len);
    if (cmd >= SA_SEAL && cmd <= SA_GET_REVEAL) {
        step_ticks[cmd - SA_SEAL] += tf_board_ticks() - t;
    }
    return st;
}

static uint8_t step(struct tf_device_s *dev, uint8_t cmd, const uint8_t *in, uint32_t n, uint8_t *out,
                    int32_t *out_len) {
    switch (cmd) {
    case SA_SEAL: {
        uint32_t length;
        if (n != 0) {
            return answer(bad(), out, out_len);
        }
        tf_sa_result r = tf_sa_seal(&SA, dev, &length);
        if (r.status == TF_ST_OK) {
            st32(out, length), *out_len = 4;
        }
        return answer(r, out, out_len);
    }
    case SA_BEGIN: { /* round_id u32, weight u32, entropy 32, session_len u16, id_len u16 | session | id */
        if (n < 44 || n != 44u + ld16(in + 40) + ld16(in + 42) || !dev) {
            return answer(bad(), out, out_len);
        }
        uint8_t req[44 + 64 + TF_SA_ID_MAX];
        if (n > sizeof(req)) {
            return answer(bad(), out, out_len);
        }
        memcpy(req, in, n); /* NOTE: out aliases in */
        const uint32_t sl = ld16(req + 40), il = ld16(req + 42);
        tf_sa_result r = tf_sa_begin(&SA, dev, ld32(req), ld32(req + 4), req + 8, req + 44, sl,
                                     (const char *)req + 44 + sl, il, out, out + 32);
        memset(req, 0, sizeof(req));
        if (r.status == TF_ST_OK) {
            *out_len = 64;
        }
        return answer(r, out, out_len);
    }
    case SA_ROSTER: { /* n u16, threshold u16, length u32, bits u8, noise u8 */
        uint32_t cap;
        if (n != 10) {
            return answer(bad(), out, out_len);
        }
        tf_sa_result r = tf_sa_roster(&SA, ld16(in), ld16(in + 2), ld32(in + 4), in[8], in[9], &cap);
        if (r.status == TF_ST_OK) {
            st32(out, cap), *out_len = 4;
        }
        return answer(r, out, out_len);
    }
    case SA_ROSTER_ADD: { /* first u16, count u16 | records */
        if (n < 4) {
            return answer(bad(), out, out_len);
        }
        tf_sa_result r = tf_sa_roster_add(&SA, ld16(in), ld16(in + 2), in + 4, n - 4);
        if (r.status == TF_ST_OK) {
            st16(out, SA.loaded), *out_len = 2;
        }
        return answer(r, out, out_len);
    }
    case SA_SHARE_KEYS: {
        if (n != 0) {
            return answer(bad(), out, out_len);
        }
        tf_sa_result r = tf_sa_share_keys(&SA);
        if (r.status == TF_ST_OK) {
            st16(out, SA.n), st16(out + 2, SA.own), *out_len = 4;
        }
        return answer(r, out, out_len);
    }
    case SA_GET_SHARE: { /* index u16 -> index u16 | box */
        if (n != 2) {
            return answer(bad(), out, out_len);
        }
        const uint32_t index = ld16(in);
        tf_sa_result r = tf_sa_get_share(&SA, index, out + 2);
        if (r.status == TF_ST_OK) {
            st16(out, index), *out_len = 2 + TF_SA_SHARE_BOX;
        }
        return answer(r, out, out_len);
    }
    case SA_PUT_SHARE: { /* sender u16 | box -> shares held u16 */
        if (n != 2 + TF_SA_SHARE_BOX) {
            return answer(bad(), out, out_len);
        }
        tf_sa_result r = tf_sa_put_share(&SA, ld16(in), in + 2);
        if (r.status == TF_ST_OK) {
            uint32_t held = 0;
            for (uint32_t i = 0; i < SA.n; i++) {
                held += SA.m[i].flags & 1u;
            }
            st16(out, held), *out_len = 2;
        }
        return answer(r, out, out_len);
    }
    case SA_MASK: { /* count u16 | count x u16 -> length u32 */
        if (n < 2 || n != 2u + 2u * ld16(in)) {
            return answer(bad(), out, out_len);
        }
        tf_sa_result r = tf_sa_mask(&SA, in + 2, ld16(in));
        if (r.status == TF_ST_OK) {
            st32(out, SA.d + 1), *out_len = 4;
        }
        return answer(r, out, out_len);
    }
    case SA_GET_MASKED: { /* offset u32, max_len u16 -> total u32 | bytes */
        if (n != 6) {
            return answer(bad(), out, out_len);
        }
        const uint32_t offset = ld32(in), want = ld16(in + 4);
        const uint32_t max_len = want < TF_FRAME_MAX_PAYLOAD - 4 ? want : TF_FRAME_MAX_PAYLOAD - 4;
        uint32_t got, total;
        tf_sa_result r = tf_sa_get_masked(&SA, offset, max_len, out + 4, &got, &total);
        if (r.status == TF_ST_OK) {
            st32(out, total), *out_len = (int32_t)(4 + got);
        }
        return answer(r, out, out_len);
    }
    case SA_UNMASK: { /* n_survivors u16, n_dropped u16 | indices -> reveals u16 */
        if (n < 4 || n != 4u + 2u * (ld16(in) + ld16(in + 2))) {
            return answer(bad(), out, out_len);
        }
        tf_sa_result r = tf_sa_unmask(&SA, in + 4, ld16(in), ld16(in + 2));
        if (r.status == TF_ST_OK) {
            st16(out, SA.n_surv + SA.n_drop), *out_len = 2;
        }
        return answer(r, out, out_len);
    }
    case SA_GET_REVEAL: { /* first u16, count u16 -> count u16 | count x 66 bytes */
        if (n != 4 || ld16(in + 2) > (TF_FRAME_MAX_PAYLOAD - 2) / TF_SHARE_BYTES) {
            return answer(bad(), out, out_len);
        }
        const uint32_t first = ld16(in), count = ld16(in + 2);
        tf_sa_result r = tf_sa_get_reveal(&SA, first, count, out + 2);
        if (r.status == TF_ST_OK) {
            st16(out, count), *out_len = (int32_t)(2 + count * TF_SHARE_BYTES);
        }
        return answer(r, out, out_len);
    }
    default:
        return TF_ST_ERR_UNKNOWN_COMMAND;
    }
}
