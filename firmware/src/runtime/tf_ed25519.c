/* Ed25519 verification, written from RFC 8032 (sections 5.1.2-5.1.7). The field GF(2^255 - 19) uses ten signed
 * 32-bit limbs in radix 2^25.5 (limb i weighs 2^ceil(25.5 i): 26, 25, 26, ... bits); products are 32x32->64
 * (one UMULL/SMLAL on the M4/M7). Every operation ends in a carry, so every limb stays within +-2^26 and no
 * 64-bit sum can overflow (10 products of at most 2^26 * 19 * 2^25 < 2^56). Points are extended twisted Edwards
 * coordinates (X : Y : Z : T), added with the complete unified formula and doubled with RFC 8032's. Simple over
 * fast: inversion and square root are plain square-and-multiply. NOTE: the noinline steps
 * keep their locals out of the callers' frames (deepest path ~1.3 KB of stack on the M7, not ~1.9 KB).
 * Over 400 lines: field, group and verification of one algorithm, kept together to be read against the RFC. */
#include "tf_ed25519.h"

#include <string.h>

#include "tf_sha512.h"

typedef int32_t fe[10];
typedef struct {
    fe X, Y, Z, T;
} ge;

/* Generated from the RFC 8032 parameters (p = 2^255 - 19, d = -121665/121666, sqrt(-1) = 2^((p-1)/4), base
 * point B = (x, 4/5) with x even, T = x y), as canonical limbs. */
static const fe FE_D = {56195235, 13857412, 51736253, 6949390,  114729,
                        24766616, 60832955, 30306712, 48412415, 21499315};
static const fe FE_D2 = {45281625, 27714825, 36363642, 13898781, 229458,
                         15978800, 54557047, 27058993, 29715967, 9444199};
static const fe FE_SQRTM1 = {34513072, 25610706, 9377949,  3500415, 12389472,
                             33281959, 41962654, 31548777, 326685,  11406482};
static const fe FE_BX = {52811034, 25909283, 16144682, 17082669, 27570973,
                         30858332, 40966398, 8378388,  20764389, 8758491};
static const fe FE_BY = {40265304, 26843545, 13421772, 20132659, 26843545,
                         6710886,  53687091, 13421772, 40265318, 26843545};
static const fe FE_BT = {28827043, 27438313, 39759291, 244362,   8635006,
                         11264893, 19351346, 13413597, 16611511, 27139452};

static const uint8_t L_BYTES[32] = {0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7,
                                    0xa2, 0xde, 0xf9, 0xde, 0x14, 0,    0,    0,    0,    0,    0,
                                    0,    0,    0,    0,    0,    0,    0,    0,    0,    0x10};
/* p - 2 (inversion) and (p - 5) / 8 (square root), little-endian */
static const uint8_t EXP_INV[32] = {0xeb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f};
static const uint8_t EXP_SQRT[32] = {0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                     0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                     0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f};

static int width(int i) { return (i & 1) ? 25 : 26; }

/* ---- field ---- */

/* Rounding carry of 64-bit limb sums into limbs of +-2^25 (+-2^24 odd); the carry out of limb 9 re-enters limb 0
 * times 19 (2^255 = 19 mod p). NOTE: >> of a negative integer is arithmetic on every compiler we build with. */
static inline __attribute__((always_inline)) void fe_carry(fe out, int64_t h[10]) {
    int64_t c;
#define CARRY(i, w, to, times)                                                                                         \
    (c = (h[i] + ((int64_t)1 << ((w)-1))) >> (w), h[i] -= c * ((int64_t)1 << (w)), h[to] += (times)*c)
    CARRY(0, 26, 1, 1), CARRY(1, 25, 2, 1), CARRY(2, 26, 3, 1), CARRY(3, 25, 4, 1), CARRY(4, 26, 5, 1);
    CARRY(5, 25, 6, 1), CARRY(6, 26, 7, 1), CARRY(7, 25, 8, 1), CARRY(8, 26, 9, 1), CARRY(9, 25, 0, 19);
    CARRY(0, 26, 1, 1);
#undef CARRY
    for (int i = 0; i < 10; i++) {
        out[i] = (int32_t)h[i];
    }
}

