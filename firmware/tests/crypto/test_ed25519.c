/* Host test of the Ed25519 verifier and SHA-512 (firmware/src/runtime/tf_ed25519.c, tf_sha512.c): RFC 8032
 * TEST 1-3, a 1023-byte message and their mutations (tests/firmware/gen_ed25519_vectors.py), SHA-512 at every
 * padding boundary, fed whole and in uneven pieces; the key slot reader and the envelope under each policy.
 * Exits non-zero on any mismatch. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ed25519_vectors.h"
#include "tf_ed25519.h"
#include "tf_crc.h"
#include "tf_sha512.h"
#include "tf_wire.h"

static int check_sha512(void) {
    static uint8_t data[1000];
    int bad = 0;
    for (uint32_t i = 0; i < sizeof(data); i++) {
        data[i] = (uint8_t)(i * 13 + 1);
    }
    for (size_t c = 0; c < sizeof(SHA512_CASES) / sizeof(*SHA512_CASES); c++) {
        const sha512_case *t = &SHA512_CASES[c];
        uint8_t whole[64], pieces[64];
        tf_sha512(data, t->len, whole);
        tf_sha512_ctx ctx;
        tf_sha512_init(&ctx);
        for (uint32_t at = 0, step = 1; at < t->len; at += step, step = step * 3 % 257 + 1) {
            tf_sha512_update(&ctx, data + at, at + step > t->len ? t->len - at : step);
        }
        tf_sha512_final(&ctx, pieces);
        if (memcmp(whole, t->digest, 64) != 0 || memcmp(pieces, t->digest, 64) != 0) {
            printf("FAIL sha512 of %u bytes\n", (unsigned)t->len);
            bad = 1;
        }
    }
    return bad;
}

/* tf_key_slot_read gives the code and policy of device_agent/wire/keyslot.py; the envelope reader under each
 * policy: Ed25519 key -> the signed envelope opens, an edited body (CRC fixed up) is BAD_SIGNATURE, an unsigned one
 * UNSIGNED; HMAC key -> SIG_ALG_MISMATCH; a damaged slot refuses everything. */
static int check_key_slots(void) {
    int bad = 0;
    uint8_t blob[sizeof(ENV_ED25519)];
    const uint8_t *body;
    uint32_t body_len;
    for (size_t c = 0; c < sizeof(KEY_SLOT_CASES) / sizeof(*KEY_SLOT_CASES); c++) {
        const key_slot_case *t = &KEY_SLOT_CASES[c];
        tf_verify v;
        const int e = tf_key_slot_read(t->slot, TF_KEY_SLOT_BYTES, &v);
        if (e != t->code || v.alg != t->alg || (e == 0 && v.alg != 0 && v.key != t->slot + 12)) {
            printf("FAIL key slot %s: code %d alg %d, expected code %d alg %d\n", t->name, e, v.alg, t->code, t->alg);
            bad = 1;
            continue;
        }
        memcpy(blob, ENV_ED25519, sizeof(blob));
        const int signed_ok = tf_envelope_open(blob, sizeof(blob), "TEST", 1, &v, &body, &body_len);
        blob[16] ^= 1; /* body edit, CRC recomputed: only the signature can catch it */
        tf_st_u32(blob + sizeof(blob) - 4, tf_crc32(blob, sizeof(blob) - 4));
        const int edited = tf_envelope_open(blob, sizeof(blob), "TEST", 1, &v, &body, &body_len);
        const int unsig = tf_envelope_open(ENV_UNSIGNED, sizeof(ENV_UNSIGNED), "TEST", 1, &v, &body, &body_len);
        int want_s, want_e, want_u;
        if (t->code == 0 && t->alg == 1) { /* the fleet key */
            want_s = TF_WE_OK, want_e = TF_WE_BAD_SIGNATURE, want_u = TF_WE_UNSIGNED;
        } else if (t->code == 0 && t->alg == 2) {
            want_s = want_e = TF_WE_SIG_ALG_MISMATCH, want_u = TF_WE_UNSIGNED;
        } else if (t->code == 0) { /* erased: unsigned only */
            want_s = want_e = TF_WE_SIG_ALG_MISMATCH, want_u = TF_WE_OK;
        } else { /* damaged: fail closed */
            want_s = want_e = TF_WE_BAD_SIGNATURE, want_u = TF_WE_UNSIGNED;
        }
        if (signed_ok != want_s || edited != want_e || unsig != want_u) {
            printf("FAIL key slot %s: envelopes give %d %d %d, expected %d %d %d\n", t->name, signed_ok, edited, unsig,
                   want_s, want_e, want_u);
            bad = 1;
        }
    }
    return bad;
}

int main(void) {
    int bad = check_sha512() | check_key_slots(), valid = 0, differ = 0;
    const int n = (int)(sizeof(ED_CASES) / sizeof(*ED_CASES));
    for (int i = 0; i < n; i++) {
        const ed_case *t = &ED_CASES[i];
        const int got = tf_ed25519_verify(t->sig, t->msg, t->msg_len, t->pub);
        if (got != t->valid) {
            printf("FAIL ed25519 %s: verify gives %d, expected %d\n", t->name, got, t->valid);
            bad = 1;
        }
        valid += got;
        differ += got != t->openssl;
    }
    printf("%s ed25519: %d cases (%d valid), sha512: %d lengths, key slots: %d; %d verdicts differ from OpenSSL "
           "(non-canonical "
           "public keys, refused as RFC 8032 5.1.3 says)\n",
           bad ? "FAIL" : "ok", n, valid, (int)(sizeof(SHA512_CASES) / sizeof(*SHA512_CASES)),
           (int)(sizeof(KEY_SLOT_CASES) / sizeof(*KEY_SLOT_CASES)), differ);
    return bad ? EXIT_FAILURE : EXIT_SUCCESS;
}
