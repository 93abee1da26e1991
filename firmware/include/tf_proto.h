/* The board side of the UART protocol, sans I/O: bytes in (tf_proto_feed), frames out (the write callback).
 * Frame layout: tf_frame.h (= device_agent/wire/frames.py). Board facts come from tf_board.h. */
#ifndef TF_PROTO_H
#define TF_PROTO_H

#include <stdint.h>

#include "tf_frame.h"

typedef void (*tf_write_fn)(const uint8_t *buf, uint32_t n);

typedef struct {
    tf_write_fn write;
    uint8_t rx[TF_FRAME_MAX_ENCODED]; /* COBS bytes of the frame being received */
    int32_t rx_len;
    int32_t rx_overflow;           /* the current frame exceeded the buffer: reject it at the delimiter */
    uint8_t msg[TF_FRAME_MAX_RAW]; /* decoded request, then the response being built */
    uint8_t tx[TF_FRAME_MAX_ENCODED + 1];
    uint32_t frames_ok, frames_bad; /* counted for BOARD_INFO */
    uint32_t last_error;            /* errors.WireError of the last rejected frame */
    struct tf_device_s *dev;        /* the device the commands act on (NULL: PING/STATS/INFO/SELFTEST only) */
    uint64_t train_ticks;           /* board ticks of the last TRAIN command */
} tf_proto;

void tf_proto_init(tf_proto *p, tf_write_fn write);
void tf_proto_feed(tf_proto *p, uint8_t byte);
void tf_proto_set_device(tf_proto *p, struct tf_device_s *dev);
/* One unsolicited status frame (seq 0xFFFF, empty payload), preceded by a 0x00 that ends any partial frame.
 * For fault handlers: uses only its own small stack buffer. */
void tf_proto_write_status(tf_write_fn write, uint8_t status);

#endif /* TF_PROTO_H */
