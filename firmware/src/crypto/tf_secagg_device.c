/* The device side of secure aggregation on a board (see tf_secagg_device.h): each step checks the stage and
 * the inputs as device_agent/secagg.py does, then works in the pool's tail. Secrets are wiped at every seal. */
#include "tf_secagg_device.h"

#include <string.h>

#include "tf_frame.h"
#include "tf_sha256.h"
#include "tf_wire.h"
#include "tf_x25519.h"

static const char SESSION[] = "tinyfleet-secagg plan="; /* device_agent/wire/secagg.py session_label */
static const char SHARE_INFO[] = "tinyfleet-secagg-v1 share-encryption ";

static tf_sa_result ok(void) {
    tf_sa_result r = {TF_ST_OK, 0};
    return r;
}
static tf_sa_result refuse(uint8_t status, uint32_t reason) {
    tf_sa_result r = {status, reason};
    return r;
}
#define STAGE() refuse(TF_ST_ERR_STATE, TF_SAR_STAGE)
#define NO(reason) refuse(TF_ST_ERR_FORMAT, (reason))

static uint16_t ld16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

__attribute__((weak)) uint32_t tf_secagg_trng(uint8_t *out, uint32_t n) {
    (void)out, (void)n;
    return 0;
}

void tf_sa_mix(tf_secagg_dev *s, const void *data, uint32_t n) {
    tf_sha256_ctx c;
    tf_sha256_init(&c);
    tf_sha256_update(&c, s->entropy, 32);
    tf_sha256_update(&c, data, n);
    tf_sha256_final(&c, s->entropy);
}

/* 32 DRBG bytes: SHA-256(state || "out" || counter), then the state moves on (earlier outputs can't be recomputed) */
static void drbg(tf_secagg_dev *s, uint8_t out[32]) {
    tf_sha256_ctx c;
    tf_sha256_init(&c);
    tf_sha256_update(&c, s->entropy, 32);
    tf_sha256_update(&c, "out", 3);
    tf_sha256_update(&c, &s->drbg_counter, 4);
    tf_sha256_final(&c, out);
    s->drbg_counter++;
    tf_sa_mix(s, "next", 4);
}

/* forget the round (keeping the DRBG); `clear_area`: also zero the area, only while it is still bound */
static void reset(tf_secagg_dev *s, int clear_area) {
    uint8_t keep[32];
    memcpy(keep, s->entropy, 32);
    const uint32_t counter = s->drbg_counter;
    if (clear_area && s->area && s->area_size) {
        memset(s->area, 0, s->area_size);
    }
    memset(s, 0, sizeof(*s));
    memcpy(s->entropy, keep, 32), s->drbg_counter = counter;
    memset(keep, 0, sizeof(keep));
}
static void wipe(tf_secagg_dev *s) { reset(s, 1); }

/* The runtime's part of the pool, then the personal copy (tf_device_personal.c): the round's area starts after both. */
static uint32_t pool_used(const tf_device *d) {
    return ((tf_runtime_pool_need(&d->rt.plan) + 7u) & ~7u) + ((d->pers_bytes + 7u) & ~7u);
}

void tf_sa_bind(tf_secagg_dev *s, const tf_device *d) {
    if (s->stage == TF_SA_IDLE) {
        return;
    }
    if (!d || d != s->dev || !d->has_plan || d->base_lost || (const void *)d->rt.plan.blob != s->plan ||
        pool_used(d) > d->pool_size || d->pool + pool_used(d) != s->area) {
        reset(s, 0);
    }
}

