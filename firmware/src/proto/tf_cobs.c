/* COBS encode/decode, written from the published algorithm (Cheshire & Baker, 1999). */
#include "tf_cobs.h"

int32_t tf_cobs_encode(const uint8_t *src, int32_t n, uint8_t *dst, int32_t cap) {
    if (cap < 1) {
        return -1;
    }
    int32_t code_at = 0, out = 1;
    uint8_t code = 1;
    for (int32_t i = 0; i < n; i++) {
        if (src[i] == 0) {
            dst[code_at] = code;
            code_at = out++;
            code = 1;
        } else {
            if (out >= cap) {
                return -1;
            }
            dst[out++] = src[i];
            code++;
            if (code == 0xFF) {
                dst[code_at] = code;
                code_at = out++;
                code = 1;
            }
        }
        if (out > cap) {
            return -1;
        }
    }
    dst[code_at] = code;
    return out;
}

int32_t tf_cobs_decode(const uint8_t *src, int32_t n, uint8_t *dst, int32_t cap) {
    int32_t i = 0, out = 0;
    while (i < n) {
        uint8_t code = src[i++];
        if (code == 0 || i + code - 1 > n) {
            return -1;
        }
        for (int32_t j = 1; j < code; j++, i++) {
            if (src[i] == 0) {
                return -1;
            }
            if (out < cap) {
                dst[out] = src[i];
            }
            out++;
        }
        if (code != 0xFF && i < n) {
            if (out < cap) {
                dst[out] = 0;
            }
            out++;
        }
    }
    /* NOTE: a too-long frame is still checked to the end: bad COBS anywhere wins, as in frames.py */
    return out > cap ? -2 : out;
}
