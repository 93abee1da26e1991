/* libFuzzer target: command sequences against a device that holds a plan (tests/vectors/plans/tiny.tfv, loaded
 * before every input), through the board's UART side (tf_proto_feed) under ASan/UBSan. The plan store is one
 * malloc of exactly STORE bytes, so a write past it (where a real board keeps its key slot) is a report.
 *
 * The input is a list of operations; each op is a byte and its arguments, taken from the input (zeros when it
 * runs out). Declared sizes come from pick_size(): raw u32s and the edges that break 32-bit sums (2^32 - k,
 * 2^31 +- k, the store size +- k, the free space +- k). LOAD_CONT continues the transfer in progress the way the
 * bridge does (offset = bytes received, same total, up to 256 chunks in one op), so a wrapped size check
 * reaches memcpy within a few ops. Every frame the board writes must decode with a right CRC. Test code only. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tf_cobs.h"
#include "tf_device.h"
#include "tf_proto.h"

#ifndef TF_FUZZ_PLAN_TFV
#error "build with -DTF_FUZZ_PLAN_TFV='\"path/to/tiny.tfv\"' (firmware/Makefile does)"
#endif

#define STORE (16u * 1024u)
#define POOL (64u * 1024u)
#define CHUNK (TF_FRAME_MAX_PAYLOAD - 8)

static uint8_t *plan;
static uint32_t plan_len;
static tf_device dev;
static tf_proto proto;

typedef struct {
    const uint8_t *p;
    size_t n;
} input;

static uint32_t u8(input *in) {
    if (in->n == 0) {
        return 0;
    }
    in->n--;
    return *in->p++;
}
static uint32_t u16(input *in) { return u8(in) | u8(in) << 8; }
static uint32_t u32(input *in) { return u16(in) | u16(in) << 16; }

/* The board's output: 0x00-delimited frames, each must COBS-decode and carry a right CRC. */
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

/* seq | cmd | payload -> CRC16 -> COBS -> 0x00 into the board. */
static void send(uint8_t cmd, const uint8_t *payload, uint32_t n) {
    static uint8_t raw[TF_FRAME_MAX_RAW + 8], enc[TF_FRAME_MAX_ENCODED + 8];
    static uint16_t seq;
    if (n > TF_FRAME_MAX_PAYLOAD) {
        n = TF_FRAME_MAX_PAYLOAD;
    }
    raw[0] = (uint8_t)seq, raw[1] = (uint8_t)(seq >> 8), raw[2] = cmd;
    seq++;
    if (n) {
        memcpy(raw + 3, payload, n);
    }
    const uint16_t crc = tf_crc16(raw, n + 3);
    raw[n + 3] = (uint8_t)crc, raw[n + 4] = (uint8_t)(crc >> 8);
    int32_t m = tf_cobs_encode(raw, (int32_t)n + 5, enc, (int32_t)sizeof(enc) - 1);
    if (m < 0) {
        return;
    }
    enc[m] = 0;
    for (int32_t i = 0; i <= m; i++) {
        tf_proto_feed(&proto, enc[i]);
    }
}

static uint8_t *put32(uint8_t *q, uint32_t v) {
    q[0] = (uint8_t)v, q[1] = (uint8_t)(v >> 8), q[2] = (uint8_t)(v >> 16), q[3] = (uint8_t)(v >> 24);
    return q + 4;
}

static uint32_t input_nbytes(void) {
    if (!dev.has_plan) {
        return 0;
    }
    tf_tensor_info t;
    tf_plan_tensor(&dev.rt.plan, dev.rt.plan.input_id, &t);
    return t.nbytes;
}

/* A declared size or offset: raw, or one of the edges where 32-bit sums wrap or limits sit. */
static uint32_t pick_size(input *in, uint32_t exact) {
    const uint32_t mode = u8(in), k = u8(in);
    const uint32_t room = dev.samples_at > dev.upd_off ? dev.samples_at - dev.upd_off : 0;
    switch (mode % 9) {
    case 0:
        return u32(in);
    case 1:
        return 0u - 1u - k; /* 2^32 - 1 - k */
    case 2:
        return 0x80000000u + k - 128u;
    case 3:
        return STORE + k - 128u;
    case 4:
        return room + k - 128u;
    case 5:
        return k;
    case 6:
        return exact + k % 8 - 4;
    case 7:
        return 0u - 64u * (k + 1); /* 2^32 - 64 (k + 1) */
    default:
        return exact;
    }
}