static void fe_copy(fe out, const fe a) { memcpy(out, a, sizeof(fe)); }

static void fe_set(fe out, int32_t v) {
    memset(out, 0, sizeof(fe));
    out[0] = v;
}

/* The same carry for a sum or difference of two carried elements (limbs below 2^27): 32-bit arithmetic. */
static void fe_carry32(fe h) {
    int32_t c;
#define CARRY(i, w, to, times) (c = (h[i] + (1 << ((w)-1))) >> (w), h[i] -= c * (1 << (w)), h[to] += (times)*c)
    CARRY(0, 26, 1, 1), CARRY(1, 25, 2, 1), CARRY(2, 26, 3, 1), CARRY(3, 25, 4, 1), CARRY(4, 26, 5, 1);
    CARRY(5, 25, 6, 1), CARRY(6, 26, 7, 1), CARRY(7, 25, 8, 1), CARRY(8, 26, 9, 1), CARRY(9, 25, 0, 19);
    CARRY(0, 26, 1, 1);
#undef CARRY
}

static void fe_add(fe out, const fe a, const fe b) {
    for (int i = 0; i < 10; i++) {
        out[i] = a[i] + b[i];
    }
    fe_carry32(out);
}

static void fe_sub(fe out, const fe a, const fe b) {
    for (int i = 0; i < 10; i++) {
        out[i] = a[i] - b[i];
    }
    fe_carry32(out);
}

static void fe_neg(fe out, const fe a) {
    static const fe zero = {0};
    fe_sub(out, zero, a);
}

/* f_i g_j lands in limb i + j (mod 10); twice over when i and j are both odd (the half bits of the radix), times
 * 19 when i + j >= 10 (past 2^255). Written out (generated): 100 SMLALs with constant operands. */
#define M(a, b) ((int64_t)(a) * (b))
static void fe_mul(fe out, const fe f, const fe g) {
    const int32_t f0 = f[0], f1 = f[1], f2 = f[2], f3 = f[3], f4 = f[4], f5 = f[5], f6 = f[6], f7 = f[7], f8 = f[8],
                  f9 = f[9];
    const int32_t f1_2 = 2 * f1, f3_2 = 2 * f3, f5_2 = 2 * f5, f7_2 = 2 * f7, f9_2 = 2 * f9;
    const int32_t g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3], g4 = g[4], g5 = g[5], g6 = g[6], g7 = g[7], g8 = g[8],
                  g9 = g[9];
    const int32_t g1_19 = 19 * g1, g2_19 = 19 * g2, g3_19 = 19 * g3, g4_19 = 19 * g4, g5_19 = 19 * g5, g6_19 = 19 * g6,
                  g7_19 = 19 * g7, g8_19 = 19 * g8, g9_19 = 19 * g9;
    int64_t h0 = M(f0, g0) + M(f1_2, g9_19) + M(f2, g8_19) + M(f3_2, g7_19) + M(f4, g6_19) + M(f5_2, g5_19) +
                 M(f6, g4_19) + M(f7_2, g3_19) + M(f8, g2_19) + M(f9_2, g1_19);
    int64_t h1 = M(f0, g1) + M(f1, g0) + M(f2, g9_19) + M(f3, g8_19) + M(f4, g7_19) + M(f5, g6_19) + M(f6, g5_19) +
                 M(f7, g4_19) + M(f8, g3_19) + M(f9, g2_19);
    int64_t h2 = M(f0, g2) + M(f1_2, g1) + M(f2, g0) + M(f3_2, g9_19) + M(f4, g8_19) + M(f5_2, g7_19) + M(f6, g6_19) +
                 M(f7_2, g5_19) + M(f8, g4_19) + M(f9_2, g3_19);
    int64_t h3 = M(f0, g3) + M(f1, g2) + M(f2, g1) + M(f3, g0) + M(f4, g9_19) + M(f5, g8_19) + M(f6, g7_19) +
                 M(f7, g6_19) + M(f8, g5_19) + M(f9, g4_19);
    int64_t h4 = M(f0, g4) + M(f1_2, g3) + M(f2, g2) + M(f3_2, g1) + M(f4, g0) + M(f5_2, g9_19) + M(f6, g8_19) +
                 M(f7_2, g7_19) + M(f8, g6_19) + M(f9_2, g5_19);
    int64_t h5 = M(f0, g5) + M(f1, g4) + M(f2, g3) + M(f3, g2) + M(f4, g1) + M(f5, g0) + M(f6, g9_19) + M(f7, g8_19) +
                 M(f8, g7_19) + M(f9, g6_19);
    int64_t h6 = M(f0, g6) + M(f1_2, g5) + M(f2, g4) + M(f3_2, g3) + M(f4, g2) + M(f5_2, g1) + M(f6, g0) +
                 M(f7_2, g9_19) + M(f8, g8_19) + M(f9_2, g7_19);
    int64_t h7 = M(f0, g7) + M(f1, g6) + M(f2, g5) + M(f3, g4) + M(f4, g3) + M(f5, g2) + M(f6, g1) + M(f7, g0) +
                 M(f8, g9_19) + M(f9, g8_19);
    int64_t h8 = M(f0, g8) + M(f1_2, g7) + M(f2, g6) + M(f3_2, g5) + M(f4, g4) + M(f5_2, g3) + M(f6, g2) + M(f7_2, g1) +
                 M(f8, g0) + M(f9_2, g9_19);
    int64_t h9 = M(f0, g9) + M(f1, g8) + M(f2, g7) + M(f3, g6) + M(f4, g5) + M(f5, g4) + M(f6, g3) + M(f7, g2) +
                 M(f8, g1) + M(f9, g0);
    int64_t h[10] = {h0, h1, h2, h3, h4, h5, h6, h7, h8, h9};
    fe_carry(out, h);
}
#undef M

