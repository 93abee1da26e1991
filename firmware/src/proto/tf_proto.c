/* Frame reassembly, CRC check and command dispatch for the board (device_agent/wire/frames.py is the spec).
 * A frame that fails COBS/CRC/length is counted and answered with ERR_CRC and seq 0xFFFF, never acted on. */
#include "tf_proto.h"

#include <string.h>

#include "selftest.h"
#include "tf_board.h"
#include "tf_cobs.h"
#include "tf_device.h"
#include "tf_proto_ext.h"
#include "tf_sha256.h"

uint16_t tf_crc16(const uint8_t *data, uint32_t n) {
    uint16_t crc = 0xFFFF;
    for (uint32_t i = 0; i < n; i++) {
        crc ^= (uint16_t)(data[i] << 8);
        for (int b = 0; b < 8; b++) {
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
        }
    }
    return crc;
}

static uint8_t *put_u16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8);
    return p + 2;
}
static uint8_t *put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
    return p + 4;
}
static uint8_t *put_u64(uint8_t *p, uint64_t v) { return put_u32(put_u32(p, (uint32_t)v), (uint32_t)(v >> 32)); }

void tf_proto_init(tf_proto *p, tf_write_fn write) {
    memset(p, 0, sizeof(*p));
    p->write = write;
}

void tf_proto_set_device(tf_proto *p, tf_device *dev) { p->dev = dev; }