/* n chunk bytes: from the input, zero when it runs out */
static uint32_t fill(input *in, uint8_t *q, uint32_t n) {
    const uint32_t take = in->n < n ? (uint32_t)in->n : n;
    memcpy(q, in->p, take);
    memset(q + take, 0, n - take);
    in->p += take, in->n -= take;
    return n;
}

static void op_load_start(input *in, uint32_t op) {
    uint8_t pl[TF_FRAME_MAX_PAYLOAD];
    const uint8_t cmd = (op & 16) ? TF_CMD_LOAD_UPDATE : TF_CMD_LOAD_PLAN;
    const uint32_t total = pick_size(in, plan_len), n = u16(in) % (CHUNK + 1);
    uint8_t *q = put32(put32(pl, 0), total);
    if (op & 32) { /* the good plan's bytes, so whole transfers reach the readers */
        const uint32_t m = n < plan_len ? n : plan_len;
        memcpy(q, plan, m);
        send(cmd, pl, 8 + m);
        return;
    }
    send(cmd, pl, 8 + fill(in, q, n));
}

/* Continue the transfer in progress as the bridge would: offset = received so far, same total. */
static void op_load_cont(input *in, uint32_t op) {
    uint8_t pl[TF_FRAME_MAX_PAYLOAD];
    const uint32_t times = u8(in) + 1;
    const uint8_t cmd = (op & 16) ? TF_CMD_LOAD_UPDATE : TF_CMD_LOAD_PLAN;
    for (uint32_t t = 0; t < times; t++) {
        const uint32_t off = dev.xfer_got, total = dev.xfer_total;
        const uint32_t left = total - off, n = left < CHUNK ? left : CHUNK;
        uint8_t *q = put32(put32(pl, off), total);
        if ((op & 32) && off < plan_len) {
            const uint32_t m = plan_len - off < n ? plan_len - off : n;
            memcpy(q, plan + off, m);
            memset(q + m, 0, n - m);
        } else {
            memset(q, (int)(op & 0xC0), n);
        }
        send(cmd, pl, 8 + n);
        if (dev.xfer_cmd != cmd) {
            return; /* finished or refused */
        }
    }
}

static void op_push_sample(input *in, uint32_t op) {
    uint8_t pl[TF_FRAME_MAX_PAYLOAD];
    const uint32_t offset = (op & 16) ? dev.sample_got : (op & 32) ? pick_size(in, 0) : 0;
    const uint32_t total = pick_size(in, input_nbytes());
    const uint32_t label = u8(in) % 4, n = u16(in) % (TF_FRAME_MAX_PAYLOAD - 12 + 1);
    uint8_t *q = put32(put32(put32(pl, offset), total), label);
    send(TF_CMD_PUSH_SAMPLE, pl, 12 + fill(in, q, n));
}

static void op_store_samples(input *in, uint32_t op) {
    uint8_t pl[TF_FRAME_MAX_PAYLOAD];
    const uint32_t rec = 4 + dev.sample_bytes;
    const uint32_t first = (op & 16) ? pick_size(in, dev.sample_cap) : u8(in) % 8;
    const uint32_t offset = (op & 32) ? dev.batch_got : (op & 64) ? pick_size(in, 0) : 0;
    const uint32_t total = (op & 128) ? pick_size(in, rec) : rec * (u8(in) % 4 + 1);
    const uint32_t n = u16(in) % (TF_FRAME_MAX_PAYLOAD - 12 + 1);
    uint8_t *q = put32(put32(put32(pl, first), offset), total);
    send(TF_CMD_STORE_SAMPLES, pl, 12 + fill(in, q, n));
}