static int64_t element(const tf_device *d, const tf_tensor_info *t, uint32_t id, uint32_t e) {
    const uint8_t *nw = d->rt.ptr[id], *old = d->base[id];
    switch (t->dtype) {
    case TF_DT_INT8:
        return (int64_t)((const int8_t *)nw)[e] - ((const int8_t *)old)[e];
    case TF_DT_INT16: {
        int16_t a, b;
        memcpy(&a, nw + 2 * e, 2), memcpy(&b, old + 2 * e, 2);
        return (int64_t)a - b;
    }
    default: {
        int32_t a, b;
        memcpy(&a, nw + 4 * e, 4), memcpy(&b, old + 4 * e, 4);
        return (int64_t)a - b;
    }
    }
}

static int shared(const tf_tensor_info *t) { return t->kind == TF_K_TRAINABLE && !(t->flags & 1u); }

tf_sa_result tf_sa_seal(tf_secagg_dev *s, tf_device *d, uint32_t *length) {
    *length = 0;
    if (!d || !d->has_plan || d->base_lost) {
        return refuse(TF_ST_ERR_STATE, TF_SAR_NO_PLAN);
    }
    const uint32_t used = pool_used(d);
    wipe(s); /* tf_sa_bind ran first: an area still held is this device's */
    if (used > d->pool_size) {
        return refuse(TF_ST_ERR_NO_MEMORY, 0);
    }
    s->dev = d, s->plan = d->rt.plan.blob;
    s->area = d->pool + used, s->area_size = d->pool_size - used;
    s->y = (uint32_t *)(void *)s->area;
    uint32_t at = 0;
    for (uint32_t i = 0; i < d->rt.plan.n_tensors; i++) {
        tf_tensor_info t;
        tf_plan_tensor(&d->rt.plan, (int32_t)i, &t);
        if (!shared(&t)) {
            continue;
        }
        if ((uint64_t)at + (uint32_t)t.numel + 1 > s->area_size / 4) {
            wipe(s);
            return refuse(TF_ST_ERR_NO_MEMORY, s->area_size / 4);
        }
        for (uint32_t e = 0; e < (uint32_t)t.numel; e++) {
            const int64_t v = element(d, &t, i, e);
            if (v < INT32_MIN || v > INT32_MAX) {
                wipe(s);
                return NO(TF_SAR_DELTA_RANGE);
            }
            s->y[at++] = (uint32_t)(int32_t)v;
        }
    }
    s->d = at, s->stage = TF_SA_SEALED;
    *length = at + 1;
    return ok();
}

static int id_ok(const char *id, uint32_t n) {
    if (n < 1 || n > TF_SA_ID_MAX) {
        return 0;
    }
    for (uint32_t i = 0; i < n; i++) {
        const char c = id[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
              c == '-')) {
            return 0;
        }
    }
    return 1;
}

tf_sa_result tf_sa_begin(tf_secagg_dev *s, const tf_device *d, uint32_t round_id, uint32_t weight,
                         const uint8_t host_entropy[32], const uint8_t *session, uint32_t session_len, const char *id,
                         uint32_t id_len, uint8_t c_pk[32], uint8_t s_pk[32]) {
    if (s->stage != TF_SA_SEALED) {
        return STAGE();
    }
    if (!id_ok(id, id_len)) {
        return NO(TF_SAR_BAD_ID);
    }
    uint8_t label[sizeof(SESSION) - 1 + 32];
    memcpy(label, SESSION, sizeof(SESSION) - 1);
    tf_content_hash(d->store, d->plan_len, label + sizeof(SESSION) - 1);
    if (session_len != sizeof(label) || memcmp(session, label, sizeof(label)) != 0) {
        return NO(TF_SAR_SESSION);
    }
    if (weight == 0) {
        return NO(TF_SAR_WEIGHT);
    }
    memcpy(s->id, id, id_len), s->id[id_len] = 0;
    s->round_id = round_id, s->weight = weight;
    tf_secagg_context(s->ctx, round_id, label, sizeof(label));
    uint8_t trng[32];
    const uint32_t got = tf_secagg_trng(trng, sizeof(trng));
    tf_sa_mix(s, trng, got);
    tf_sa_mix(s, host_entropy, 32);
    tf_sa_mix(s, s->ctx, sizeof(s->ctx));
    tf_sa_mix(s, id, id_len);
    memset(trng, 0, sizeof(trng));
    drbg(s, s->c_sk), drbg(s, s->s_sk), drbg(s, s->b), drbg(s, s->poly_s), drbg(s, s->poly_b);
    tf_x25519_public(s->c_pk, s->c_sk);
    tf_x25519_public(s->s_pk, s->s_sk);
    memcpy(c_pk, s->c_pk, 32), memcpy(s_pk, s->s_pk, 32);
    s->stage = TF_SA_ADVERTISED;
    return ok();
}