/* f^2: the 55 distinct products of fe_mul(f, f), each pair once with its factor (2 for i != j, 2 for odd-odd, 19
 * past 2^255) split so that both operands fit 32 bits (x38 only on odd limbs, < 2^25). Generated. */
#define M(a, b) ((int64_t)(a) * (b))
static void fe_sq(fe out, const fe f) {
    const int32_t f0 = f[0], f1 = f[1], f2 = f[2], f3 = f[3], f4 = f[4], f5 = f[5], f6 = f[6], f7 = f[7], f8 = f[8],
                  f9 = f[9];
    const int32_t f0_2 = 2 * f0, f1_2 = 2 * f1, f2_2 = 2 * f2, f3_2 = 2 * f3, f4_2 = 2 * f4, f5_2 = 2 * f5,
                  f6_2 = 2 * f6, f7_2 = 2 * f7;
    const int32_t f6_19 = 19 * f6, f8_19 = 19 * f8, f3_38 = 38 * f3, f5_38 = 38 * f5, f7_38 = 38 * f7, f9_38 = 38 * f9;
    int64_t h0 = M(f0, f0) + M(f1_2, f9_38) + M(f2_2, f8_19) + M(f3_2, f7_38) + M(f4_2, f6_19) + M(f5, f5_38);
    int64_t h1 = M(f0_2, f1) + M(f2, f9_38) + M(f8, f3_38) + M(f4, f7_38) + M(f6, f5_38);
    int64_t h2 = M(f0_2, f2) + M(f1_2, f1) + M(f3_2, f9_38) + M(f4_2, f8_19) + M(f5_2, f7_38) + M(f6, f6_19);
    int64_t h3 = M(f0_2, f3) + M(f1_2, f2) + M(f4, f9_38) + M(f8, f5_38) + M(f6, f7_38);
    int64_t h4 = M(f0_2, f4) + M(f1_2, f3_2) + M(f2, f2) + M(f5_2, f9_38) + M(f6_2, f8_19) + M(f7, f7_38);
    int64_t h5 = M(f0_2, f5) + M(f1_2, f4) + M(f2_2, f3) + M(f6, f9_38) + M(f8, f7_38);
    int64_t h6 = M(f0_2, f6) + M(f1_2, f5_2) + M(f2_2, f4) + M(f3_2, f3) + M(f7_2, f9_38) + M(f8, f8_19);
    int64_t h7 = M(f0_2, f7) + M(f1_2, f6) + M(f2_2, f5) + M(f3_2, f4) + M(f8, f9_38);
    int64_t h8 = M(f0_2, f8) + M(f1_2, f7_2) + M(f2_2, f6) + M(f3_2, f5_2) + M(f4, f4) + M(f9, f9_38);
    int64_t h9 = M(f0_2, f9) + M(f1_2, f8) + M(f2_2, f7) + M(f3_2, f6) + M(f4_2, f5);
    int64_t h[10] = {h0, h1, h2, h3, h4, h5, h6, h7, h8, h9};
    fe_carry(out, h);
}
#undef M

