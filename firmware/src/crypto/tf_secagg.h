/* The device side of secure aggregation's arithmetic on a board: ChaCha20 (RFC 8439), HKDF-SHA256 (RFC 5869)
 * and the masks of device_agent/wire/secagg.py (prg, pair_mask), bit-exact with it on generated golden vectors
 * (firmware/tests/crypto/secagg_vectors.h). Masks are streamed into the input 64 bytes at a time: no mask is
 * ever held whole. Only the 32-bit modulus (bits = 32) is implemented here; it refuses nothing else. */
#ifndef TF_SECAGG_H
#define TF_SECAGG_H

#include <stdint.h>

#define TF_SECAGG_CTX_BYTES 36 /* round id (u32 LE) + SHA-256 of the session label */
#define TF_SHARE_BYTES 66      /* a Shamir share over GF(2^521 - 1), big-endian */
#define TF_AEAD_TAG 16

/* 64 bytes of ChaCha20 keystream: block `counter` under `key` and a 96-bit nonce. */
void tf_chacha20_block(uint8_t out[64], const uint8_t key[32], uint32_t counter, const uint8_t nonce[12]);

/* HKDF-SHA256 with no salt (a zero salt of 32 bytes), 32 bytes of output. */
void tf_hkdf_sha256(uint8_t out[32], const uint8_t *ikm, uint32_t ikm_len, const uint8_t *info, uint32_t info_len);

/* The round context: u32 LE round id then SHA-256(session) (device_agent/wire/secagg.py context). */
void tf_secagg_context(uint8_t ctx[TF_SECAGG_CTX_BYTES], uint32_t round_id, const uint8_t *session, uint32_t n);

/* The ChaCha20 key of a mask seed: HKDF(seed, "tinyfleet-secagg-v1 mask " || ctx). */
void tf_secagg_mask_key(uint8_t key[32], const uint8_t seed[32], const uint8_t ctx[TF_SECAGG_CTX_BYTES]);

/* y[i] += sign * PRG(seed)[i] mod 2^32 for i < n, sign = -1 when `negate`: one mask added in place.
 * y: (n,) uint32. */
void tf_secagg_add_mask(uint32_t *y, uint32_t n, const uint8_t seed[32], const uint8_t ctx[TF_SECAGG_CTX_BYTES],
                        int negate);

typedef struct {
    const char *id;      /* device id (ASCII): the sign of a pairwise mask is + when own id < peer id */
    const uint8_t *s_pk; /* the peer's masking public key, 32 bytes */
} tf_secagg_peer;

/* A masked input: y = x + PRG(b) + sum over peers of sign(own, peer) PRG(X25519(s_sk, peer.s_pk)) mod 2^32.
 * x and y: (n,) uint32 (x two's complement); y may alias x. */
void tf_secagg_mask_input(uint32_t *y, const uint32_t *x, uint32_t n, const uint8_t b[32], const uint8_t s_sk[32],
                          const char *own_id, const tf_secagg_peer *peers, uint32_t n_peers,
                          const uint8_t ctx[TF_SECAGG_CTX_BYTES]);

/* Poly1305 one-time MAC (RFC 8439 2.5) of msg under a 32-byte one-time key. */
void tf_poly1305(uint8_t tag[16], const uint8_t key[32], const uint8_t *msg, uint32_t n);
/* ChaCha20-Poly1305 (RFC 8439 2.8): out = ciphertext (n bytes) || tag (16 bytes). */
void tf_aead_seal(uint8_t *out, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *ad, uint32_t ad_len,
                  const uint8_t *plain, uint32_t n);
/* Inverse of tf_aead_seal for box = ciphertext (n bytes) || tag: 0 and the plaintext, or -1 and nothing written. */
int tf_aead_open(uint8_t *plain, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *ad, uint32_t ad_len,
                 const uint8_t *box, uint32_t n);

/* The Shamir share f(x) of a 32-byte secret (big-endian number) with threshold t: f's coefficients 1..t-1 come
 * from `seed` (device_agent/wire/secagg.py shamir_split(secret, xs, t, seed)). 0 < x < 2^16. */
void tf_shamir_share(uint8_t out[TF_SHARE_BYTES], const uint8_t secret[32], const uint8_t seed[32], uint32_t threshold,
                     uint32_t x);

#endif /* TF_SECAGG_H */