static void op_train(input *in, uint32_t op) {
    uint8_t pl[16 + 2 * 8];
    const uint32_t lr_e = (op & 64) ? u32(in) : (uint32_t)-10; /* raw: any exponent, the int32 edges included */
    if (op & 16) {                                             /* TRAIN_LIST of up to 8 slots */
        const uint32_t count = u8(in) % 9;
        uint8_t *q = put32(put32(put32(put32(pl, 1024), lr_e), 1), count);
        for (uint32_t i = 0; i < count; i++) {
            const uint32_t s = (op & 32) ? u16(in) : u8(in) % 8;
            q[0] = (uint8_t)s, q[1] = (uint8_t)(s >> 8), q += 2;
        }
        send(TF_CMD_TRAIN_LIST, pl, (uint32_t)(q - pl));
    } else {
        uint8_t *q = put32(put32(put32(put32(pl, u8(in) % 3 + 1), (op & 32) ? u32(in) : 1024), lr_e), 1);
        send(TF_CMD_TRAIN, pl, (uint32_t)(q - pl));
    }
}

static void op_delta(input *in, uint32_t op) {
    uint8_t pl[8];
    const uint32_t offset = (op & 16) ? pick_size(in, dev.delta_total) : u16(in) % 64;
    const uint32_t max_len = u16(in), permille = (op & 32) ? u16(in) : u16(in) % 1001;
    put32(pl, offset);
    pl[4] = (uint8_t)max_len, pl[5] = (uint8_t)(max_len >> 8), pl[6] = (uint8_t)permille;
    pl[7] = (uint8_t)(permille >> 8);
    send(TF_CMD_GET_DELTA, pl, 8);
}

static void op_raw(input *in) {
    uint8_t pl[TF_FRAME_MAX_PAYLOAD + 4];
    uint8_t cmd = (uint8_t)u8(in);
    if (cmd == TF_CMD_SELFTEST || cmd >= 0x7E) {
        cmd = TF_CMD_GET_STATS; /* NOTE: the kernel self-test takes ~a second per call; 0x7E/0x7F are test-only */
    }
    if (cmd == TF_CMD_TRAIN) {
        cmd = TF_CMD_STATE_HASH; /* unbounded steps: op_train bounds them */
    }
    const uint32_t n = u16(in) % (TF_FRAME_MAX_PAYLOAD + 4);
    send(cmd, pl, fill(in, pl, n));
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    FILE *f = fopen(TF_FUZZ_PLAN_TFV, "rb");
    uint8_t h[32];
    if (!f || fread(h, 1, 32, f) != 32 || memcmp(h, "TFTV", 4) != 0) {
        fprintf(stderr, "fuzz_cmds: cannot read %s\n", TF_FUZZ_PLAN_TFV);
        exit(2);
    }
    plan_len = tf_ld_u32(h + 28); /* TFTV v2: magic, version, steps, lr_m, lr_e, n, sample bytes, plan bytes */
    plan = (uint8_t *)malloc(plan_len);
    if (!plan || fread(plan, 1, plan_len, f) != plan_len) {
        exit(2);
    }
    fclose(f);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *store = (uint8_t *)malloc(STORE), *pool = (uint8_t *)malloc(POOL);
    const tf_verify unsigned_only = {0, NULL, 0};
    tf_device_init(&dev, store, STORE, pool, POOL, &unsigned_only);
    tf_proto_init(&proto, on_write);
    tf_proto_set_device(&proto, &dev);
    uint32_t got = 0;
    for (uint32_t off = 0; off < plan_len; off += CHUNK) { /* the plan, as LOAD_PLAN chunks */
        const uint32_t n = plan_len - off < CHUNK ? plan_len - off : CHUNK;
        if (tf_device_load(&dev, TF_CMD_LOAD_PLAN, off, plan_len, plan + off, n, &got).status != TF_ST_OK) {
            __builtin_trap(); /* the seed plan must load */
        }
    }
    input in = {data, size};
    for (uint32_t ops = 0; in.n > 0 && ops < 64; ops++) {
        const uint32_t op = u8(&in);
        switch (op % 8) {
        case 0:
            op_raw(&in);
            break;
        case 1:
            op_load_start(&in, op);
            break;
        case 2:
            op_load_cont(&in, op);
            break;
        case 3:
            op_push_sample(&in, op);
            break;
        case 4:
            op_store_samples(&in, op);
            break;
        case 5:
            op_train(&in, op);
            break;
        case 6:
            op_delta(&in, op);
            break;
        default:
            send((op & 16) ? TF_CMD_STATE_HASH : TF_CMD_GET_STATS, NULL, 0);
            break;
        }
    }
    free(store);
    free(pool);
    return 0;
}