/* z^e, e a 255-bit little-endian exponent. */
static void fe_pow(fe out, const fe z, const uint8_t e[32]) {
    fe r;
    fe_set(r, 1);
    for (int i = 254; i >= 0; i--) {
        fe_sq(r, r);
        if ((e[i >> 3] >> (i & 7)) & 1) {
            fe_mul(r, r, z);
        }
    }
    fe_copy(out, r);
}

/* The low 255 bits of s (bit 255 is the caller's: a sign bit). Not reduced: y >= p is the caller's check. */
static void fe_frombytes(fe out, const uint8_t s[32]) {
    int pos = 0;
    for (int i = 0; i < 10; i++) {
        uint64_t v = 0;
        for (int k = 0; k < 5 && pos / 8 + k < 32; k++) {
            v |= (uint64_t)s[pos / 8 + k] << (8 * k);
        }
        out[i] = (int32_t)((v >> (pos % 8)) & ((1u << width(i)) - 1));
        pos += width(i);
    }
}

/* The canonical encoding (value mod p in [0, p), little-endian, bit 255 clear). */
static void fe_tobytes(uint8_t s[32], const fe f) {
    int64_t h[10];
    for (int i = 0; i < 10; i++) { /* + 2p (limbs 2^27 - 38, 2^26 - 2, 2^27 - 2, ...): every limb >= 0 */
        h[i] = (int64_t)f[i] + ((int64_t)2 << width(i)) - (i == 0 ? 38 : 2);
    }
    for (int round = 0; round < 3; round++) { /* floor carries: limbs in [0, 2^w), value < 2^255 */
        for (int i = 0; i < 10; i++) {
            const int64_t c = h[i] >> width(i);
            h[i] &= ((int64_t)1 << width(i)) - 1;
            if (i < 9) {
                h[i + 1] += c;
            } else {
                h[0] += 19 * c;
            }
        }
    }
    int64_t q = 19; /* q = 1 iff value + 19 >= 2^255, i.e. value >= p: then subtract p = add 19, drop 2^255 */
    for (int i = 0; i < 10; i++) {
        q = (h[i] + q) >> width(i);
    }
    h[0] += 19 * q;
    for (int i = 0; i < 10; i++) {
        const int64_t c = h[i] >> width(i);
        h[i] &= ((int64_t)1 << width(i)) - 1;
        if (i < 9) {
            h[i + 1] += c;
        }
    }
    memset(s, 0, 32);
    int pos = 0;
    for (int i = 0; i < 10; i++) {
        const uint64_t v = (uint64_t)h[i] << (pos % 8);
        for (int k = 0; k < 5 && pos / 8 + k < 32; k++) {
            s[pos / 8 + k] |= (uint8_t)(v >> (8 * k));
        }
        pos += width(i);
    }
}

static int fe_isnegative(const fe f) {
    uint8_t s[32];
    fe_tobytes(s, f);
    return s[0] & 1;
}

static int fe_equal(const fe a, const fe b) {
    uint8_t sa[32], sb[32];
    fe_tobytes(sa, a);
    fe_tobytes(sb, b);
    return memcmp(sa, sb, 32) == 0;
}

/* ---- group ---- */

