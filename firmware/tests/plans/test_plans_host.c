/* Host test: runs whole plans from golden .tfv vectors (tests/firmware/gen_plan_vectors.py) through the plan
 * reader and runtime and compares every byte (trainable state, last logits, per-step correct, state hash) with
 * the Python reference; also checks the wire readers against tests/vectors/MANIFEST.txt when given --manifest.
 * usage: test_plans [--manifest DIR] file.tfv ... */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tf_runtime.h"
#include "tf_sha256.h"

static uint8_t *read_file(const char *path, uint32_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = (uint8_t *)malloc((size_t)len + 4);
    if (buf && fread(buf, 1, (size_t)len, f) != (size_t)len) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *n = (uint32_t)len;
    return buf;
}

static uint32_t p4(uint32_t n) { return (n + 3u) & ~3u; }

static int run_vector(const char *path) {
    uint32_t n, pos = 0;
    uint8_t *v = read_file(path, &n);
    if (!v || n < 28 || memcmp(v, "TFTV", 4) != 0 || tf_ld_u32(v + 4) != 2) {
        printf("FAIL %s: not a TFTV v2 file\n", path);
        return 1;
    }
    const uint32_t steps = tf_ld_u32(v + 8), n_samples = tf_ld_u32(v + 20), sample_bytes = tf_ld_u32(v + 24);
    const int32_t lr_m = (int32_t)tf_ld_u32(v + 12), lr_e = (int32_t)tf_ld_u32(v + 16);
    const uint32_t plan_len = tf_ld_u32(v + 28);
    pos = 32;
    const uint8_t *blob = v + pos; /* malloc'd buffer + 32: 4-byte aligned */
    pos += p4(plan_len);
    const uint8_t *samples = v + pos;
    pos += p4(n_samples * sample_bytes);
    const uint8_t *labels = v + pos;
    pos += 4 * n_samples;
    const uint8_t *want_hash = v + pos;
    const uint32_t state_len = tf_ld_u32(v + pos + 32);
    const uint8_t *want_state = v + pos + 36;
    pos += 36 + p4(state_len);
    const uint32_t k = tf_ld_u32(v + pos);
    const int8_t *want_logits = (const int8_t *)(v + pos + 4);
    pos += 4 + p4(k);
    const uint8_t *want_correct = v + pos;
    pos += p4(steps);
    const uint32_t opt_len = tf_ld_u32(v + pos);
    const uint8_t *want_opt = v + pos + 4;
    const uint32_t want_pending = tf_ld_u32(v + pos + 4 + p4(opt_len));

    static tf_runtime rt;
    tf_plan plan;
    const tf_verify unsigned_only = {0, NULL, 0};
    int e = tf_plan_read(blob, plan_len, &unsigned_only, &plan);
    if (e) {
        printf("FAIL %s: plan reader says wire error %d\n", path, e);
        return 1;
    }
    uint32_t pool_size = tf_runtime_pool_need(&plan);
    uint8_t *pool = (uint8_t *)malloc(pool_size + 8);
    memset(pool, 0xA5, pool_size + 8); /* poison: nothing may depend on the arena's previous contents */
    e = tf_runtime_load(&rt, &plan, pool, pool_size, 1);
    if (e) {
        printf("FAIL %s: runtime load error %d at op %d\n", path, e, (int)rt.err_op);
        return 1;
    }
    int bad = 0;
    for (uint32_t s = 0; s < steps; s++) {
        tf_step_result r;
        const uint32_t i = s % n_samples;
        e = tf_runtime_step(&rt, samples + i * sample_bytes, (int32_t)tf_ld_u32(labels + 4 * i), lr_m, lr_e, &r);
        if (e) {
            printf("FAIL %s: step %u error %d at op %d (kernel status %d)\n", path, s, e, (int)rt.err_op,
                   (int)rt.err_status);
            return 1;
        }
        if ((uint32_t)r.correct != want_correct[s]) {
            printf("FAIL %s: step %u correct %d, reference %d\n", path, s, (int)r.correct, want_correct[s]);
            bad = 1;
        }
    }
    if ((int32_t)k != rt.n_classes || memcmp(rt.logits, want_logits, k) != 0) {
        printf("FAIL %s: logits of the last step differ\n", path);
        bad = 1;
    }
    uint32_t off = 0;
    for (uint32_t t = 0; t < plan.n_tensors; t++) {
        tf_tensor_info ti;
        tf_plan_tensor(&plan, (int32_t)t, &ti);
        if (ti.kind != TF_K_TRAINABLE) {
            continue;
        }
        if (off + ti.nbytes > state_len || memcmp(rt.ptr[t], want_state + off, ti.nbytes) != 0) {
            uint32_t name_len;
            const char *name = tf_plan_string(&plan, 2 + t, &name_len);
            printf("FAIL %s: trainable tensor %u (%.*s) differs from the reference\n", path, t, (int)name_len, name);
            bad = 1;
        }
        off += ti.nbytes;
    }
    if (opt_len != (plan.has_recipe ? plan.opt_bytes : 0) || (opt_len && memcmp(rt.opt, want_opt, opt_len) != 0) ||
        rt.pending != want_pending) {
        printf("FAIL %s: optimizer region (%u bytes) or pending samples (%u, reference %u) differ\n", path, opt_len,
               rt.pending, want_pending);
        bad = 1;
    }
    uint8_t h[32];
    tf_runtime_state_hash(&rt, h);
    if (off != state_len || memcmp(h, want_hash, 32) != 0) {
        printf("FAIL %s: state hash differs\n", path);
        bad = 1;
    }
    if (!bad) {
        printf("ok %s: %u steps, %u trainable tensors (%u bytes), arena %u, optimizer %u (%u pending), state ", path,
               steps, rt.n_trainable, state_len, plan.arena_bytes, opt_len, rt.pending);
        for (int i = 0; i < 8; i++) {
            printf("%02x", h[i]);
        }
        printf("\n");
    }
    free(pool);
    free(v);
    return bad;
}

