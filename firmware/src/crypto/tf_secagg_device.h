/* The device side of secure aggregation on a board, sans I/O: the twin of device_agent/secagg.py's SecAggDevice
 * and MaskedRound, one round at a time: seal the trained delta (it never leaves the board in clear), advertise
 * X25519 keys from the board's entropy, take the roster, hand out encrypted Shamir shares, take the others',
 * mask the input, reveal one share per member once. src/proto/tf_proto_secagg.c unpacks the UART frames.
 *
 * Memory: the fixed state here (keys, context) is static; the masked input ((D + 1) words), the roster (one
 * tf_sa_member each) and the received shares (132 bytes each) live in the pool's tail, beyond what the loaded
 * plan uses. Refuses: 64-bit sums, rosters asking for DP noise (the board adds none), rosters larger than the
 * tail holds, a threshold at or below half the group, and every out-of-order or repeated step. */
#ifndef TF_SECAGG_DEVICE_H
#define TF_SECAGG_DEVICE_H

#include "tf_device.h"
#include "tf_secagg.h"

#define TF_SA_ID_MAX 64
#define TF_SA_SHARE_BOX (2 * TF_SHARE_BYTES + TF_AEAD_TAG) /* one encrypted share pair: 148 bytes */

enum { TF_SA_IDLE, TF_SA_SEALED, TF_SA_ADVERTISED, TF_SA_ROSTER, TF_SA_SHARED, TF_SA_MASKED, TF_SA_DONE };

/* Why a step was refused (the u16 / u32 in the error answer; device_agent/board_secagg.py REASONS). */
enum {
    TF_SAR_STAGE = 1,   /* not the step the round is at */
    TF_SAR_NO_PLAN,     /* no plan or no delta base on the board */
    TF_SAR_DELTA_RANGE, /* a delta value beyond int32 */
    TF_SAR_BAD_ID,      /* a device id outside [A-Za-z0-9_.-]{1,64} */
    TF_SAR_SESSION,     /* the session label is not this board's plan's */
    TF_SAR_WEIGHT,      /* weight 0 */
    TF_SAR_BITS,        /* bits other than 32 */
    TF_SAR_NOISE,       /* distributed DP noise asked */
    TF_SAR_LENGTH,      /* roster length != sealed D + 1 */
    TF_SAR_THRESHOLD,   /* threshold outside (n / 2, n] */
    TF_SAR_ORDER,       /* roster ids not sorted and unique, or more members than announced */
    TF_SAR_KEYS,        /* public keys not all distinct */
    TF_SAR_NOT_MEMBER,  /* the roster lacks this board's id with its keys */
    TF_SAR_INDEX,       /* a member index out of range, or this board's own */
    TF_SAR_AUTH,        /* an encrypted share that does not authenticate */
    TF_SAR_DUPLICATE,   /* a share received twice */
    TF_SAR_SHARES,      /* the shares held are not exactly those of U2 minus this board */
    TF_SAR_SURVIVORS,   /* fewer than threshold in U2 or in the survivors */
    TF_SAR_OVERFLOW,    /* delta x weight x group could leave the signed 32-bit range */
    TF_SAR_LISTS,       /* unmask lists overlap, miss U2 members, or omit this board from the survivors */
    TF_SAR_REPEAT       /* a second, different unmask request */
};

typedef struct {
    uint8_t c_pk[32], s_pk[32];
    uint8_t id_len, flags; /* flags: 1 share held, 2 in U2, 4 survivor, 8 dropped */
    char id[TF_SA_ID_MAX + 2];
} tf_sa_member;

typedef struct {
    int stage;
    uint32_t d, weight, round_id, n, threshold, loaded, own, n_surv, n_drop;
    uint8_t ctx[TF_SECAGG_CTX_BYTES];
    char id[TF_SA_ID_MAX + 1];
    uint8_t c_sk[32], s_sk[32], b[32], poly_s[32], poly_b[32], c_pk[32], s_pk[32];
    uint8_t entropy[32]; /* DRBG state: SHA-256 of everything mixed in */
    uint32_t drbg_counter;
    const tf_device *dev; /* what the state is bound to (tf_sa_bind): the device, its plan and its pool's tail */
    const void *plan;
    uint8_t *area; /* the pool's tail */
    uint32_t area_size;
    uint32_t *y;     /* (d + 1) words: the delta when sealed, the masked input after tf_sa_mask */
    tf_sa_member *m; /* n members in roster (sorted id) order */
    uint8_t *shares; /* n x 132: member i's shares for this board, s_sk share then b share */
} tf_secagg_dev;

/* A refusal: TF_ST_* status and the reason (or the capacity for ERR_NO_MEMORY). */
typedef struct {
    uint8_t status;
    uint32_t reason;
} tf_sa_result;

/* Mix bytes into the DRBG (the proto mixes the tick count at every command). */
void tf_sa_mix(tf_secagg_dev *s, const void *data, uint32_t n);
/* The board's TRNG: fills out and returns the bytes written. Weak, 0 here: QEMU's mps2 has no TRNG; a real
 * part's port defines it from its RNG peripheral (STM32 RNG). */
uint32_t tf_secagg_trng(uint8_t *out, uint32_t n);

/* Before every command: a round sealed on another device, plan or pool layout (a new plan, or a fresh device in
 * the fuzz harness) is dropped without touching its old area; the commands then answer ERR_STATE. */
void tf_sa_bind(tf_secagg_dev *s, const tf_device *d);
tf_sa_result tf_sa_seal(tf_secagg_dev *s, tf_device *d, uint32_t *length);
tf_sa_result tf_sa_begin(tf_secagg_dev *s, const tf_device *d, uint32_t round_id, uint32_t weight,
                         const uint8_t host_entropy[32], const uint8_t *session, uint32_t session_len, const char *id,
                         uint32_t id_len, uint8_t c_pk[32], uint8_t s_pk[32]);
tf_sa_result tf_sa_roster(tf_secagg_dev *s, uint32_t n, uint32_t threshold, uint32_t length, uint32_t bits,
                          uint32_t noise, uint32_t *capacity);
/* records: count x (id_len u8 | id | c_pk 32 | s_pk 32), appended at index `first` (== members loaded so far) */
tf_sa_result tf_sa_roster_add(tf_secagg_dev *s, uint32_t first, uint32_t count, const uint8_t *rec, uint32_t len);
tf_sa_result tf_sa_share_keys(tf_secagg_dev *s);
tf_sa_result tf_sa_get_share(const tf_secagg_dev *s, uint32_t index, uint8_t box[TF_SA_SHARE_BOX]);
tf_sa_result tf_sa_put_share(tf_secagg_dev *s, uint32_t sender, const uint8_t box[TF_SA_SHARE_BOX]);
/* u2: count x u16 little-endian member indices (ascending): the devices that shared keys */
tf_sa_result tf_sa_mask(tf_secagg_dev *s, const uint8_t *u2, uint32_t count);
tf_sa_result tf_sa_get_masked(const tf_secagg_dev *s, uint32_t offset, uint32_t max_len, uint8_t *out, uint32_t *n,
                              uint32_t *total);
/* survivors then dropped: u16 little-endian indices, each list ascending */
tf_sa_result tf_sa_unmask(tf_secagg_dev *s, const uint8_t *lists, uint32_t n_surv, uint32_t n_drop);
/* reveal j in [first, first + count): survivors' b shares, then the dropped devices' s_sk shares (66 bytes each) */
tf_sa_result tf_sa_get_reveal(const tf_secagg_dev *s, uint32_t first, uint32_t count, uint8_t *out);

#endif /* TF_SECAGG_DEVICE_H */
