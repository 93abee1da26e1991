/* Shamir shares over GF(2^521 - 1) on a board: f(x) = secret + c_1 x + ... + c_{t-1} x^{t-1}, the coefficients a
 * ChaCha20 keystream of a secret seed read as 66-byte big-endian numbers masked to 521 bits (p itself reads 0),
 * as device_agent/wire/secagg.py shamir_split with its seed. Horner's rule needs only a 521-bit number times a
 * small x, so the board never multiplies two big numbers nor holds the polynomial. Refuses nothing: x is public
 * and non-zero, the caller checks 1 <= t <= n. */
#include <string.h>

#include "tf_secagg.h"

#define LIMBS 17 /* 544 bits, little-endian 32-bit limbs; an element < 2^521 uses 9 bits of the top limb */

static void load_be66(uint32_t v[LIMBS], const uint8_t b[TF_SHARE_BYTES]) {
    memset(v, 0, LIMBS * sizeof(*v));
    for (uint32_t i = 0; i < TF_SHARE_BYTES; i++) {
        const uint32_t bit = 8 * (TF_SHARE_BYTES - 1 - i); /* big-endian: byte i holds bits bit..bit+7 */
        v[bit / 32] |= (uint32_t)b[i] << (bit % 32);
    }
}

static void store_be66(uint8_t b[TF_SHARE_BYTES], const uint32_t v[LIMBS]) {
    for (uint32_t i = 0; i < TF_SHARE_BYTES; i++) {
        const uint32_t bit = 8 * (TF_SHARE_BYTES - 1 - i);
        b[i] = (uint8_t)(v[bit / 32] >> (bit % 32));
    }
}

/* v mod p for v < 2^544 with v >> 521 < 2^22: fold the bits above 521 twice, then p itself becomes 0 */
static void reduce(uint32_t v[LIMBS]) {
    for (int fold = 0; fold < 2; fold++) {
        uint32_t hi = v[16] >> 9;
        v[16] &= 0x1ffu;
        for (int i = 0; i < LIMBS && hi; i++) {
            const uint64_t s = (uint64_t)v[i] + hi;
            v[i] = (uint32_t)s;
            hi = (uint32_t)(s >> 32);
        }
    }
    uint32_t all = v[16] ^ 0x1ffu; /* zero iff v == p (every low limb all ones, top limb 0x1ff) */
    for (int i = 0; i < 16; i++) {
        all |= ~v[i];
    }
    const uint32_t keep = (uint32_t)0 - (uint32_t)(all != 0);
    for (int i = 0; i < LIMBS; i++) {
        v[i] &= keep;
    }
}

/* coefficient k (1-based) of a polynomial: keystream bytes [66 (k - 1), 66 k) under `seed`, masked to 521 bits */
static void coefficient(uint32_t c[LIMBS], const uint8_t seed[32], uint32_t k) {
    static const uint8_t nonce[12] = {0};
    uint8_t raw[TF_SHARE_BYTES], block[64];
    uint32_t off = TF_SHARE_BYTES * (k - 1), got = 0, counter = off / 64;
    tf_chacha20_block(block, seed, counter, nonce);
    for (uint32_t at = off % 64; got < TF_SHARE_BYTES; at++) {
        if (at == 64) {
            tf_chacha20_block(block, seed, ++counter, nonce);
            at = 0;
        }
        raw[got++] = block[at];
    }
    load_be66(c, raw);
    c[16] &= 0x1ffu;
    reduce(c); /* the masked value is < 2^521: only p itself changes (to 0) */
    memset(raw, 0, sizeof(raw));
    memset(block, 0, sizeof(block));
}

void tf_shamir_share(uint8_t out[TF_SHARE_BYTES], const uint8_t secret[32], const uint8_t seed[32], uint32_t threshold,
                     uint32_t x) {
    uint32_t acc[LIMBS] = {0}, c[LIMBS];
    for (uint32_t k = threshold; k-- > 0;) {
        /* acc = acc * x + c_k (c_0 = the secret, big-endian) */
        uint64_t carry = 0;
        for (int i = 0; i < LIMBS; i++) {
            const uint64_t m = (uint64_t)acc[i] * x + carry;
            acc[i] = (uint32_t)m;
            carry = m >> 32;
        }
        if (k) {
            coefficient(c, seed, k);
        } else {
            memset(c, 0, sizeof(c));
            for (uint32_t i = 0; i < 32; i++) {
                const uint32_t bit = 8 * (31 - i);
                c[bit / 32] |= (uint32_t)secret[i] << (bit % 32);
            }
        }
        carry = 0;
        for (int i = 0; i < LIMBS; i++) {
            const uint64_t s = (uint64_t)acc[i] + c[i] + carry;
            acc[i] = (uint32_t)s;
            carry = s >> 32;
        }
        reduce(acc);
    }
    store_be66(out, acc);
    memset(acc, 0, sizeof(acc));
    memset(c, 0, sizeof(c));
}
