/* The device behind the UART commands, sans I/O: the plan store (flash-like), the runtime, private samples,
 * training and the streamed delta records section. tf_proto.c unpacks frames and calls these; the code is in
 * src/device/ (store, samples, train, delta), the format readers and the delta writer in src/wire/.
 *
 * Store layout (the board's flash minus the firmware, tf_board_store): the plan at offset 0 (used in place),
 * then the base model update (the last applied TFUP blob: the delta base), then free space for staging incoming
 * blobs, and the samples at the top. An incoming blob is staged in free space and checked before it replaces
 * anything; only when it does not fit there does it overwrite (then the old plan / base is gone if it fails). */
#ifndef TF_DEVICE_H
#define TF_DEVICE_H

#include "tf_runtime.h"

#define TF_MAX_SAMPLES 128 /* sample slots in the store (fewer when the store is small) */
#define TF_MAX_DELTA_TENSORS 128
#define TF_MAX_PERSONAL_TENSORS 64 /* tensors a personal copy may hold */

/* personalization methods (device_agent/engine/personal.py METHODS; 0: none) */
enum { TF_PERS_NONE = 0, TF_PERS_DITTO = 1, TF_PERS_FINETUNE = 2, TF_PERS_HEAD = 3, TF_PERS_BIAS = 4 };
#define TF_PERSONAL_STEP0 0x80000000u /* the update counter of personal steps starts here (+ steps done) */

/* prepare errors are reported as ERR_FORMAT with wire_error = TF_PREP_ERROR_BASE + tf_runtime error */
#define TF_PREP_ERROR_BASE 256

typedef struct tf_device_s {
    tf_runtime rt;
    int has_plan;
    uint8_t *store;
    uint32_t store_size, plan_len;
    uint8_t *pool;
    uint32_t pool_size;
    /* base model update (the delta base) */
    int has_update, base_lost;
    uint32_t upd_off, upd_len, model_version;
    const uint8_t *base[TF_MAX_TENSORS]; /* base values per shared trainable tensor */
    /* incoming chunked blob (plan or update) */
    uint8_t xfer_cmd;
    uint32_t xfer_at, xfer_total, xfer_got, xfer_last_off;
    /* samples: ring at the store top, oldest first */
    uint32_t sample_bytes, sample_cap, samples_held, sample_head, sample_got, sample_total, sample_last_off;
    uint32_t samples_at;
    int32_t labels[TF_MAX_SAMPLES];
    uint8_t sample_valid[TF_MAX_SAMPLES]; /* slot holds a whole sample (PUSH_SAMPLE or STORE_SAMPLES) */
    uint32_t samples_stored;              /* valid slots */
    /* incoming STORE_SAMPLES batch: records for slots first, first + 1, ... */
    uint32_t batch_first, batch_got, batch_total, batch_last_off;
    int32_t pending_label;
    /* training */
    uint32_t steps_total, round_id;
    int32_t last_p_label_q15;
    /* delta records */
    int delta_ready;
    uint32_t delta_n, delta_total;
    tf_delta_rec delta[TF_MAX_DELTA_TENSORS];
    tf_sel_iter it_idx, it_val;
    int32_t it_rec;
    tf_verify verify;
    /* personalization (src/device/tf_device_personal.c): the personal copy sits in the pool after the
     * runtime's part; the global values it is trained on (and pulled toward) are the delta base in the store */
    int trained_since_update; /* shared steps since the last model update: the runtime no longer holds the base */
    uint8_t pers_method;      /* TF_PERS_* */
    uint8_t pers_has;         /* the copy holds a personal model (after the first PERSONALIZE) */
    int32_t pers_lam_q15;     /* Ditto's pull, 0..32768 */
    uint32_t pers_n, pers_bytes, pers_steps_done;
    uint16_t pers_ids[TF_MAX_PERSONAL_TENSORS]; /* ascending shared trainable tensor ids */
    uint32_t pers_off[TF_MAX_PERSONAL_TENSORS]; /* offset of each tensor's copy in pers (4-aligned) */
    uint8_t *pers;
} tf_device;

