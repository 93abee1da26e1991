/* Ed25519 signature verification (RFC 8032 section 5.1.7, pure Ed25519): the check a board runs on a downlink
 * blob signed with the fleet key. Verification only: no signing, no secret data, so not constant time. No
 * malloc, no tables in RAM, about 1.5 KB of stack. It refuses a non-canonical S (S >= L), a public key that does
 * not decode (y >= p, x^2 not a square, x = 0 with the sign bit set) and, as RFC 8032 and OpenSSL do, compares
 * the encoding of [S]B - [k]A with the 32 R bytes of the signature (cofactorless). */
#ifndef TF_ED25519_H
#define TF_ED25519_H

#include <stdint.h>

/* 1 if sig (R ‖ S, 64 bytes) is pub's Ed25519 signature of msg[0, n), else 0. */
int tf_ed25519_verify(const uint8_t sig[64], const uint8_t *msg, uint32_t n, const uint8_t pub[32]);

#endif /* TF_ED25519_H */
