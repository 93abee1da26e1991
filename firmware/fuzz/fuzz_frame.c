/* libFuzzer target: the board's UART side (tf_proto_feed: deframing, COBS, length and CRC16 checks, command
 * dispatch into a device with 64 KB of store) under ASan/UBSan. Every response the board writes must itself be a
 * valid frame. Input byte 0 picks the mode: even = the rest is a raw line byte stream (what a UART delivers);
 * odd = the rest is raw frames, each `len u16 | seq | code | payload`, that this harness CRCs and COBS-encodes
 * so mutations reach the command handlers past the CRC gate. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tf_cobs.h"
#include "tf_device.h"
#include "tf_proto.h"

static uint8_t store[64 * 1024] __attribute__((aligned(64)));
static uint8_t pool[64 * 1024] __attribute__((aligned(64)));
static tf_device dev;
static tf_proto proto;

/* The board's output: 0x00-delimited frames, each must COBS-decode, carry a right CRC and fit the limits. */
static void on_write(const uint8_t *buf, uint32_t n) {
    static uint8_t raw[TF_FRAME_MAX_RAW];
    uint32_t start = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (buf[i] != 0) {
            continue;
        }
        if (i > start) {
            int32_t m = tf_cobs_decode(buf + start, (int32_t)(i - start), raw, (int32_t)sizeof(raw));
            if (m < TF_FRAME_OVERHEAD || tf_crc16(raw, (uint32_t)m - 2) != (uint16_t)(raw[m - 2] | raw[m - 1] << 8)) {
                __builtin_trap(); /* the board wrote a frame its own reader refuses */
            }
        }
        start = i + 1;
    }
}

static void feed(const uint8_t *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        tf_proto_feed(&proto, b[i]);
    }
}

/* One raw frame -> CRC16 -> COBS -> 0x00, fed to the board. */
static void feed_frame(uint8_t *raw, uint32_t len) {
    static uint8_t enc[TF_FRAME_MAX_ENCODED + 8];
    if (len >= 3) {
        if (raw[2] == TF_CMD_SELFTEST) {
            raw[2] = TF_CMD_GET_STATS; /* NOTE: the kernel self-test takes ~a second per call: not a reader */
        }
        if (raw[2] == TF_CMD_TRAIN && len >= 7) {
            raw[3] &= 3, raw[4] = raw[5] = raw[6] = 0; /* at most 3 training steps per frame */
        }
    }
    uint16_t crc = tf_crc16(raw, len);
    raw[len] = (uint8_t)crc, raw[len + 1] = (uint8_t)(crc >> 8);
    int32_t m = tf_cobs_encode(raw, (int32_t)len + 2, enc, (int32_t)sizeof(enc) - 1);
    if (m < 0) {
        return;
    }
    enc[m] = 0;
    feed(enc, (size_t)m + 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    static uint8_t raw[TF_FRAME_MAX_RAW + 8];
    const tf_verify unsigned_only = {0, NULL, 0};
    tf_device_init(&dev, store, sizeof(store), pool, sizeof(pool), &unsigned_only);
    tf_proto_init(&proto, on_write);
    tf_proto_set_device(&proto, &dev);
    if (n == 0) {
        return 0;
    }
    if ((data[0] & 1) == 0) {
        feed(data + 1, n - 1);
        tf_proto_feed(&proto, 0);
        return 0;
    }
    size_t pos = 1;
    while (pos + 2 <= n) {
        uint32_t len = (uint32_t)(data[pos] | data[pos + 1] << 8) % (TF_FRAME_MAX_RAW + 4);
        pos += 2;
        if (len > n - pos) {
            len = (uint32_t)(n - pos);
        }
        memcpy(raw, data + pos, len);
        pos += len;
        feed_frame(raw, len);
    }
    return 0;
}
