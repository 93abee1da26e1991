/* Differential decoding tool (tests/firmware/test_fuzz_differential.py): the C readers' verdict and a digest of
 * the values they decoded, one line per input, for comparison with device_agent/wire on the same bytes.
 *
 * usage: decode_cli plan|update|frames [--hmac KEYFILE | --ed25519 PUBFILE] < batch
 * batch: records `u32 len | len bytes`, little-endian. Output, one line per record:
 *   plan / update: `ok <sha256 hex of the decoded values>` or `err <WireError>`;
 *   frames (the record is a line byte stream, the tool appends a final 0x00): one word per frame the board
 *   answered, `ok:<sha256 hex of seq|code|payload>` or `err:<WireError>` (`-` when the stream held no frame).
 * The digest layouts are in fuzz/digest.py, the Python half; test code only, never on a board. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tf_cobs.h"
#include "tf_device.h"
#include "tf_proto.h"
#include "tf_sha256.h"

static tf_sha256_ctx H;
static void h_u8(uint32_t v) {
    uint8_t b = (uint8_t)v;
    tf_sha256_update(&H, &b, 1);
}
static void h_u32(uint32_t v) {
    uint8_t b[4];
    tf_st_u32(b, v);
    tf_sha256_update(&H, b, 4);
}
static void h_bytes(const uint8_t *p, uint32_t n) {
    h_u32(n);
    tf_sha256_update(&H, p, n);
}
static void h_print(const char *prefix) {
    uint8_t d[32];
    tf_sha256_final(&H, d);
    printf("%s", prefix);
    for (int i = 0; i < 32; i++) {
        printf("%02x", d[i]);
    }
}

/* Plan digest: header ids, arena, scheme, every tensor (kind, dtype, rank, personal, dims, zp, offset, scales,
 * data), every op (type, arity, ids, attributes in tf_op_attr_spec order), every string. */
static void plan_digest(const tf_plan *p) {
    const uint8_t *h = p->blob + 16;
    tf_sha256_init(&H);
    h_u32(p->n_tensors), h_u32(p->n_ops), h_u32((uint32_t)p->input_id), h_u32((uint32_t)p->label_id);
    h_u32((uint32_t)p->logits_id), h_u32(p->arena_bytes);
    const uint32_t n_ratios = tf_ld_u32(h + 32);
    h_u32(tf_ld_u32(h + 24)), h_u32(tf_ld_u32(h + 28) & 3u), h_u32(n_ratios); /* scheme flags (fuzz/digest.py) */
    for (uint32_t i = 0; i < n_ratios; i++) {
        h_u32(tf_ld_u32(h + 40 + 8 * i)), h_u32(tf_ld_u32(h + 44 + 8 * i));
    }
    for (uint32_t i = 0; i < p->n_tensors; i++) {
        tf_tensor_info t;
        tf_plan_tensor(p, (int32_t)i, &t);
        h_u8(t.kind), h_u8(t.dtype), h_u8(t.rank), h_u8(t.flags & 1u);
        for (uint32_t k = 0; k < t.rank; k++) {
            h_u32((uint32_t)t.dims[k]);
        }
        h_u32((uint32_t)t.zero_point), h_u32((uint32_t)t.offset);
        h_bytes(p->blob + t.scales_off, 4 * t.n_scales);
        h_bytes(p->blob + t.data_off, t.data_len);
    }
    uint32_t off = p->ops_off;
    for (uint32_t i = 0; i < p->n_ops; i++) {
        tf_op_view op;
        tf_plan_op(p, off, &op);
        h_u8(op.type), h_u8(op.n_in), h_u8(op.n_out);
        const uint8_t *q = p->blob + off + 8;
        for (uint32_t k = 0; k < (uint32_t)op.n_in + op.n_out; k++, q += 4) {
            h_u32(tf_ld_u32(q));
        }
        for (const char *a = tf_op_attr_spec(op.type); *a; a++) {
            const uint32_t v = tf_ld_u32(q);
            q += 4;
            if (*a == 'a') {
                h_bytes(q, 4 * v);
                q += 4 * v;
            } else {
                h_u32(v);
            }
        }
        off += op.size;
    }
    for (uint32_t i = 0; i < 2 + p->n_tensors + p->n_ops; i++) {
        uint32_t len = 0;
        const char *s = tf_plan_string(p, i, &len);
        h_bytes((const uint8_t *)s, len);
    }
    h_print("ok ");
}

