/* The envelope every blob starts and ends with (docs/formats.md "Envelope": magic, version, length, signature,
 * CRC32), the board's key slot and the content hash; check for check the order of device_agent/wire/envelope.py.
 * It checks the signature over header + body before any body field is read, and never reads past the bytes. */
#include <string.h>

#include "tf_crc.h"
#include "tf_ed25519.h"
#include "tf_sha256.h"
#include "tf_wire.h"

int tf_envelope_open(const uint8_t *blob, uint32_t n, const char *magic, uint16_t version, const tf_verify *v,
                     const uint8_t **body, uint32_t *body_len) {
    if (n < 4) {
        return TF_WE_TRUNCATED;
    }
    if (memcmp(blob, magic, 4) != 0) {
        return TF_WE_BAD_MAGIC;
    }
    if (n < 16) {
        return TF_WE_TRUNCATED;
    }
    if (tf_ld_u16(blob + 4) != version) {
        return TF_WE_UNSUPPORTED_VERSION;
    }
    const uint32_t length = tf_ld_u32(blob + 8);
    if (length < 20 || length > 0x7FFFFFFFu) {
        return TF_WE_BAD_LENGTH;
    }
    if (n < length) {
        return TF_WE_TRUNCATED;
    }
    if (n > length) {
        return TF_WE_TRAILING_BYTES;
    }
    const uint16_t alg = tf_ld_u16(blob + 12), sig_len = tf_ld_u16(blob + 14);
    if (alg > 2) {
        return TF_WE_BAD_ENUM;
    }
    static const uint16_t want_len[3] = {0, 64, 32};
    if (sig_len != want_len[alg] || length < 16u + sig_len + 4u) {
        return TF_WE_BAD_LENGTH;
    }
    if (tf_crc32(blob, length - 4) != tf_ld_u32(blob + length - 4)) {
        return TF_WE_CRC_MISMATCH;
    }
    if (tf_ld_u16(blob + 6) != 0) {
        return TF_WE_RESERVED_NONZERO;
    }
    const uint32_t sig_start = length - 4 - sig_len;
    if (!v || v->alg == 0) {
        if (alg != 0) {
            return TF_WE_SIG_ALG_MISMATCH;
        }
    } else {
        if (alg == 0) {
            return TF_WE_UNSIGNED;
        }
        if (alg != v->alg) {
            return TF_WE_SIG_ALG_MISMATCH;
        }
        if (alg == 1) { /* a policy without a 32-byte public key verifies nothing */
            if (!v->key || v->key_len != 32 || !tf_ed25519_verify(blob + sig_start, blob, sig_start, v->key)) {
                return TF_WE_BAD_SIGNATURE;
            }
        } else {
            uint8_t tag[32];
            tf_hmac_sha256(v->key, v->key_len, blob, sig_start, tag);
            uint8_t diff = 0; /* constant time */
            for (int i = 0; i < 32; i++) {
                diff |= (uint8_t)(tag[i] ^ blob[sig_start + i]);
            }
            if (diff) {
                return TF_WE_BAD_SIGNATURE;
            }
        }
    }
    *body = blob + 16;
    *body_len = sig_start - 16;
    return TF_WE_OK;
}

int tf_key_slot_read(const uint8_t *slot, uint32_t n, tf_verify *out) {
    out->alg = 1, out->key = NULL, out->key_len = 0; /* fail closed until the record checked out */
    if (n < 4) {
        return TF_WE_TRUNCATED;
    }
    const uint32_t first = tf_ld_u32(slot);
    if (first == 0 || first == 0xFFFFFFFFu) {
        out->alg = 0; /* erased: nothing provisioned, "unsigned only" */
        return TF_WE_OK;
    }
    if (memcmp(slot, "TFKY", 4) != 0) {
        return TF_WE_BAD_MAGIC;
    }
    if (n < 12) {
        return TF_WE_TRUNCATED;
    }
    if (tf_ld_u16(slot + 4) != 1) {
        return TF_WE_UNSUPPORTED_VERSION;
    }
    const uint32_t alg = tf_ld_u16(slot + 6), key_len = tf_ld_u32(slot + 8);
    if (alg != 1 && alg != 2) {
        return TF_WE_BAD_ENUM;
    }
    if (alg == 1 ? key_len != 32 : (key_len < 16 || key_len > 64)) {
        return TF_WE_BAD_LENGTH;
    }
    if (n < 16 + key_len) {
        return TF_WE_TRUNCATED;
    }
    if (tf_crc32(slot, 12 + key_len) != tf_ld_u32(slot + 12 + key_len)) {
        return TF_WE_CRC_MISMATCH;
    }
    out->alg = (int)alg, out->key = slot + 12, out->key_len = key_len;
    return TF_WE_OK;
}

void tf_content_hash(const uint8_t *blob, uint32_t n, uint8_t out[32]) {
    const uint32_t sig_len = tf_ld_u16(blob + 14);
    tf_sha256_ctx c;
    tf_sha256_init(&c);
    tf_sha256_update(&c, blob, 6);
    tf_sha256_update(&c, blob + 16, n - 4 - sig_len - 16);
    tf_sha256_final(&c, out);
}
