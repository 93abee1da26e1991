/* X25519 written from RFC 7748: GF(2^255 - 19) in ten signed limbs of alternately 26 and 25 bits (radix
 * 2^25.5), the Montgomery ladder with a masked conditional swap, inversion by Fermat (z^(p-2)).
 * Limb i of an element has weight 2^W(i), W(i) = 25 i + ceil(i / 2): 0, 26, 51, 77, 102, 128, 153, 179, 204, 230.
 * Constant time: the ladder's only secret-dependent operation is fe_cswap, which uses a mask. Right shifts of
 * negative int64 values are arithmetic (gcc and clang on Arm and x86 define it so). */
#include "tf_x25519.h"

#include <string.h>

typedef int32_t fe[10];

static const int WIDTH[10] = {26, 25, 26, 25, 26, 25, 26, 25, 26, 25};

static void fe_copy(fe h, const fe f) { memcpy(h, f, sizeof(fe)); }

static void fe_small(fe h, int32_t v) {
    memset(h, 0, sizeof(fe));
    h[0] = v;
}

static void fe_add(fe h, const fe f, const fe g) {
    for (int i = 0; i < 10; i++) {
        h[i] = f[i] + g[i];
    }
}

static void fe_sub(fe h, const fe f, const fe g) {
    for (int i = 0; i < 10; i++) {
        h[i] = f[i] - g[i];
    }
}

/* Carry 64-bit limb sums into a reduced element: |h[i]| <= 2^(WIDTH[i] - 1) + a little, after two passes. */
static void fe_carry(fe h, int64_t t[10]) {
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < 10; i++) {
            const int w = WIDTH[i];
            const int64_t c = (t[i] + ((int64_t)1 << (w - 1))) >> w; /* round to nearest: signed limbs */
            t[i] -= c * ((int64_t)1 << w);
            if (i < 9) {
                t[i + 1] += c;
            } else {
                t[0] += 19 * c; /* 2^255 = 19 (mod p) */
            }
        }
    }
    for (int i = 0; i < 10; i++) {
        h[i] = (int32_t)t[i];
    }
}

/* h = f * g. Inputs' limbs at most 2^27 in magnitude (a sum or difference of two reduced elements).
 * W(i) + W(j) = W(i + j) + 1 when i and j are both odd (the factor 2); a product past limb 9 goes to `hi` and
 * wraps with 2^255 = 19 (mod p) at the end, so every product is one 32 x 32 -> 64 multiply-accumulate. */
static void fe_mul(fe h, const fe f, const fe g) {
    int64_t t[10] = {0}, hi[9] = {0};
#pragma GCC unroll 10
    for (int i = 0; i < 10; i++) {
        const int32_t a = f[i], a2 = (i & 1) ? 2 * f[i] : f[i];
#pragma GCC unroll 10
        for (int j = 0; j < 10; j++) {
            const int64_t p = (int64_t)((j & 1) ? a2 : a) * g[j];
            if (i + j < 10) {
                t[i + j] += p;
            } else {
                hi[i + j - 10] += p;
            }
        }
    }
    for (int k = 0; k < 9; k++) {
        t[k] += 19 * hi[k];
    }
    fe_carry(h, t);
}

/* h = f^2: the symmetric products once, doubled (55 multiplies instead of 100). */
static void fe_sq(fe h, const fe f) {
    int64_t t[10] = {0}, hi[9] = {0};
#pragma GCC unroll 10
    for (int i = 0; i < 10; i++) {
        const int32_t a = f[i], a2 = 2 * f[i]; /* |a2| <= 2^28 */
#pragma GCC unroll 10
        for (int j = i; j < 10; j++) {
            /* i == j: f_i^2, doubled when i is odd; i < j: 2 f_i f_j, doubled again when both are odd */
            int64_t p = (int64_t)(i == j ? a : a2) * f[j];
            if ((i & 1) && (j & 1)) {
                p *= 2;
            }
            if (i + j < 10) {
                t[i + j] += p;
            } else {
                hi[i + j - 10] += p;
            }
        }
    }
    for (int k = 0; k < 9; k++) {
        t[k] += 19 * hi[k];
    }
    fe_carry(h, t);
}

static void fe_sq_n(fe h, const fe f, int n) {
    fe_sq(h, f);
    for (int i = 1; i < n; i++) {
        fe_sq(h, h);
    }
}

static void fe_mul_small(fe h, const fe f, int32_t k) {
    int64_t t[10];
    for (int i = 0; i < 10; i++) {
        t[i] = (int64_t)f[i] * k;
    }
    fe_carry(h, t);
}

/* Swap f and g when bit = 1, without a branch. */
static void fe_cswap(fe f, fe g, uint32_t bit) {
    const int32_t mask = -(int32_t)bit;
    for (int i = 0; i < 10; i++) {
        const int32_t x = (f[i] ^ g[i]) & mask;
        f[i] ^= x;
        g[i] ^= x;
    }
}

static void fe_frombytes(fe h, const uint8_t s[32]) {
    int pos = 0; /* bit position of limb i */
    for (int i = 0; i < 10; i++) {
        uint64_t v = 0;
        for (int b = 0; b < WIDTH[i]; b++) {
            const int bit = pos + b; /* bit 255 (the top bit of s[31]) is never read */
            v |= (uint64_t)((s[bit >> 3] >> (bit & 7)) & 1) << b;
        }
        h[i] = (int32_t)v;
        pos += WIDTH[i];
    }
}

