/* Poly1305 and the ChaCha20-Poly1305 AEAD, written from RFC 8439 sections 2.5 and 2.8 (26-bit limbs, 64-bit
 * products): secure aggregation's share encryption (device_agent/wire/secagg.py pair_aead). Opening compares
 * the tag in constant time and writes no plaintext unless it authenticates. */
#include <string.h>

#include "tf_secagg.h"

#define M26 0x3ffffffu

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void st32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}

typedef struct {
    uint32_t r[5], h[5], pad[4];
} poly;

static void poly_init(poly *p, const uint8_t key[32]) {
    p->r[0] = le32(key) & 0x3ffffffu; /* r clamped: 0x0ffffffc0ffffffc0ffffffc0fffffff */
    p->r[1] = (le32(key + 3) >> 2) & 0x3ffff03u;
    p->r[2] = (le32(key + 6) >> 4) & 0x3ffc0ffu;
    p->r[3] = (le32(key + 9) >> 6) & 0x3f03fffu;
    p->r[4] = (le32(key + 12) >> 8) & 0x00fffffu;
    memset(p->h, 0, sizeof(p->h));
    for (int i = 0; i < 4; i++) {
        p->pad[i] = le32(key + 16 + 4 * i);
    }
}

/* h = (h + block + hibit 2^128) * r mod 2^130 - 5, for one 16-byte block */
static void poly_block(poly *p, const uint8_t m[16], uint32_t hibit) {
    const uint32_t r0 = p->r[0], r1 = p->r[1], r2 = p->r[2], r3 = p->r[3], r4 = p->r[4];
    const uint32_t s1 = r1 * 5, s2 = r2 * 5, s3 = r3 * 5, s4 = r4 * 5;
    uint32_t h0 = p->h[0] + (le32(m) & M26), h1 = p->h[1] + ((le32(m + 3) >> 2) & M26);
    uint32_t h2 = p->h[2] + ((le32(m + 6) >> 4) & M26), h3 = p->h[3] + ((le32(m + 9) >> 6) & M26);
    uint32_t h4 = p->h[4] + ((le32(m + 12) >> 8) | hibit);
    uint64_t d0 = (uint64_t)h0 * r0 + (uint64_t)h1 * s4 + (uint64_t)h2 * s3 + (uint64_t)h3 * s2 + (uint64_t)h4 * s1;
    uint64_t d1 = (uint64_t)h0 * r1 + (uint64_t)h1 * r0 + (uint64_t)h2 * s4 + (uint64_t)h3 * s3 + (uint64_t)h4 * s2;
    uint64_t d2 = (uint64_t)h0 * r2 + (uint64_t)h1 * r1 + (uint64_t)h2 * r0 + (uint64_t)h3 * s4 + (uint64_t)h4 * s3;
    uint64_t d3 = (uint64_t)h0 * r3 + (uint64_t)h1 * r2 + (uint64_t)h2 * r1 + (uint64_t)h3 * r0 + (uint64_t)h4 * s4;
    uint64_t d4 = (uint64_t)h0 * r4 + (uint64_t)h1 * r3 + (uint64_t)h2 * r2 + (uint64_t)h3 * r1 + (uint64_t)h4 * r0;
    d1 += d0 >> 26, h0 = (uint32_t)d0 & M26;
    d2 += d1 >> 26, h1 = (uint32_t)d1 & M26;
    d3 += d2 >> 26, h2 = (uint32_t)d2 & M26;
    d4 += d3 >> 26, h3 = (uint32_t)d3 & M26;
    h0 += (uint32_t)(d4 >> 26) * 5, h4 = (uint32_t)d4 & M26;
    h1 += h0 >> 26, h0 &= M26;
    p->h[0] = h0, p->h[1] = h1, p->h[2] = h2, p->h[3] = h3, p->h[4] = h4;
}

/* data, zero-padded to a multiple of 16 (the AEAD's padding: every block carries the 2^128 bit) */
static void poly_padded(poly *p, const uint8_t *data, uint32_t n) {
    for (; n >= 16; n -= 16, data += 16) {
        poly_block(p, data, 1u << 24);
    }
    if (n) {
        uint8_t last[16] = {0};
        memcpy(last, data, n);
        poly_block(p, last, 1u << 24);
    }
}

