/* Helpers shared by the libFuzzer targets in firmware/fuzz/ (docs/formats.md "Robustness"): the test HMAC key and
 * the envelope fix-up that lets mutated bodies past the length and CRC gates. Test code only, never on a board. */
#ifndef TF_FUZZ_UTIL_H
#define TF_FUZZ_UTIL_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tf_crc.h"
#include "tf_wire.h"

/* = tests/vectors/keys/test_hmac.key, so the HMAC-signed golden vectors pass as seeds */
static const uint8_t TF_FUZZ_HMAC_KEY[32] = {
    0x5c, 0x0e, 0x1e, 0xb8, 0x12, 0x01, 0xd3, 0x01, 0x55, 0xbd, 0x7a, 0xa9, 0x84, 0x49, 0x40, 0x0c,
    0x0d, 0xd5, 0xc2, 0x08, 0x50, 0xbf, 0x0e, 0xf7, 0x81, 0x2c, 0x63, 0xc3, 0x5c, 0x91, 0x57, 0x65,
};

/* = tests/vectors/keys/test_ed25519.pub, so the Ed25519-signed golden vectors pass as seeds */
static const uint8_t TF_FUZZ_ED25519_PUB[32] = {
    0x40, 0x60, 0x22, 0xed, 0x81, 0xaa, 0xd2, 0x0c, 0x37, 0x19, 0x25, 0x57, 0xc6, 0x2f, 0x12, 0x2e,
    0xf3, 0x58, 0x33, 0x5a, 0x78, 0x9a, 0x39, 0x39, 0xdd, 0xc0, 0xcf, 0xce, 0xc6, 0x84, 0x00, 0x2f,
};

/* A heap copy of exactly n bytes (so ASan sees any read past the end), or NULL for n == 0. */
static inline uint8_t *tf_fuzz_copy(const uint8_t *data, size_t n) {
    if (n == 0) {
        return NULL;
    }
    uint8_t *b = (uint8_t *)malloc(n);
    memcpy(b, data, n);
    return b;
}

/* NOTE: random bytes almost never carry a right CRC32, so a fuzzer that only feeds raw inputs tests the CRC check
 * and little else. This rewrites a copy into an unsigned blob of its own length with a correct CRC (magic, version
 * and body untouched), which reaches the body checks. Returns 0 when the input is too short to carry a header. */
static inline int tf_fuzz_reseal(uint8_t *b, size_t n) {
    if (n < 20 || n > 0x7FFFFFFFu) {
        return 0;
    }
    tf_st_u32(b + 8, (uint32_t)n);
    b[6] = b[7] = 0;                   /* flags */
    b[12] = b[13] = b[14] = b[15] = 0; /* sig_alg, sig_len: unsigned */
    tf_st_u32(b + n - 4, tf_crc32(b, (uint32_t)n - 4));
    return 1;
}

#endif /* TF_FUZZ_UTIL_H */