/* Model update v1 digest: versions, plan hash, per record id, dtype and value bytes. Runs only on a blob
 * tf_update_read_only accepted, so the records are known to lie inside the body. */
static void update_digest(const uint8_t *blob) {
    const uint8_t *body = blob + 16;
    tf_sha256_init(&H);
    const uint32_t n = tf_ld_u32(body + 40);
    h_u32(tf_ld_u32(body)), h_u32(tf_ld_u32(body + 4)), h_bytes(body + 8, 32), h_u32(n);
    uint32_t pos = 44;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *r = body + pos;
        const uint32_t dtype = r[4], count = tf_ld_u32(r + 8), w = dtype == 1 ? 1u : dtype == 2 ? 2u : 4u;
        h_u32(tf_ld_u32(r)), h_u8(dtype), h_bytes(r + 12, count * w);
        pos += 12 + ((count * w + 3u) & ~3u);
    }
    h_print("ok ");
}

/* ---- frames: the board's own receive path (tf_proto_feed, no device attached) ---- */
static tf_proto proto;
static void sink(const uint8_t *buf, uint32_t n) { (void)buf, (void)n; }

static void frames(const uint8_t *b, uint32_t n) {
    static uint8_t enc[TF_FRAME_MAX_ENCODED + 1], raw[TF_FRAME_MAX_RAW];
    tf_proto_init(&proto, sink);
    uint32_t enc_len = 0, words = 0;
    for (uint32_t i = 0; i <= n; i++) {
        const uint8_t byte = i < n ? b[i] : 0;
        const uint32_t ok0 = proto.frames_ok, bad0 = proto.frames_bad;
        tf_proto_feed(&proto, byte);
        if (byte) {
            if (enc_len < sizeof(enc)) {
                enc[enc_len++] = byte;
            }
            continue;
        }
        if (proto.frames_ok != ok0) {
            int32_t m = tf_cobs_decode(enc, (int32_t)enc_len, raw, (int32_t)sizeof(raw));
            tf_sha256_init(&H);
            h_bytes(raw, (uint32_t)m - 2);
            h_print(words++ ? " ok:" : "ok:");
        } else if (proto.frames_bad != bad0) {
            printf(words++ ? " err:%u" : "err:%u", (unsigned)proto.last_error);
        }
        enc_len = 0;
    }
    if (!words) {
        printf("-");
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: decode_cli plan|update|frames [--hmac KEYFILE | --ed25519 PUBFILE] < batch\n");
        return 2;
    }
    const char *fmt = argv[1];
    static uint8_t key[256];
    tf_verify v = {0, NULL, 0};
    if (argc == 4 && (strcmp(argv[2], "--hmac") == 0 || strcmp(argv[2], "--ed25519") == 0)) {
        FILE *kf = fopen(argv[3], "rb");
        if (!kf) {
            fprintf(stderr, "decode_cli: cannot open key file %s\n", argv[3]);
            return 2;
        }
        v.alg = strcmp(argv[2], "--hmac") == 0 ? 2 : 1, v.key = key;
        v.key_len = (uint32_t)fread(key, 1, sizeof(key), kf);
        fclose(kf);
    }
    uint8_t hdr[4];
    while (fread(hdr, 1, 4, stdin) == 4) {
        const uint32_t n = tf_ld_u32(hdr);
        uint8_t *b = (uint8_t *)malloc(n ? n : 1); /* exactly n bytes: ASan sees any overread */
        if (!b || fread(b, 1, n, stdin) != n) {
            fprintf(stderr, "decode_cli: batch ends inside a record\n");
            return 2;
        }
        if (strcmp(fmt, "plan") == 0) {
            tf_plan p;
            const int e = tf_plan_read(b, n, &v, &p);
            if (e) {
                printf("err %d", e);
            } else {
                plan_digest(&p);
            }
        } else if (strcmp(fmt, "update") == 0) {
            const int e = tf_update_read_only(b, n, &v);
            if (e) {
                printf("err %d", e);
            } else {
                update_digest(b);
            }
        } else {
            frames(b, n);
        }
        printf("\n");
        free(b);
    }
    return 0;
}