/* r = p + q (complete for a = -1, d non-square: also doubles, also the identity). r may alias p or q. */
static void ge_add(ge *r, const ge *p, const ge *q) {
    fe a, b, c, d, t;
    fe_sub(a, p->Y, p->X);
    fe_sub(t, q->Y, q->X);
    fe_mul(a, a, t);
    fe_add(b, p->Y, p->X);
    fe_add(t, q->Y, q->X);
    fe_mul(b, b, t);
    fe_mul(c, p->T, q->T);
    fe_mul(c, c, FE_D2);
    fe_mul(d, p->Z, q->Z);
    fe_add(d, d, d);
    fe_sub(t, b, a); /* E */
    fe_add(a, b, a); /* H */
    fe_sub(b, d, c); /* F */
    fe_add(c, d, c); /* G */
    fe_mul(r->X, t, b);
    fe_mul(r->Y, c, a);
    fe_mul(r->T, t, a);
    fe_mul(r->Z, b, c);
}

/* r = 2p, RFC 8032 5.1.4 doubling: 4 squarings + 4 products instead of the addition's 9 products. r may alias p. */
__attribute__((noinline)) static void ge_dbl(ge *r, const ge *p) {
    fe a, b, c, e, h;
    fe_sq(a, p->X); /* A = X^2 */
    fe_sq(b, p->Y); /* B = Y^2 */
    fe_sq(c, p->Z);
    fe_add(c, c, c); /* C = 2 Z^2 */
    fe_add(h, a, b); /* H = A + B */
    fe_add(e, p->X, p->Y);
    fe_sq(e, e);
    fe_sub(e, h, e);    /* E = H - (X + Y)^2 */
    fe_sub(a, a, b);    /* G = A - B */
    fe_add(c, c, a);    /* F = C + G */
    fe_mul(r->X, e, c); /* X3 = E F */
    fe_mul(r->Y, a, h); /* Y3 = G H */
    fe_mul(r->T, e, h); /* T3 = E H */
    fe_mul(r->Z, c, a); /* Z3 = F G */
}

/* RFC 8032 5.1.3 decoding; 0 if s is not the canonical encoding of a curve point. */
__attribute__((noinline)) static int ge_decode(ge *P, const uint8_t s[32]) {
    const int sign = s[31] >> 7;
    fe y, u, v, v3, x, t;
    fe_frombytes(y, s);
    uint8_t back[32];
    fe_tobytes(back, y);
    back[31] |= (uint8_t)(sign << 7);
    if (memcmp(back, s, 32) != 0) {
        return 0; /* y >= p */
    }
    fe_sq(u, y);
    fe_mul(v, u, FE_D);
    fe_set(t, 1);
    fe_sub(u, u, t); /* u = y^2 - 1 */
    fe_add(v, v, t); /* v = d y^2 + 1 */
    fe_sq(v3, v);
    fe_mul(v3, v3, v); /* v^3 */
    fe_sq(x, v3);
    fe_mul(x, x, v); /* v^7 */
    fe_mul(x, x, u); /* u v^7 */
    fe_pow(x, x, EXP_SQRT);
    fe_mul(x, x, v3);
    fe_mul(x, x, u); /* x = u v^3 (u v^7)^((p-5)/8) */
    fe_sq(t, x);
    fe_mul(t, t, v); /* v x^2 */
    if (!fe_equal(t, u)) {
        fe_neg(u, u);
        if (!fe_equal(t, u)) {
            return 0; /* x^2 = u/v has no root */
        }
        fe_mul(x, x, FE_SQRTM1);
    }
    fe_set(t, 0);
    if (fe_equal(x, t) && sign) {
        return 0;
    }
    if (fe_isnegative(x) != sign) {
        fe_neg(x, x);
    }
    fe_copy(P->X, x);
    fe_copy(P->Y, y);
    fe_set(P->Z, 1);
    fe_mul(P->T, x, y);
    return 1;
}

__attribute__((noinline)) static void ge_encode(uint8_t s[32], const ge *P) {
    fe zi, x, y;
    fe_pow(zi, P->Z, EXP_INV);
    fe_mul(x, P->X, zi);
    fe_mul(y, P->Y, zi);
    fe_tobytes(s, y);
    s[31] |= (uint8_t)(fe_isnegative(x) << 7);
}