static void poly_finish(poly *p, uint8_t tag[16]) {
    uint32_t h0 = p->h[0], h1 = p->h[1], h2 = p->h[2], h3 = p->h[3], h4 = p->h[4], c;
    c = h1 >> 26, h1 &= M26, h2 += c;
    c = h2 >> 26, h2 &= M26, h3 += c;
    c = h3 >> 26, h3 &= M26, h4 += c;
    c = h4 >> 26, h4 &= M26, h0 += c * 5;
    c = h0 >> 26, h0 &= M26, h1 += c;
    /* g = h + 5 - 2^130: use it when it does not go negative (h >= p) */
    uint32_t g0 = h0 + 5;
    c = g0 >> 26, g0 &= M26;
    uint32_t g1 = h1 + c;
    c = g1 >> 26, g1 &= M26;
    uint32_t g2 = h2 + c;
    c = g2 >> 26, g2 &= M26;
    uint32_t g3 = h3 + c;
    c = g3 >> 26, g3 &= M26;
    uint32_t g4 = h4 + c - (1u << 26);
    const uint32_t keep_g = (g4 >> 31) - 1; /* all ones when g4 did not borrow */
    h0 = (h0 & ~keep_g) | (g0 & keep_g), h1 = (h1 & ~keep_g) | (g1 & keep_g);
    h2 = (h2 & ~keep_g) | (g2 & keep_g), h3 = (h3 & ~keep_g) | (g3 & keep_g);
    h4 = (h4 & ~keep_g) | (g4 & keep_g);
    const uint32_t w[4] = {h0 | h1 << 26, h1 >> 6 | h2 << 20, h2 >> 12 | h3 << 14, h3 >> 18 | h4 << 8};
    uint64_t f = 0;
    for (int i = 0; i < 4; i++) {
        f = (uint64_t)w[i] + p->pad[i] + (f >> 32);
        st32(tag + 4 * i, (uint32_t)f);
    }
}

void tf_poly1305(uint8_t tag[16], const uint8_t key[32], const uint8_t *msg, uint32_t n) {
    poly p;
    poly_init(&p, key);
    for (; n >= 16; n -= 16, msg += 16) {
        poly_block(&p, msg, 1u << 24);
    }
    if (n) {
        uint8_t last[16] = {0};
        memcpy(last, msg, n);
        last[n] = 1;
        poly_block(&p, last, 0);
    }
    poly_finish(&p, tag);
    memset(&p, 0, sizeof(p));
}

static void aead_tag(uint8_t tag[16], const uint8_t otk[32], const uint8_t *ad, uint32_t ad_len, const uint8_t *ct,
                     uint32_t n) {
    poly p;
    poly_init(&p, otk);
    poly_padded(&p, ad, ad_len);
    poly_padded(&p, ct, n);
    uint8_t lens[16] = {0};
    st32(lens, ad_len), st32(lens + 8, n);
    poly_block(&p, lens, 1u << 24);
    poly_finish(&p, tag);
    memset(&p, 0, sizeof(p));
}

static void xor_stream(uint8_t *out, const uint8_t *in, uint32_t n, const uint8_t key[32], const uint8_t nonce[12]) {
    uint8_t block[64];
    for (uint32_t at = 0, counter = 1; at < n; counter++) {
        tf_chacha20_block(block, key, counter, nonce);
        for (uint32_t i = 0; i < 64 && at < n; i++, at++) {
            out[at] = in[at] ^ block[i];
        }
    }
    memset(block, 0, sizeof(block));
}

static void one_time_key(uint8_t otk[32], const uint8_t key[32], const uint8_t nonce[12]) {
    uint8_t block[64];
    tf_chacha20_block(block, key, 0, nonce);
    memcpy(otk, block, 32);
    memset(block, 0, sizeof(block));
}

void tf_aead_seal(uint8_t *out, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *ad, uint32_t ad_len,
                  const uint8_t *plain, uint32_t n) {
    uint8_t otk[32];
    one_time_key(otk, key, nonce);
    xor_stream(out, plain, n, key, nonce);
    aead_tag(out + n, otk, ad, ad_len, out, n);
    memset(otk, 0, sizeof(otk));
}

int tf_aead_open(uint8_t *plain, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *ad, uint32_t ad_len,
                 const uint8_t *box, uint32_t n) {
    uint8_t otk[32], tag[16];
    one_time_key(otk, key, nonce);
    aead_tag(tag, otk, ad, ad_len, box, n);
    uint8_t diff = 0;
    for (int i = 0; i < 16; i++) {
        diff |= (uint8_t)(tag[i] ^ box[n + i]);
    }
    memset(otk, 0, sizeof(otk));
    if (diff) {
        return -1;
    }
    xor_stream(plain, box, n, key, nonce);
    return 0;
}