tf_sa_result tf_sa_roster(tf_secagg_dev *s, uint32_t n, uint32_t threshold, uint32_t length, uint32_t bits,
                          uint32_t noise, uint32_t *capacity) {
    const uint32_t words = (s->d + 2) & ~1u; /* 8-aligned members after the input */
    const uint32_t per = (uint32_t)sizeof(tf_sa_member) + 2 * TF_SHARE_BYTES;
    *capacity = s->area_size > 4 * words ? (s->area_size - 4 * words) / per : 0;
    if (s->stage != TF_SA_ADVERTISED && s->stage != TF_SA_ROSTER) {
        return STAGE();
    }
    if (bits != 32) {
        return NO(TF_SAR_BITS);
    }
    if (noise) {
        return NO(TF_SAR_NOISE);
    }
    if (length != s->d + 1) {
        return NO(TF_SAR_LENGTH);
    }
    if (n < 1 || !(n / 2 < threshold && threshold <= n)) {
        return NO(TF_SAR_THRESHOLD);
    }
    if (n > *capacity) {
        return refuse(TF_ST_ERR_NO_MEMORY, *capacity);
    }
    s->m = (tf_sa_member *)(void *)(s->area + 4 * words);
    s->shares = (uint8_t *)(s->m + n);
    memset(s->m, 0, (size_t)n * per);
    s->n = n, s->threshold = threshold, s->loaded = 0, s->stage = TF_SA_ROSTER;
    return ok();
}