/* MANIFEST lines: file format verify expect ...; plans and updates only, unsigned, Ed25519 and HMAC policies. */
static const char *const WIRE_NAMES[] = {
    "ok",           "TRUNCATED", "BAD_MAGIC",     "UNSUPPORTED_VERSION", "BAD_LENGTH",       "TRAILING_BYTES",
    "CRC_MISMATCH", "UNSIGNED",  "BAD_SIGNATURE", "SIG_ALG_MISMATCH",    "RESERVED_NONZERO", "BAD_ENUM",
    "BAD_INDEX",    "BAD_SCALE", "SIZE_OVERFLOW", "OUT_OF_ARENA",        "BAD_SHAPE",        "BAD_OFFSET",
    "BAD_STRING",   "BAD_VALUE", "ID_ORDER",      "NOT_CANONICAL",       "PLAN_MISMATCH"};

/* tf_update_read_only: tf_wire.h (src/wire/tf_update_read.c) */

static int run_manifest(const char *dir) {
    char path[512], line[512];
    snprintf(path, sizeof(path), "%s/MANIFEST.txt", dir);
    FILE *f = fopen(path, "r");
    if (!f) {
        printf("FAIL manifest %s missing\n", path);
        return 1;
    }
    uint32_t key_len = 0;
    snprintf(path, sizeof(path), "%s/keys/test_hmac.key", dir);
    uint8_t *key = read_file(path, &key_len);
    uint32_t pub_len = 0;
    snprintf(path, sizeof(path), "%s/keys/test_ed25519.pub", dir);
    uint8_t *pub = read_file(path, &pub_len);
    int checked = 0, bad = 0, skipped = 0, ed25519 = 0;
    while (fgets(line, sizeof(line), f)) {
        char file[256], fmt[32], ver[32], expect[64];
        if (line[0] == '#' || sscanf(line, "%255s %31s %31s %63s", file, fmt, ver, expect) != 4) {
            continue;
        }
        int is_plan = strcmp(fmt, "plan") == 0, is_upd = strcmp(fmt, "update") == 0;
        if (!is_plan && !is_upd) {
            skipped++; /* deltas are written, not read, by the board */
            continue;
        }
        const int is_ed = strcmp(ver, "ed25519") == 0;
        tf_verify v = {is_ed ? 1 : strcmp(ver, "hmac") == 0 ? 2 : 0, is_ed ? pub : key, is_ed ? pub_len : key_len};
        uint32_t n;
        snprintf(path, sizeof(path), "%s/%s", dir, file);
        uint8_t *blob = read_file(path, &n);
        if (blob && is_upd && n >= 6 && memcmp(blob, "TFUP", 4) == 0 && tf_ld_u16(blob + 4) != 1) {
            skipped++; /* a newer update layout (coordinator <-> agent); the bridge sends the board TFUP v1 */
            free(blob);
            continue;
        }
        tf_plan plan;
        int e = is_plan ? tf_plan_read(blob, n, &v, &plan) : tf_update_read_only(blob, n, &v);
        int want = -1;
        for (int i = 0; i < (int)(sizeof(WIRE_NAMES) / sizeof(*WIRE_NAMES)); i++) {
            if (strcmp(expect, WIRE_NAMES[i]) == 0) {
                want = i;
            }
        }
        checked++;
        ed25519 += is_ed;
        if (e != want) {
            printf("FAIL manifest %s: got wire error %d, expected %s\n", file, e, expect);
            bad = 1;
        }
        if (want == 0) { /* every prefix is TRUNCATED (4..n-1), every single-bit flip refused */
            for (uint32_t cut = 0; cut < n; cut += 1 + n / 64) {
                int ep = is_plan ? tf_plan_read(blob, cut, &v, &plan) : tf_update_read_only(blob, cut, &v);
                if (ep != 1) {
                    printf("FAIL manifest %s: prefix %u gives %d, not TRUNCATED\n", file, cut, ep);
                    bad = 1;
                    break;
                }
            }
            for (uint32_t bit = 0; bit < n * 8; bit += 7) {
                blob[bit / 8] ^= (uint8_t)(1u << (bit % 8));
                int ef = is_plan ? tf_plan_read(blob, n, &v, &plan) : tf_update_read_only(blob, n, &v);
                blob[bit / 8] ^= (uint8_t)(1u << (bit % 8));
                if (ef == 0) {
                    printf("FAIL manifest %s: bit flip %u accepted\n", file, bit);
                    bad = 1;
                    break;
                }
            }
        }
        free(blob);
    }
    fclose(f);
    free(key);
    free(pub);
    printf("%s manifest: %d blobs checked (%d Ed25519-signed), %d skipped (not a downlink format / not TFUP v1; 0 for "
           "Ed25519)\n",
           bad ? "FAIL" : "ok", checked, ed25519, skipped);
    return bad;
}

int main(int argc, char **argv) {
    int bad = 0, runs = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--manifest") == 0 && i + 1 < argc) {
            bad |= run_manifest(argv[++i]);
        } else {
            bad |= run_vector(argv[i]);
            runs++;
        }
    }
    printf("plan vectors: %d run, %s\n", runs, bad ? "FAILED" : "all bit-exact");
    return bad ? EXIT_FAILURE : EXIT_SUCCESS;
}
