/* Host test of the Ed25519 verifier and SHA-512 (firmware/src/runtime/tf_ed25519.c, tf_sha512.c): RFC 8032
 * TEST 1-3, a 1023-byte message and their mutations (tests/firmware/gen_ed25519_vectors.py), SHA-512 at every
 * padding boundary, fed whole and in uneven pieces. Exits non-zero on any mismatch. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ed25519_vectors.h"
#include "tf_ed25519.h"
#include "tf_sha512.h"

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

int main(void) {
    int bad = check_sha512(), valid = 0, differ = 0;
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
    printf("%s ed25519: %d cases (%d valid), sha512: %d lengths; %d verdicts differ from OpenSSL (non-canonical "
           "public keys, refused as RFC 8032 5.1.3 says)\n",
           bad ? "FAIL" : "ok", n, valid, (int)(sizeof(SHA512_CASES) / sizeof(*SHA512_CASES)), differ);
    return bad ? EXIT_FAILURE : EXIT_SUCCESS;
}
