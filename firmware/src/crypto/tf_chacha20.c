/* ChaCha20 block function, written from RFC 8439 section 2.3 (20 rounds, 32-bit counter, 96-bit nonce). */
#include <string.h>

#include "tf_secagg.h"

#define ROTL(x, n) (((x) << (n)) | ((x) >> (32 - (n))))
#define QR(a, b, c, d)                                                                                                 \
    do {                                                                                                               \
        a += b;                                                                                                        \
        d ^= a;                                                                                                        \
        d = ROTL(d, 16);                                                                                               \
        c += d;                                                                                                        \
        b ^= c;                                                                                                        \
        b = ROTL(b, 12);                                                                                               \
        a += b;                                                                                                        \
        d ^= a;                                                                                                        \
        d = ROTL(d, 8);                                                                                                \
        c += d;                                                                                                        \
        b ^= c;                                                                                                        \
        b = ROTL(b, 7);                                                                                                \
    } while (0)

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void tf_chacha20_block(uint8_t out[64], const uint8_t key[32], uint32_t counter, const uint8_t nonce[12]) {
    uint32_t s[16], x[16];
    s[0] = 0x61707865u; /* "expand 32-byte k" */
    s[1] = 0x3320646eu;
    s[2] = 0x79622d32u;
    s[3] = 0x6b206574u;
    for (int i = 0; i < 8; i++) {
        s[4 + i] = le32(key + 4 * i);
    }
    s[12] = counter;
    for (int i = 0; i < 3; i++) {
        s[13 + i] = le32(nonce + 4 * i);
    }
    memcpy(x, s, sizeof(x));
    for (int r = 0; r < 10; r++) {
        QR(x[0], x[4], x[8], x[12]); /* columns */
        QR(x[1], x[5], x[9], x[13]);
        QR(x[2], x[6], x[10], x[14]);
        QR(x[3], x[7], x[11], x[15]);
        QR(x[0], x[5], x[10], x[15]); /* diagonals */
        QR(x[1], x[6], x[11], x[12]);
        QR(x[2], x[7], x[8], x[13]);
        QR(x[3], x[4], x[9], x[14]);
    }
    for (int i = 0; i < 16; i++) {
        const uint32_t v = x[i] + s[i];
        out[4 * i] = (uint8_t)v;
        out[4 * i + 1] = (uint8_t)(v >> 8);
        out[4 * i + 2] = (uint8_t)(v >> 16);
        out[4 * i + 3] = (uint8_t)(v >> 24);
    }
}