tf_sa_result tf_sa_roster_add(tf_secagg_dev *s, uint32_t first, uint32_t count, const uint8_t *rec, uint32_t len) {
    if (s->stage != TF_SA_ROSTER) {
        return STAGE();
    }
    if (first != s->loaded || count > s->n - s->loaded) {
        return NO(TF_SAR_ORDER);
    }
    uint32_t at = 0;
    for (uint32_t k = 0; k < count; k++) {
        if (at >= len || len - at < 1u + rec[at] + 64u) {
            return refuse(TF_ST_ERR_BAD_PAYLOAD, 0);
        }
        const uint32_t id_len = rec[at];
        const char *id = (const char *)rec + at + 1;
        if (!id_ok(id, id_len)) {
            return NO(TF_SAR_BAD_ID);
        }
        tf_sa_member *m = &s->m[s->loaded];
        memcpy(m->id, id, id_len), m->id[id_len] = 0, m->id_len = (uint8_t)id_len;
        if (s->loaded && strcmp(s->m[s->loaded - 1].id, m->id) >= 0) {
            return NO(TF_SAR_ORDER);
        }
        memcpy(m->c_pk, rec + at + 1 + id_len, 32);
        memcpy(m->s_pk, rec + at + 1 + id_len + 32, 32);
        s->loaded++;
        at += 1 + id_len + 64;
    }
    if (at != len) {
        return refuse(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    return ok();
}

static void share_pair(const tf_secagg_dev *s, uint32_t index, uint8_t out[2 * TF_SHARE_BYTES]) {
    tf_shamir_share(out, s->s_sk, s->poly_s, s->threshold, index + 1);
    tf_shamir_share(out + TF_SHARE_BYTES, s->b, s->poly_b, s->threshold, index + 1);
}

tf_sa_result tf_sa_share_keys(tf_secagg_dev *s) {
    if (s->stage != TF_SA_ROSTER || s->loaded != s->n) {
        return STAGE();
    }
    for (uint32_t i = 0; i < 2 * s->n; i++) { /* all 2n public keys distinct */
        const uint8_t *a = i < s->n ? s->m[i].c_pk : s->m[i - s->n].s_pk;
        for (uint32_t j = i + 1; j < 2 * s->n; j++) {
            if (memcmp(a, j < s->n ? s->m[j].c_pk : s->m[j - s->n].s_pk, 32) == 0) {
                return NO(TF_SAR_KEYS);
            }
        }
    }
    uint32_t own = s->n;
    for (uint32_t i = 0; i < s->n; i++) {
        if (strcmp(s->m[i].id, s->id) == 0) {
            own = i;
        }
    }
    if (own == s->n || memcmp(s->m[own].c_pk, s->c_pk, 32) || memcmp(s->m[own].s_pk, s->s_pk, 32)) {
        return NO(TF_SAR_NOT_MEMBER);
    }
    s->own = own;
    share_pair(s, own, s->shares + own * 2 * TF_SHARE_BYTES);
    s->m[own].flags |= 1;
    s->stage = TF_SA_SHARED;
    return ok();
}

/* nonce and associated data of the share sender -> receiver: sha256(sender \0 receiver)[:12], ctx || sender \0
 * receiver; returns the AD length */
static uint32_t pair_ad(const tf_secagg_dev *s, const char *sender, const char *receiver, uint8_t nonce[12],
                        uint8_t ad[TF_SECAGG_CTX_BYTES + 2 * TF_SA_ID_MAX + 1]) {
    const uint32_t a = (uint32_t)strlen(sender), b = (uint32_t)strlen(receiver);
    memcpy(ad, s->ctx, TF_SECAGG_CTX_BYTES);
    memcpy(ad + TF_SECAGG_CTX_BYTES, sender, a);
    ad[TF_SECAGG_CTX_BYTES + a] = 0;
    memcpy(ad + TF_SECAGG_CTX_BYTES + a + 1, receiver, b);
    uint8_t h[32];
    tf_sha256(ad + TF_SECAGG_CTX_BYTES, a + 1 + b, h);
    memcpy(nonce, h, 12);
    return TF_SECAGG_CTX_BYTES + a + 1 + b;
}

/* HKDF(X25519(c_sk, peer c_pk), "tinyfleet-secagg-v1 share-encryption " || ctx) */
static void pair_key(const tf_secagg_dev *s, const uint8_t peer_c_pk[32], uint8_t key[32]) {
    uint8_t shared_secret[32], info[sizeof(SHARE_INFO) - 1 + TF_SECAGG_CTX_BYTES];
    tf_x25519(shared_secret, s->c_sk, peer_c_pk);
    memcpy(info, SHARE_INFO, sizeof(SHARE_INFO) - 1);
    memcpy(info + sizeof(SHARE_INFO) - 1, s->ctx, TF_SECAGG_CTX_BYTES);
    tf_hkdf_sha256(key, shared_secret, 32, info, sizeof(info));
    memset(shared_secret, 0, sizeof(shared_secret));
}

tf_sa_result tf_sa_get_share(const tf_secagg_dev *s, uint32_t index, uint8_t box[TF_SA_SHARE_BOX]) {
    if (s->stage != TF_SA_SHARED) {
        return STAGE();
    }
    if (index >= s->n || index == s->own) {
        return NO(TF_SAR_INDEX);
    }
    static uint8_t plain[2 * TF_SHARE_BYTES], ad[TF_SECAGG_CTX_BYTES + 2 * TF_SA_ID_MAX + 1];
    uint8_t key[32], nonce[12];
    share_pair(s, index, plain);
    pair_key(s, s->m[index].c_pk, key);
    const uint32_t ad_len = pair_ad(s, s->id, s->m[index].id, nonce, ad);
    tf_aead_seal(box, key, nonce, ad, ad_len, plain, sizeof(plain));
    memset(plain, 0, sizeof(plain)), memset(key, 0, sizeof(key));
    return ok();
}

tf_sa_result tf_sa_put_share(tf_secagg_dev *s, uint32_t sender, const uint8_t box[TF_SA_SHARE_BOX]) {
    if (s->stage != TF_SA_SHARED) {
        return STAGE();
    }
    if (sender >= s->n || sender == s->own) {
        return NO(TF_SAR_INDEX);
    }
    if (s->m[sender].flags & 1) {
        return NO(TF_SAR_DUPLICATE);
    }
    static uint8_t ad[TF_SECAGG_CTX_BYTES + 2 * TF_SA_ID_MAX + 1];
    uint8_t key[32], nonce[12];
    pair_key(s, s->m[sender].c_pk, key);
    const uint32_t ad_len = pair_ad(s, s->m[sender].id, s->id, nonce, ad);
    const int bad =
        tf_aead_open(s->shares + sender * 2 * TF_SHARE_BYTES, key, nonce, ad, ad_len, box, 2 * TF_SHARE_BYTES);
    memset(key, 0, sizeof(key));
    if (bad) {
        return NO(TF_SAR_AUTH);
    }
    s->m[sender].flags |= 1;
    return ok();
}

/* count u16 indices, strictly ascending and < n; sets `flag` on each. 0 when malformed. */
static int mark(tf_secagg_dev *s, const uint8_t *list, uint32_t count, uint8_t flag) {
    for (uint32_t k = 0; k < count; k++) {
        const uint32_t i = ld16(list + 2 * k);
        if (i >= s->n || (k && i <= ld16(list + 2 * k - 2))) {
            return 0;
        }
        s->m[i].flags |= flag;
    }
    return 1;
}

tf_sa_result tf_sa_mask(tf_secagg_dev *s, const uint8_t *u2, uint32_t count) {
    if (s->stage != TF_SA_SHARED) {
        return STAGE();
    }
    for (uint32_t i = 0; i < s->n; i++) {
        s->m[i].flags &= (uint8_t)~2u;
    }
    if (!mark(s, u2, count, 2)) {
        return NO(TF_SAR_INDEX);
    }
    if (!(s->m[s->own].flags & 2)) {
        return NO(TF_SAR_NOT_MEMBER);
    }
    if (count < s->threshold) {
        return NO(TF_SAR_SURVIVORS);
    }
    for (uint32_t i = 0; i < s->n; i++) { /* a share held from exactly every member of U2 */
        if (!(s->m[i].flags & 1) != !(s->m[i].flags & 2)) {
            return NO(TF_SAR_SHARES);
        }
    }
    /* encode_dense_input: (w v, w), each |entry| below 2^31 / n so a sum of n stays in range */
    const int64_t limit = (int64_t)(((uint64_t)1 << 31) / s->n);
    if ((int64_t)s->weight >= limit) {
        return NO(TF_SAR_OVERFLOW);
    }
    for (uint32_t e = 0; e < s->d; e++) {
        const int64_t v = (int64_t)(int32_t)s->y[e] * s->weight;
        if (v >= limit || -v >= limit) {
            return NO(TF_SAR_OVERFLOW);
        }
    }
    for (uint32_t e = 0; e < s->d; e++) {
        s->y[e] = (uint32_t)((int64_t)(int32_t)s->y[e] * s->weight);
    }
    s->y[s->d] = s->weight;
    const uint32_t len = s->d + 1;
    tf_secagg_add_mask(s->y, len, s->b, s->ctx, 0);
    uint8_t s_uv[32];
    for (uint32_t i = 0; i < s->n; i++) {
        if (i != s->own && (s->m[i].flags & 2)) {
            tf_x25519(s_uv, s->s_sk, s->m[i].s_pk);
            tf_secagg_add_mask(s->y, len, s_uv, s->ctx, strcmp(s->id, s->m[i].id) > 0);
        }
    }
    memset(s_uv, 0, sizeof(s_uv));
    s->stage = TF_SA_MASKED;
    return ok();
}

tf_sa_result tf_sa_get_masked(const tf_secagg_dev *s, uint32_t offset, uint32_t max_len, uint8_t *out, uint32_t *n,
                              uint32_t *total) {
    *n = 0, *total = 0;
    if (s->stage != TF_SA_MASKED && s->stage != TF_SA_DONE) {
        return STAGE();
    }
    *total = 4 * (s->d + 1);
    if (offset > *total) {
        return refuse(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    const uint32_t len = *total - offset < max_len ? *total - offset : max_len;
    for (uint32_t k = 0; k < len; k++) {
        const uint32_t at = offset + k;
        out[k] = (uint8_t)(s->y[at / 4] >> (8 * (at % 4)));
    }
    *n = len;
    return ok();
}

tf_sa_result tf_sa_unmask(tf_secagg_dev *s, const uint8_t *lists, uint32_t n_surv, uint32_t n_drop) {
    if (s->stage == TF_SA_DONE) { /* the same request again gets the same answer; another one is refused */
        if (n_surv != s->n_surv || n_drop != s->n_drop) {
            return NO(TF_SAR_REPEAT);
        }
        for (uint32_t k = 0; k < n_surv + n_drop; k++) {
            const uint32_t i = ld16(lists + 2 * k);
            if (i >= s->n || !(s->m[i].flags & (k < n_surv ? 4 : 8))) {
                return NO(TF_SAR_REPEAT);
            }
        }
        return ok();
    }
    if (s->stage != TF_SA_MASKED) {
        return STAGE();
    }
    for (uint32_t i = 0; i < s->n; i++) {
        s->m[i].flags &= (uint8_t)~12u;
    }
    int fine = mark(s, lists, n_surv, 4) && mark(s, lists + 2 * n_surv, n_drop, 8);
    for (uint32_t i = 0; fine && i < s->n; i++) { /* disjoint, and together exactly U2 */
        const uint8_t f = s->m[i].flags;
        fine = !((f & 4) && (f & 8)) && !(f & 2) == !(f & 12);
    }
    if (!fine || !(s->m[s->own].flags & 4)) {
        for (uint32_t i = 0; i < s->n; i++) {
            s->m[i].flags &= (uint8_t)~12u;
        }
        return NO(TF_SAR_LISTS);
    }
    if (n_surv < s->threshold) {
        for (uint32_t i = 0; i < s->n; i++) {
            s->m[i].flags &= (uint8_t)~12u;
        }
        return NO(TF_SAR_SURVIVORS);
    }
    s->n_surv = n_surv, s->n_drop = n_drop, s->stage = TF_SA_DONE;
    return ok();
}

tf_sa_result tf_sa_get_reveal(const tf_secagg_dev *s, uint32_t first, uint32_t count, uint8_t *out) {
    if (s->stage != TF_SA_DONE) {
        return STAGE();
    }
    if (first > s->n_surv + s->n_drop || count > s->n_surv + s->n_drop - first) {
        return refuse(TF_ST_ERR_BAD_PAYLOAD, 0);
    }
    uint32_t j = 0; /* survivors in index order, then dropped in index order */
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < s->n; i++) {
            if (!(s->m[i].flags & (pass ? 8 : 4))) {
                continue;
            }
            if (j >= first && j < first + count) {
                memcpy(out + (j - first) * TF_SHARE_BYTES,
                       s->shares + i * 2 * TF_SHARE_BYTES + (pass ? 0 : TF_SHARE_BYTES), TF_SHARE_BYTES);
            }
            j++;
        }
    }
    return ok();
}