/* The canonical 32 bytes of h (fully reduced below p). */
static void fe_tobytes(uint8_t s[32], const fe f) {
    int64_t t[10];
    for (int i = 0; i < 10; i++) {
        t[i] = f[i];
    }
    /* floor carries until every limb is in [0, 2^WIDTH): the value is then in [0, 2^255), i.e. below 2p */
    for (int pass = 0; pass < 3; pass++) {
        for (int i = 0; i < 10; i++) {
            const int64_t c = t[i] >> WIDTH[i];
            t[i] -= c * ((int64_t)1 << WIDTH[i]);
            if (i < 9) {
                t[i + 1] += c;
            } else {
                t[0] += 19 * c;
            }
        }
    }
    /* subtract p when value + 19 reaches 2^255: compute value + 19 and select it minus 2^255 by a mask */
    int64_t u[10];
    int64_t c = 19;
    for (int i = 0; i < 10; i++) {
        u[i] = t[i] + c;
        c = u[i] >> WIDTH[i];
        u[i] -= c * ((int64_t)1 << WIDTH[i]);
    }
    const int64_t mask = -c; /* c is 1 when value >= p, else 0 */
    for (int i = 0; i < 10; i++) {
        t[i] ^= (t[i] ^ u[i]) & mask;
    }
    memset(s, 0, 32);
    int pos = 0;
    for (int i = 0; i < 10; i++) {
        for (int b = 0; b < WIDTH[i]; b++) {
            const int bit = pos + b;
            s[bit >> 3] |= (uint8_t)(((t[i] >> b) & 1) << (bit & 7));
        }
        pos += WIDTH[i];
    }
}

/* z^(p - 2) = z^-1 (Fermat), p - 2 = 2^255 - 21, by an addition chain on public exponents: 254 squarings and 11
 * multiplies. z_a_b below is z^(2^a - 2^b). */
/* NOTE: not inlined: its temporaries and the ladder's would share one frame above the 1 KB frame limit */
__attribute__((noinline)) static void fe_invert(fe out, const fe z) {
    fe z2, z9, z11, z5, z10, z20, z50, z100, t;
    fe_sq(z2, z);        /* z^2 */
    fe_sq_n(t, z2, 2);   /* z^8 */
    fe_mul(z9, t, z);    /* z^9 */
    fe_mul(z11, z9, z2); /* z^11 */
    fe_sq(t, z11);       /* z^22 */
    fe_mul(z5, t, z9);   /* z^31 = z^(2^5 - 1) */
    fe_sq_n(t, z5, 5);
    fe_mul(z10, t, z5); /* z^(2^10 - 1) */
    fe_sq_n(t, z10, 10);
    fe_mul(z20, t, z10); /* z^(2^20 - 1) */
    fe_sq_n(t, z20, 20);
    fe_mul(t, t, z20); /* z^(2^40 - 1) */
    fe_sq_n(t, t, 10);
    fe_mul(z50, t, z10); /* z^(2^50 - 1) */
    fe_sq_n(t, z50, 50);
    fe_mul(z100, t, z50); /* z^(2^100 - 1) */
    fe_sq_n(t, z100, 100);
    fe_mul(t, t, z100); /* z^(2^200 - 1) */
    fe_sq_n(t, t, 50);
    fe_mul(t, t, z50);   /* z^(2^250 - 1) */
    fe_sq_n(t, t, 5);    /* z^(2^255 - 32) */
    fe_mul(out, t, z11); /* z^(2^255 - 21) */
}

void tf_x25519(uint8_t out[32], const uint8_t scalar[32], const uint8_t u[32]) {
    uint8_t k[32];
    memcpy(k, scalar, 32);
    k[0] &= 248; /* clamp (RFC 7748 section 5) */
    k[31] &= 127;
    k[31] |= 64;
    fe x1, x2, z2, x3, z3, a, aa, b, bb, e, c, d, da, cb, t;
    fe_frombytes(x1, u);
    fe_small(x2, 1);
    fe_small(z2, 0);
    fe_copy(x3, x1);
    fe_small(z3, 1);
    uint32_t swap = 0;
    for (int i = 254; i >= 0; i--) {
        const uint32_t bit = (uint32_t)(k[i >> 3] >> (i & 7)) & 1u;
        swap ^= bit;
        fe_cswap(x2, x3, swap);
        fe_cswap(z2, z3, swap);
        swap = bit;
        fe_add(a, x2, z2);
        fe_sq(aa, a);
        fe_sub(b, x2, z2);
        fe_sq(bb, b);
        fe_sub(e, aa, bb);
        fe_add(c, x3, z3);
        fe_sub(d, x3, z3);
        fe_mul(da, d, a);
        fe_mul(cb, c, b);
        fe_add(t, da, cb);
        fe_sq(x3, t);
        fe_sub(t, da, cb);
        fe_sq(t, t);
        fe_mul(z3, x1, t);
        fe_mul(x2, aa, bb);
        fe_mul_small(t, e, 121665); /* a24 = (486662 - 2) / 4 */
        fe_add(t, aa, t);
        fe_mul(z2, e, t);
    }
    fe_cswap(x2, x3, swap);
    fe_cswap(z2, z3, swap);
    fe_invert(z2, z2);
    fe_mul(x2, x2, z2);
    fe_tobytes(out, x2);
    memset(k, 0, sizeof(k));
}

void tf_x25519_public(uint8_t out[32], const uint8_t scalar[32]) {
    static const uint8_t nine[32] = {9};
    tf_x25519(out, scalar, nine);
}