static uint32_t get_u32(const uint8_t *q) {
    return (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24;
}

/* Send seq | status | msg[3 .. 3+len) | crc16. */
static void reply(tf_proto *p, uint32_t seq, uint8_t status, int32_t len) {
    put_u16(p->msg, seq);
    p->msg[2] = status;
    uint16_t crc = tf_crc16(p->msg, (uint32_t)(3 + len));
    put_u16(p->msg + 3 + len, crc);
    int32_t enc = tf_cobs_encode(p->msg, 3 + len + 2, p->tx, (int32_t)sizeof(p->tx) - 1);
    if (enc < 0) {
        return; /* cannot happen: tx holds the worst case */
    }
    p->tx[enc] = 0;
    p->write(p->tx, (uint32_t)enc + 1);
}

void tf_proto_write_status(tf_write_fn write, uint8_t status) {
    uint8_t raw[TF_FRAME_OVERHEAD], enc[TF_FRAME_OVERHEAD + 3];
    put_u16(raw, TF_SEQ_UNKNOWN);
    raw[2] = status;
    put_u16(raw + 3, tf_crc16(raw, 3));
    enc[0] = 0;
    int32_t n = tf_cobs_encode(raw, TF_FRAME_OVERHEAD, enc + 1, (int32_t)sizeof(enc) - 2);
    enc[n + 1] = 0;
    write(enc, (uint32_t)n + 2);
}

static void reject(tf_proto *p, uint32_t wire_error) {
    p->frames_bad++;
    p->last_error = wire_error;
    reply(p, TF_SEQ_UNKNOWN, TF_ST_ERR_CRC, 0);
}

static uint32_t stack_high_water(void) { return tf_board_stack_size() - tf_board_stack_unused(); }

/* PING resp <HHII: protocol_version, max_payload, blob_capacity, sram_bytes */
static tf_device *p_dev; /* set by handle() for the helpers below */

static int32_t cmd_ping(uint8_t *out) {
    uint32_t arena = 0;
    (void)tf_board_arena(&arena);
    uint8_t *q = put_u16(out, TF_PROTOCOL_VERSION);
    q = put_u16(q, TF_FRAME_MAX_PAYLOAD);
    q = put_u32(q, p_dev ? p_dev->store_size : 0); /* blob_capacity: the plan store */
    q = put_u32(q, tf_board_ram_size());
    return (int32_t)(q - out);
}

/* GET_STATS resp <IIIIII: samples_held, steps_total, update_counter, arena_bytes, stack_high_water, plan_bytes */
static int32_t cmd_stats(uint8_t *out) {
    uint32_t arena = 0;
    (void)tf_board_arena(&arena);
    const int has = p_dev && p_dev->has_plan;
    uint8_t *q = put_u32(out, has ? p_dev->samples_stored : 0); /* slots holding a sample */
    q = put_u32(q, p_dev ? p_dev->steps_total : 0);
    q = put_u32(q, has ? p_dev->rt.step : 0);
    q = put_u32(q, has ? p_dev->rt.plan.arena_bytes : arena);
    q = put_u32(q, stack_high_water());
    q = put_u32(q, has ? p_dev->plan_len : 0);
    return (int32_t)(q - out);
}

/* BOARD_INFO resp <IIQIIIIIIII: cpuid, tick_hz, ticks, stack_size, stack_high_water, arena_bytes, static_ram,
 * flash_used, frames_ok, frames_bad, last_error */
static int32_t cmd_board_info(const tf_proto *p, uint8_t *out) {
    uint32_t arena = 0;
    (void)tf_board_arena(&arena);
    uint8_t *q = put_u32(out, tf_board_cpuid());
    q = put_u32(q, tf_board_tick_hz());
    q = put_u64(q, tf_board_ticks());
    q = put_u32(q, tf_board_stack_size());
    q = put_u32(q, stack_high_water());
    q = put_u32(q, arena);
    q = put_u32(q, tf_board_static_ram());
    q = put_u32(q, tf_board_flash_used());
    q = put_u32(q, p->frames_ok);
    q = put_u32(q, p->frames_bad);
    q = put_u32(q, p->last_error);
    return (int32_t)(q - out);
}

#ifndef TF_NO_SELFTEST
/* SELFTEST resp <IIiIQ: cases, passed, first_failed, crc32, ticks (work memory: the arena) */
static int32_t cmd_selftest(uint8_t *out) {
    uint32_t size = 0;
    uint8_t *arena = tf_board_arena(&size);
    tf_selftest_result r;
    uint64_t t0 = tf_board_ticks_aligned();
    tf_selftest_run(arena, size, NULL, 0, &r);
    uint64_t dt = tf_board_ticks() - t0;
    uint8_t *q = put_u32(out, (uint32_t)r.cases);
    q = put_u32(q, (uint32_t)r.passed);
    q = put_u32(q, (uint32_t)r.first_failed);
    q = put_u32(q, r.crc32);
    q = put_u64(q, dt);
    return (int32_t)(q - out);
}
#endif

#ifdef TF_BENCH
int32_t tf_bench_run(uint8_t *arena, uint32_t size, uint64_t *out);
#endif
#ifdef TF_FAULT_TEST
#define TF_CMD_FAULT_TEST 0x7F
/* 64 levels of 256 live bytes: twice the stack. With the guard a MemManage fault, without it a silent write
 * into the arena. */
static __attribute__((noinline)) uint32_t tf_fault_test_recurse(uint32_t depth) {
    volatile uint8_t pad[256];
    pad[0] = (uint8_t)depth;
    return depth >= 64u ? pad[0] : tf_fault_test_recurse(depth + 1) + pad[0]; /* 64 x 256 B > 8 KB stack */
}
#endif

/* Answer a device result: OK with `len` payload bytes, or the error status with its detail payload. */
static void reply_dev(tf_proto *p, uint32_t seq, tf_dev_result r, int32_t len) {
    uint8_t *out = p->msg + 3;
    if (r.status == TF_ST_OK) {
        reply(p, seq, TF_ST_OK, len);
    } else if (r.status == TF_ST_ERR_STATE || r.status == TF_ST_ERR_NO_MEMORY) {
        reply(p, seq, r.status, (int32_t)(put_u32(out, r.detail) - out));
    } else if (r.status == TF_ST_ERR_FORMAT) {
        reply(p, seq, r.status, (int32_t)(put_u16(put_u16(out, r.detail), 0) - out));
    } else {
        reply(p, seq, r.status, 0);
    }
}

/* LOAD_PLAN, LOAD_UPDATE, PUSH_SAMPLE, TRAIN, GET_DELTA, STORE_SAMPLES, TRAIN_LIST (docs/formats.md "Commands"). */
static void device_command(tf_proto *p, uint32_t seq, uint8_t cmd, int32_t in_len) {
    tf_device *d = p->dev;
    const uint8_t *in = p->msg + 3;
    uint8_t *out = p->msg + 3;
    static uint8_t chunk[TF_FRAME_MAX_PAYLOAD];
    tf_dev_result r;
    uint32_t a = 0, b = 0; /* NOTE: an early refusal leaves them unset; never send indeterminate bytes */
    if (cmd == TF_CMD_LOAD_PLAN || cmd == TF_CMD_LOAD_UPDATE) {
        if (in_len < 8) {
            reply(p, seq, TF_ST_ERR_BAD_PAYLOAD, 0);
            return;
        }
        memcpy(chunk, in + 8, (uint32_t)in_len - 8);
        r = tf_device_load(d, cmd, get_u32(in), get_u32(in + 4), chunk, (uint32_t)in_len - 8, &a);
        reply_dev(p, seq, r, (int32_t)(put_u32(out, a) - out));
    } else if (cmd == TF_CMD_PUSH_SAMPLE) {
        if (in_len < 12) {
            reply(p, seq, TF_ST_ERR_BAD_PAYLOAD, 0);
            return;
        }
        memcpy(chunk, in + 12, (uint32_t)in_len - 12);
        r = tf_device_push_sample(d, get_u32(in), get_u32(in + 4), (int32_t)get_u32(in + 8), chunk,
                                  (uint32_t)in_len - 12, &a);
        reply_dev(p, seq, r, (int32_t)(put_u32(put_u32(out, a), d->samples_held) - out));
    } else if (cmd == TF_CMD_TRAIN) {
        if (in_len != 16) {
            reply(p, seq, TF_ST_ERR_BAD_PAYLOAD, 0);
            return;
        }
        const uint32_t steps = get_u32(in);
        const uint64_t t0 = tf_board_ticks_aligned();
        r = tf_device_train(d, steps, (int32_t)get_u32(in + 4), (int32_t)get_u32(in + 8), get_u32(in + 12), &a, &b);
        p->train_ticks = tf_board_ticks() - t0;
        uint8_t *q = put_u32(out, r.status == TF_ST_OK ? steps : 0);
        q = put_u32(put_u32(put_u32(q, a), b), d->rt.step);
        reply_dev(p, seq, r, (int32_t)(q - out));
    } else if (cmd == TF_CMD_STORE_SAMPLES) {
        if (in_len < 12) {
            reply(p, seq, TF_ST_ERR_BAD_PAYLOAD, 0);
            return;
        }
        memcpy(chunk, in + 12, (uint32_t)in_len - 12);
        r = tf_device_store_samples(d, get_u32(in), get_u32(in + 4), get_u32(in + 8), chunk, (uint32_t)in_len - 12, &a);
        uint8_t *q = put_u32(put_u32(out, a), d->samples_stored);
        reply_dev(p, seq, r, (int32_t)(put_u32(q, d->has_plan ? d->sample_cap : 0) - out));
    } else if (cmd == TF_CMD_TRAIN_LIST) {
        if (in_len < 16 || get_u32(in + 12) > (TF_FRAME_MAX_PAYLOAD - 16) / 2 ||
            (uint32_t)in_len != 16 + 2 * get_u32(in + 12)) {
            reply(p, seq, TF_ST_ERR_BAD_PAYLOAD, 0);
            return;
        }
        const uint32_t count = get_u32(in + 12);
        memcpy(chunk, in + 16, 2 * count);
        const uint64_t t0 = tf_board_ticks_aligned();
        r = tf_device_train_list(d, chunk, count, (int32_t)get_u32(in), (int32_t)get_u32(in + 4), get_u32(in + 8), &b);
        p->train_ticks = tf_board_ticks() - t0;
        const int ok = r.status == TF_ST_OK;
        uint8_t *q = put_u32(put_u32(out, ok ? count : 0), ok ? count : 0);
        q = put_u32(put_u32(q, b), d->rt.step);
        reply_dev(p, seq, r, (int32_t)(q - out));
    } else { /* GET_DELTA */
        if (in_len != 8) {
            reply(p, seq, TF_ST_ERR_BAD_PAYLOAD, 0);
            return;
        }
        uint32_t max_len = (uint32_t)(in[4] | in[5] << 8), permille = (uint32_t)(in[6] | in[7] << 8), total = 0;
        if (max_len > TF_FRAME_MAX_PAYLOAD - 4) {
            max_len = TF_FRAME_MAX_PAYLOAD - 4;
        }
        if (permille > 1000) {
            reply(p, seq, TF_ST_ERR_BAD_PAYLOAD, 0);
            return;
        }
        r = tf_device_delta(d, get_u32(in), max_len, permille, chunk, &a, &total);
        put_u32(out, total);
        memcpy(out + 4, chunk, a);
        reply_dev(p, seq, r, (int32_t)(4 + a));
    }
}

static void handle(tf_proto *p, int32_t n) {
    if (n < TF_FRAME_OVERHEAD) {
        reject(p, TF_WIRE_TRUNCATED);
        return;
    }
    if (n > TF_FRAME_MAX_RAW) {
        reject(p, TF_WIRE_FRAME_TOO_LONG);
        return;
    }
    uint16_t crc = (uint16_t)(p->msg[n - 2] | (p->msg[n - 1] << 8));
    if (tf_crc16(p->msg, (uint32_t)n - 2) != crc) {
        reject(p, TF_WIRE_CRC_MISMATCH);
        return;
    }
    p->frames_ok++;
    const uint32_t seq = (uint32_t)(p->msg[0] | (p->msg[1] << 8));
    const uint8_t cmd = p->msg[2];
    const int32_t in_len = n - TF_FRAME_OVERHEAD;
    uint8_t *out = p->msg + 3; /* the response payload overwrites the request's (read fully before) */
    p_dev = p->dev;
    tf_cmd_handler *family = cmd >= TF_CMD_PERSONAL_FIRST && cmd <= TF_CMD_PERSONAL_LAST ? tf_proto_personal
                             : cmd >= TF_CMD_SECAGG_FIRST && cmd <= TF_CMD_SECAGG_LAST   ? tf_proto_secagg
                                                                                         : NULL;
    if (family) {
        int32_t len = 0;
        const uint8_t status = family(p->dev, cmd, out, in_len, out, &len);
        reply(p, seq, status, len < 0 || len > TF_FRAME_MAX_PAYLOAD ? 0 : len);
        return;
    }
    if (p->dev && ((cmd >= TF_CMD_LOAD_PLAN && cmd <= TF_CMD_GET_DELTA) || cmd == TF_CMD_STORE_SAMPLES ||
                   cmd == TF_CMD_TRAIN_LIST)) {
        device_command(p, seq, cmd, in_len);
        return;
    }
    if (cmd == TF_CMD_STATE_HASH && p->dev) {
        if (in_len != 0) {
            reply(p, seq, TF_ST_ERR_BAD_PAYLOAD, 0);
            return;
        }
        if (!p->dev->has_plan) {
            reply(p, seq, TF_ST_ERR_STATE, (int32_t)(put_u32(out, 0) - out));
            return;
        }
        tf_runtime_state_hash(&p->dev->rt, out);
        uint8_t *q = put_u32(out + 32, p->dev->rt.step);
        q = put_u32(q, p->dev->model_version);
        q = put_u32(q, p->dev->steps_total);
        q = put_u32(q, (uint32_t)p->dev->last_p_label_q15);
        q = put_u64(q, p->train_ticks);
        reply(p, seq, TF_ST_OK, (int32_t)(q - out));
        return;
    }
#ifndef TF_NO_SELFTEST
    if (cmd == TF_CMD_SELFTEST && p->dev && p->dev->has_plan) {
        reply(p, seq, TF_ST_ERR_STATE, (int32_t)(put_u32(out, 0) - out)); /* its work memory is the arena */
        return;
    }
#endif
    switch (cmd) {
    case TF_CMD_PING:
    case TF_CMD_GET_STATS:
#ifndef TF_NO_SELFTEST /* NOTE: SELFTEST=0 builds leave the kernel vectors (~70 KB of flash) out: unknown command */
    case TF_CMD_SELFTEST:
#endif
    case TF_CMD_BOARD_INFO:
        if (in_len != 0) {
            reply(p, seq, TF_ST_ERR_BAD_PAYLOAD, 0);
            return;
        }
        break;
#ifdef TF_BENCH
    case 0x7E: { /* test builds only: kernel micro-benchmark, resp n x u64 ticks */
        uint32_t size = 0;
        uint8_t *arena = tf_board_arena(&size);
        uint64_t t[8];
        int32_t k = tf_bench_run(arena, size, t);
        uint8_t *q = out;
        for (int32_t i = 0; i < k; i++) {
            q = put_u64(q, t[i]);
        }
        reply(p, seq, k < 0 ? TF_ST_ERR_NO_MEMORY : TF_ST_OK, (int32_t)(q - out));
        return;
    }
#endif
#ifdef TF_FAULT_TEST
    case TF_CMD_FAULT_TEST: /* test builds only: overflow the stack into the MPU guard */
        tf_fault_test_recurse(1);
        break;
#endif
    default:
        reply(p, seq, TF_ST_ERR_UNKNOWN_COMMAND, 0);
        return;
    }
    int32_t len = cmd == TF_CMD_PING        ? cmd_ping(out)
                  : cmd == TF_CMD_GET_STATS ? cmd_stats(out)
#ifndef TF_NO_SELFTEST
                  : cmd == TF_CMD_SELFTEST ? cmd_selftest(out)
#endif
                                           : cmd_board_info(p, out);
    reply(p, seq, TF_ST_OK, len);
}

void tf_proto_feed(tf_proto *p, uint8_t byte) {
    if (byte != 0) {
        if (p->rx_len < (int32_t)sizeof(p->rx)) {
            p->rx[p->rx_len++] = byte;
        } else {
            p->rx_overflow = 1;
        }
        return;
    }
    if (p->rx_overflow) {
        reject(p, TF_WIRE_FRAME_TOO_LONG);
    } else if (p->rx_len > 0) {
        int32_t n = tf_cobs_decode(p->rx, p->rx_len, p->msg, (int32_t)sizeof(p->msg));
        if (n < 0) {
            reject(p, n == -2 ? TF_WIRE_FRAME_TOO_LONG : TF_WIRE_BAD_COBS); /* -2: above TF_FRAME_MAX_RAW */
        } else {
            handle(p, n);
        }
    }
    p->rx_len = 0;
    p->rx_overflow = 0;
}
