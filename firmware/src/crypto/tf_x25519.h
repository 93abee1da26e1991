/* X25519 (RFC 7748): the key agreement of secure aggregation (device_agent/wire/secagg.py pair_seed), in
 * constant time (no branch or memory index depends on a secret). Refuses nothing: every 32-byte input is a
 * scalar (clamped) or a u-coordinate (bit 255 ignored), as the RFC says. */
#ifndef TF_X25519_H
#define TF_X25519_H

#include <stdint.h>

/* out = X25519(scalar, u): the shared secret of a private key and a peer's public key. */
void tf_x25519(uint8_t out[32], const uint8_t scalar[32], const uint8_t u[32]);
/* out = X25519(scalar, 9): the public key of a private key. */
void tf_x25519_public(uint8_t out[32], const uint8_t scalar[32]);

#endif /* TF_X25519_H */
