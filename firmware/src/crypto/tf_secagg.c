/* Secure aggregation masks on a board: HKDF-SHA256 key per seed, ChaCha20 keystream added word by word. The
 * spec is device_agent/wire/secagg.py (prg, pair_mask, context); the host and QEMU tests compare every word. */
#include "tf_secagg.h"

#include <string.h>

#include "tf_sha256.h"
#include "tf_x25519.h"

static const char LABEL[] = "tinyfleet-secagg-v1 mask "; /* _VERSION + b" mask " */

void tf_hkdf_sha256(uint8_t out[32], const uint8_t *ikm, uint32_t ikm_len, const uint8_t *info, uint32_t info_len) {
    static const uint8_t zero_salt[32] = {0};
    uint8_t prk[32];
    tf_hmac_sha256(zero_salt, sizeof(zero_salt), ikm, ikm_len, prk); /* extract */
    uint8_t msg[96];                                                 /* expand, one block: info || 0x01 */
    uint32_t n = info_len < sizeof(msg) - 1 ? info_len : (uint32_t)sizeof(msg) - 1;
    memcpy(msg, info, n);
    msg[n] = 1;
    tf_hmac_sha256(prk, sizeof(prk), msg, n + 1, out);
    memset(prk, 0, sizeof(prk));
}

void tf_secagg_context(uint8_t ctx[TF_SECAGG_CTX_BYTES], uint32_t round_id, const uint8_t *session, uint32_t n) {
    ctx[0] = (uint8_t)round_id;
    ctx[1] = (uint8_t)(round_id >> 8);
    ctx[2] = (uint8_t)(round_id >> 16);
    ctx[3] = (uint8_t)(round_id >> 24);
    tf_sha256(session, n, ctx + 4);
}

void tf_secagg_mask_key(uint8_t key[32], const uint8_t seed[32], const uint8_t ctx[TF_SECAGG_CTX_BYTES]) {
    uint8_t info[sizeof(LABEL) - 1 + TF_SECAGG_CTX_BYTES];
    memcpy(info, LABEL, sizeof(LABEL) - 1);
    memcpy(info + sizeof(LABEL) - 1, ctx, TF_SECAGG_CTX_BYTES);
    tf_hkdf_sha256(key, seed, 32, info, sizeof(info));
}

void tf_secagg_add_mask(uint32_t *y, uint32_t n, const uint8_t seed[32], const uint8_t ctx[TF_SECAGG_CTX_BYTES],
                        int negate) {
    static const uint8_t nonce[12] = {0};
    uint8_t key[32], block[64];
    tf_secagg_mask_key(key, seed, ctx);
    for (uint32_t at = 0, counter = 0; at < n; counter++) {
        tf_chacha20_block(block, key, counter, nonce);
        for (uint32_t w = 0; w < 16 && at < n; w++, at++) {
            const uint8_t *p = block + 4 * w;
            const uint32_t m = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
            y[at] = negate ? y[at] - m : y[at] + m;
        }
    }
    memset(key, 0, sizeof(key));
    memset(block, 0, sizeof(block));
}

static int id_less(const char *a, const char *b) { return strcmp(a, b) < 0; } /* ASCII: Python's str order */

void tf_secagg_mask_input(uint32_t *y, const uint32_t *x, uint32_t n, const uint8_t b[32], const uint8_t s_sk[32],
                          const char *own_id, const tf_secagg_peer *peers, uint32_t n_peers,
                          const uint8_t ctx[TF_SECAGG_CTX_BYTES]) {
    if (y != x) {
        memcpy(y, x, (size_t)n * sizeof(*y));
    }
    tf_secagg_add_mask(y, n, b, ctx, 0);
    uint8_t s_uv[32];
    for (uint32_t i = 0; i < n_peers; i++) {
        tf_x25519(s_uv, s_sk, peers[i].s_pk);
        tf_secagg_add_mask(y, n, s_uv, ctx, !id_less(own_id, peers[i].id));
    }
    memset(s_uv, 0, sizeof(s_uv));
}
