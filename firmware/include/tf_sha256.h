/* SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104): plan / model hashes, the state hash, HMAC-signed blobs.
 * Portable C, no tables beyond the 64 round constants; refuses nothing (any length, incremental). */
#ifndef TF_SHA256_H
#define TF_SHA256_H

#include <stdint.h>

typedef struct {
    uint32_t h[8];
    uint64_t len; /* bytes hashed so far */
    uint8_t buf[64];
    uint32_t used; /* bytes in buf */
} tf_sha256_ctx;

void tf_sha256_init(tf_sha256_ctx *c);
void tf_sha256_update(tf_sha256_ctx *c, const void *data, uint32_t n);
void tf_sha256_final(tf_sha256_ctx *c, uint8_t out[32]);
void tf_sha256(const void *data, uint32_t n, uint8_t out[32]);
/* HMAC-SHA256 of msg under key (any key length). */
void tf_hmac_sha256(const uint8_t *key, uint32_t key_len, const void *msg, uint32_t n, uint8_t out[32]);

#endif /* TF_SHA256_H */
