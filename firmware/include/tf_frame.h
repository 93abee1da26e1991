/* UART frame layout, the C twin of device_agent/wire/frames.py (docs/formats.md, "UART frames"):
 * COBS( seq u16 | code u8 | payload | crc16 u16 ) 0x00, little-endian, CRC-16/CCITT-FALSE over all bytes before
 * it. A request's code is a command, a response's code is a status; the response repeats the request's seq. */
#ifndef TF_FRAME_H
#define TF_FRAME_H

#include <stdint.h>

#define TF_PROTOCOL_VERSION 2 /* 2: STORE_SAMPLES, TRAIN_LIST */
#define TF_FRAME_MAX_PAYLOAD 512
#define TF_FRAME_OVERHEAD 5
#define TF_FRAME_MAX_RAW (TF_FRAME_MAX_PAYLOAD + TF_FRAME_OVERHEAD)
#define TF_FRAME_MAX_ENCODED (TF_FRAME_MAX_RAW + (TF_FRAME_MAX_RAW + 253) / 254 + 1) /* 521, without the 0x00 */
#define TF_SEQ_UNKNOWN 0xFFFFu

/* frames.Command */
enum {
    TF_CMD_PING = 0x01,
    TF_CMD_LOAD_PLAN = 0x02,
    TF_CMD_LOAD_UPDATE = 0x03,
    TF_CMD_PUSH_SAMPLE = 0x04,
    TF_CMD_TRAIN = 0x05,
    TF_CMD_GET_DELTA = 0x06,
    TF_CMD_GET_STATS = 0x07,
    TF_CMD_SELFTEST = 0x08,      /* resp <IIiIQ: cases, passed, first_failed, crc32, ticks */
    TF_CMD_BOARD_INFO = 0x09,    /* resp <IIQIIIIIIII: see tf_proto.c cmd_board_info */
    TF_CMD_STATE_HASH = 0x0A,    /* resp <32sIIIIQ: sha256 of the trainable tensors, update_counter, model_version,
                                  * steps_total, p_label_q15 of the last step, ticks of the last TRAIN */
    TF_CMD_STORE_SAMPLES = 0x0B, /* v2: req <III first_slot, offset, total + batch chunk; resp <III received,
                                  * samples_stored, sample_capacity */
    TF_CMD_TRAIN_LIST = 0x0C,    /* v2: req <iiII lr_m, lr_e, round_id, count + count x u16 slots; resp as TRAIN */
    /* 0x20-0x2F: personalization (include/tf_proto_ext.h, src/proto/tf_proto_personal.c)
     * 0x30-0x3F: secure aggregation (include/tf_proto_ext.h, src/proto/tf_proto_secagg.c)
     * 0x7E / 0x7F: test builds only (kernel bench, stack-overflow fault test) */
};
#define TF_CMD_PERSONAL_FIRST 0x20
#define TF_CMD_PERSONAL_LAST 0x2F
#define TF_CMD_SECAGG_FIRST 0x30
#define TF_CMD_SECAGG_LAST 0x3F

/* frames.Status */
enum {
    TF_ST_OK = 0x00,
    TF_ST_ERR_CRC = 0x01,
    TF_ST_ERR_UNKNOWN_COMMAND = 0x02,
    TF_ST_ERR_BAD_PAYLOAD = 0x03,
    TF_ST_ERR_STATE = 0x04,
    TF_ST_ERR_NO_MEMORY = 0x05,
    TF_ST_ERR_FORMAT = 0x06,
    TF_ST_ERR_BUSY = 0x07,
    TF_ST_ERR_INTERNAL = 0x08,
};

/* errors.WireError values the frame layer reports (as BOARD_INFO last_error) */
enum {
    TF_WIRE_TRUNCATED = 1,
    TF_WIRE_CRC_MISMATCH = 6,
    TF_WIRE_BAD_COBS = 23,
    TF_WIRE_FRAME_TOO_LONG = 24,
};

/* CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final xor ("123456789" -> 0x29B1). */
uint16_t tf_crc16(const uint8_t *data, uint32_t n);

#endif /* TF_FRAME_H */