/* status of a device call: TF_ST_* (tf_frame.h) plus a detail (expected offset, capacity or wire error). */
typedef struct {
    uint8_t status;
    uint32_t detail;
} tf_dev_result;

void tf_device_init(tf_device *d, uint8_t *store, uint32_t store_size, uint8_t *pool, uint32_t pool_size,
                    const tf_verify *verify);
/* At boot: adopt a plan provisioned at store offset 0 with the firmware image (flashed at the factory; QEMU's
 * generic loader in emulated fleets), checked by the full plan reader as LOAD_PLAN would. ERR_STATE: none there. */
tf_dev_result tf_device_boot(tf_device *d);
/* LOAD_PLAN / LOAD_UPDATE chunk; *received = bytes held after it. */
tf_dev_result tf_device_load(tf_device *d, uint8_t cmd, uint32_t offset, uint32_t total, const uint8_t *chunk,
                             uint32_t n, uint32_t *received);
tf_dev_result tf_device_push_sample(tf_device *d, uint32_t offset, uint32_t total, int32_t label, const uint8_t *chunk,
                                    uint32_t n, uint32_t *received);
/* STORE_SAMPLES chunk: a batch of `total` bytes, records (label i32 | input bytes | pad4) for the slots first,
 * first + 1, ... (first + count <= capacity); *received = batch bytes held after it. total 0 stores nothing. */
tf_dev_result tf_device_store_samples(tf_device *d, uint32_t first, uint32_t offset, uint32_t total,
                                      const uint8_t *chunk, uint32_t n, uint32_t *received);
/* TRAIN_LIST: one N = 1 step per listed slot, in list order (slots: count x u16 little-endian). Every slot must
 * hold a sample (else ERR_STATE with the slot, nothing trained). */
tf_dev_result tf_device_train_list(tf_device *d, const uint8_t *slots, uint32_t count, int32_t lr_m, int32_t lr_e,
                                   uint32_t round_id, uint32_t *correct);
/* TRAIN: step s uses, of the u = min(steps, held) newest samples, the (s mod u)-th oldest. */
tf_dev_result tf_device_train(tf_device *d, uint32_t steps, int32_t lr_m, int32_t lr_e, uint32_t round_id,
                              uint32_t *used, uint32_t *correct);
/* GET_DELTA: chunk [offset, offset + max_len) of the records section (built when offset == 0). */
tf_dev_result tf_device_delta(tf_device *d, uint32_t offset, uint32_t max_len, uint32_t topk_permille, uint8_t *out,
                              uint32_t *n, uint32_t *total);

/* PERSONAL_SETUP: keep a personal copy of tensors `ids` (count x u16, ascending, shared trainable) with method
 * TF_PERS_* (NONE: drop the copy); any earlier copy is dropped. ERR_NO_MEMORY (detail: bytes free) when the pool
 * cannot hold it beside the runtime; ERR_STATE without a plan or with a training recipe (not supported). */
tf_dev_result tf_device_personal_setup(tf_device *d, uint32_t method, int32_t lam_q15, const uint8_t *ids,
                                       uint32_t count);
/* PERSONALIZE: one personal step per listed slot (u16), as Personalizer.update does on the current model update:
 * from the copy (or from the global model if there is none yet, or `restart` for finetune), each step followed by
 * restoring the non-personal tensors and, for ditto, the integer pull toward the global values; then the copy is
 * kept and the runtime holds the global model and its update counter again (deltas unchanged). ERR_STATE if the
 * device trained since the last model update (the global values are then gone from the runtime). */
tf_dev_result tf_device_personalize(tf_device *d, const uint8_t *slots, uint32_t count, int32_t lr_m, int32_t lr_e,
                                    int restart, uint32_t *correct);
/* SHA-256 of the personal model (the runtime's trainable tensors with the copy laid over them, id order). */
void tf_device_personal_hash(const tf_device *d, uint8_t out[32]);

#endif /* TF_DEVICE_H */