/* [s]B + [k]Q, one shared doubling chain (Straus-Shamir), scalars 256-bit little-endian. */
__attribute__((noinline)) static void ge_double_scalarmult(ge *r, const uint8_t s[32], const uint8_t k[32],
                                                           const ge *Q) {
    ge B, BQ;
    fe_copy(B.X, FE_BX);
    fe_copy(B.Y, FE_BY);
    fe_set(B.Z, 1);
    fe_copy(B.T, FE_BT);
    ge_add(&BQ, &B, Q);
    fe_set(r->X, 0);
    fe_set(r->Y, 1);
    fe_set(r->Z, 1);
    fe_set(r->T, 0);
    for (int i = 255; i >= 0; i--) {
        ge_dbl(r, r);
        const int bs = (s[i >> 3] >> (i & 7)) & 1, bk = (k[i >> 3] >> (i & 7)) & 1;
        if (bs || bk) {
            ge_add(r, r, bs && bk ? &BQ : bs ? &B : Q);
        }
    }
}

/* ---- scalars mod L ---- */

/* 1 iff the 256-bit little-endian s < L (RFC 8032: reject S >= L, no malleability). */
static int sc_canonical(const uint8_t s[32]) {
    for (int i = 31; i >= 0; i--) {
        if (s[i] != L_BYTES[i]) {
            return s[i] < L_BYTES[i];
        }
    }
    return 0;
}

/* out = in mod L for a 512-bit little-endian in, bit by bit from the top (r < L < 2^253 throughout). */
static void sc_reduce512(uint8_t out[32], const uint8_t in[64]) {
    uint32_t r[8] = {0}, l[8];
    for (int i = 0; i < 8; i++) {
        l[i] = (uint32_t)L_BYTES[4 * i] | (uint32_t)L_BYTES[4 * i + 1] << 8 | (uint32_t)L_BYTES[4 * i + 2] << 16 |
               (uint32_t)L_BYTES[4 * i + 3] << 24;
    }
    for (int bit = 511; bit >= 0; bit--) {
        for (int i = 7; i > 0; i--) {
            r[i] = r[i] << 1 | r[i - 1] >> 31;
        }
        r[0] = r[0] << 1 | ((in[bit >> 3] >> (bit & 7)) & 1u);
        int ge_l = 1; /* r >= L ? */
        for (int i = 7; i >= 0; i--) {
            if (r[i] != l[i]) {
                ge_l = r[i] > l[i];
                break;
            }
        }
        if (ge_l) {
            uint32_t borrow = 0;
            for (int i = 0; i < 8; i++) {
                const uint64_t d = (uint64_t)r[i] - l[i] - borrow;
                r[i] = (uint32_t)d;
                borrow = (uint32_t)(d >> 63);
            }
        }
    }
    for (int i = 0; i < 32; i++) {
        out[i] = (uint8_t)(r[i / 4] >> (8 * (i % 4)));
    }
}

/* k = SHA-512(R ‖ A ‖ M) mod L */
__attribute__((noinline)) static void challenge(uint8_t k[32], const uint8_t r[32], const uint8_t pub[32],
                                                const uint8_t *msg, uint32_t n) {
    tf_sha512_ctx c;
    uint8_t h[64];
    tf_sha512_init(&c);
    tf_sha512_update(&c, r, 32);
    tf_sha512_update(&c, pub, 32);
    tf_sha512_update(&c, msg, n);
    tf_sha512_final(&c, h);
    sc_reduce512(k, h);
}

int tf_ed25519_verify(const uint8_t sig[64], const uint8_t *msg, uint32_t n, const uint8_t pub[32]) {
    if (!sc_canonical(sig + 32)) {
        return 0;
    }
    ge A, R;
    if (!ge_decode(&A, pub)) {
        return 0;
    }
    uint8_t k[32], rcheck[32];
    challenge(k, sig, pub, msg, n);
    fe_neg(A.X, A.X); /* -A: [S]B - [k]A = [S]B + [k](-A) */
    fe_neg(A.T, A.T);
    ge_double_scalarmult(&R, sig + 32, k, &A);
    ge_encode(rcheck, &R);
    return memcmp(rcheck, sig, 32) == 0;
}
