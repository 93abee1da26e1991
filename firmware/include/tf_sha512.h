/* SHA-512 (FIPS 180-4): the hash inside Ed25519 verification (k = SHA-512(R ‖ A ‖ M)). Portable C, incremental,
 * any length; it refuses nothing and keeps no secrets (verification only, so no wiping). */
#ifndef TF_SHA512_H
#define TF_SHA512_H

#include <stdint.h>

typedef struct {
    uint64_t h[8];
    uint64_t len; /* bytes hashed so far (< 2^64: far beyond any blob) */
    uint8_t buf[128];
    uint32_t used; /* bytes in buf */
} tf_sha512_ctx;

void tf_sha512_init(tf_sha512_ctx *c);
void tf_sha512_update(tf_sha512_ctx *c, const void *data, uint32_t n);
void tf_sha512_final(tf_sha512_ctx *c, uint8_t out[64]);
void tf_sha512(const void *data, uint32_t n, uint8_t out[64]);

#endif /* TF_SHA512_H */
