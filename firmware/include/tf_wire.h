/* Readers of the downlink formats (docs/formats.md): envelope, plan blob (TFPL v2), model update (TFUP v1), and
 * the delta records section writer. The C twin of device_agent/wire; every reader returns a WireError number
 * (device_agent/wire/errors.py), 0 = OK, and never reads outside the bytes it was given. A board verifies
 * Ed25519 (the fleet public key, tf_ed25519.h) or HMAC-SHA256, or runs "unsigned only" (tests, emulated fleets). */
#ifndef TF_WIRE_H
#define TF_WIRE_H

#include <stdint.h>

enum {
    TF_WE_OK = 0,
    TF_WE_TRUNCATED = 1,
    TF_WE_BAD_MAGIC = 2,
    TF_WE_UNSUPPORTED_VERSION = 3,
    TF_WE_BAD_LENGTH = 4,
    TF_WE_TRAILING_BYTES = 5,
    TF_WE_CRC_MISMATCH = 6,
    TF_WE_UNSIGNED = 7,
    TF_WE_BAD_SIGNATURE = 8,
    TF_WE_SIG_ALG_MISMATCH = 9,
    TF_WE_RESERVED_NONZERO = 10,
    TF_WE_BAD_ENUM = 11,
    TF_WE_BAD_INDEX = 12,
    TF_WE_BAD_SCALE = 13,
    TF_WE_SIZE_OVERFLOW = 14,
    TF_WE_OUT_OF_ARENA = 15,
    TF_WE_BAD_SHAPE = 16,
    TF_WE_BAD_OFFSET = 17,
    TF_WE_BAD_STRING = 18,
    TF_WE_BAD_VALUE = 19,
    TF_WE_ID_ORDER = 20,
    TF_WE_NOT_CANONICAL = 21,
    TF_WE_PLAN_MISMATCH = 22,
};

/* ir.Kind, ir.DType, ir.OpType */
enum { TF_K_INPUT = 1, TF_K_LABEL, TF_K_ACTIVATION, TF_K_GRADIENT, TF_K_MASK, TF_K_CONST, TF_K_TRAINABLE };
enum { TF_DT_INT8 = 1, TF_DT_INT16, TF_DT_INT32, TF_DT_MASK };
enum {
    TF_OP_CONV2D = 1,
    TF_OP_ADD,
    TF_OP_AVGPOOL,
    TF_OP_RESHAPE,
    TF_OP_EMBEDDING,
    TF_OP_CLAMP,
    TF_OP_SAVE_CHANNELS,
    TF_OP_PWDW,
    TF_OP_PATCH,
    TF_OP_SOFTMAX_CE = 16,
    TF_OP_APPLY_MASK,
    TF_OP_CONV2D_BWD_INPUT,
    TF_OP_CONV2D_UPDATE,
    TF_OP_GRAD_ACCUM,
    TF_OP_AVGPOOL_BWD,
    TF_OP_RESHAPE_BWD,
    TF_OP_EMBEDDING_UPDATE,
};

/* Signature policy, always explicit (docs/formats.md check 11). */
typedef struct {
    int alg;            /* 0 = unsigned only, 1 = Ed25519, 2 = HMAC-SHA256 */
    const uint8_t *key; /* Ed25519: the 32-byte public key (other lengths verify nothing); HMAC: the key */
    uint32_t key_len;
} tf_verify;

/* Envelope checks 1-11 for magic/version; on OK *body / *body_len is the body [16, L-4-S). */
int tf_envelope_open(const uint8_t *blob, uint32_t n, const char *magic, uint16_t version, const tf_verify *v,
                     const uint8_t **body, uint32_t *body_len);
/* The key slot (docs/formats.md "Key slot"): the signature policy provisioned in the flash image, a record
 * "TFKY" u16 version=1 | u16 sig_alg | u32 key_len | key | u32 CRC32. An erased slot (first word all 0 or all 1
 * bits) gives OK and "unsigned only"; a damaged record its WireError and a policy that refuses every blob (fail
 * closed: Ed25519 without a key). On OK out->key points into the slot, which must outlive the policy. */
#define TF_KEY_SLOT_BYTES 256u
int tf_key_slot_read(const uint8_t *slot, uint32_t n, tf_verify *out);

/* SHA-256(magic ‖ version ‖ body) of a blob that passed tf_envelope_open. */
void tf_content_hash(const uint8_t *blob, uint32_t n, uint8_t out[32]);

/* ---- plan ---- */
#define TF_PLAN_TENSOR_REC 44
#define TF_PLAN_ARENA_ALIGN 4u /* every arena offset is a multiple of this (wire/plan.py ARENA_ALIGN) */

typedef struct {
    uint8_t kind, dtype, rank, flags;
    int32_t dims[4];
    int32_t zero_point;
    int32_t offset; /* arena offset or -1 */
    uint32_t n_scales, scales_off, data_off, data_len;
    int32_t numel;
    uint32_t nbytes;
} tf_tensor_info;

typedef struct {
    const uint8_t *blob; /* the whole blob, 4-byte aligned (used in place: CONST data, op attributes) */
    uint32_t blob_len;
    uint32_t n_tensors, n_ops;
    int32_t input_id, label_id, logits_id;
    uint32_t arena_bytes;
    uint32_t tensors_off; /* absolute offset of the tensor table */
    uint32_t ops_off;     /* absolute offset of the first op record */
    uint32_t strings_off; /* absolute offset of the strings section */
    /* the optional RECIPE section (plan v2, docs/engine.md "Training recipe"); has_recipe = 0: the default step */
    uint32_t has_recipe;
    uint32_t accum_steps, beta_q15, frac_bits, lr_min_q15, warmup, total;
    uint32_t opt_bytes; /* size of the SRAM optimizer region */
    uint32_t n_slots;   /* one per CONV2D_UPDATE, in op order */
    uint32_t slots_off; /* absolute offset of slot 0: u32 op_index | i32 wbuf_off | i32 bbuf_off | i32 frac_off */
} tf_plan;

#define TF_PLAN_VERSION 3
#define TF_PATCH_MAX_IN 33 /* PATCH inputs: x + (w, b) x 16 conv layers (wire/plan.py PATCH_MAX_CONVS) */
#define TF_PLAN_FLAG_RECIPE 4u

/* The strict reader: envelope + body (every check of wire/plan.py, same order, same codes). */
int tf_plan_read(const uint8_t *blob, uint32_t n, const tf_verify *v, tf_plan *out);
void tf_plan_tensor(const tf_plan *p, int32_t id, tf_tensor_info *t);
/* Op record at absolute offset `off`: type, n_in, n_out, ids pointer, attrs pointer, record size. */
typedef struct {
    uint8_t type, n_in, n_out;
    const int32_t *ids; /* inputs then outputs */
    const int32_t *attrs;
    uint32_t size;
} tf_op_view;
void tf_plan_op(const tf_plan *p, uint32_t off, tf_op_view *op);
/* Attribute layout of an op type ('s' scalar, 'a' array = ir.OP_ATTRS), NULL for an unknown type. */
const char *tf_op_attr_spec(uint32_t type);
/* i-th string (0 plan name, 1 scheme, 2.. tensors, then ops): pointer + length. */
const char *tf_plan_string(const tf_plan *p, uint32_t index, uint32_t *len);

/* ---- model update (TFUP v1, src/wire/tf_update_read.c) */
typedef struct {
    uint32_t base_version, new_version, n_tensors;
    const uint8_t *plan_hash; /* 32 bytes */
    const uint8_t *records;   /* first record: tensor_id u32 | dtype u8 | 0 u8 | 0 u16 | count u32 | values | pad4 */
} tf_update_view;

/* Envelope + body checks (no plan checks: those are the device's, PLAN_MISMATCH); fills *u on OK. */
int tf_update_read(const uint8_t *blob, uint32_t n, const tf_verify *v, tf_update_view *u);
/* The same, for tests and the differential tool. */
int tf_update_read_only(const uint8_t *blob, uint32_t n, const tf_verify *v);

/* ---- delta records section (docs/formats.md "Delta", src/wire/tf_delta_write.c), streamed byte by byte */
typedef struct {
    int32_t id;
    uint8_t enc, dtype, width, _pad;
    uint32_t numel, count;
    uint32_t thresh, quota; /* TOPK: |v| > thresh, or |v| == thresh for the first `quota` such indices */
    uint32_t start, size;   /* record position in the records section, bytes */
} tf_delta_rec;

typedef struct {
    uint32_t elem, ties; /* next element to look at, ties taken so far */
    uint32_t j;          /* selected elements returned so far */
    uint32_t last;       /* the element returned last (rank j - 1) */
} tf_sel_iter;

/* Where a tensor's delta comes from: new values cur[id] minus base values base[id] (shapes: the plan's). */
typedef struct {
    const tf_plan *plan;
    const uint8_t *const *cur;
    const uint8_t *const *base;
} tf_delta_src;

/* Plans record r of tensor id: DENSE, or TOPK of k elements (k > 0) when smaller. WireError (BAD_VALUE: a delta
 * beyond int32; SIZE_OVERFLOW: a record above 2^32 - 1 bytes). */
int tf_delta_record(const tf_delta_src *s, int32_t id, uint32_t k, tf_delta_rec *r);
/* Byte pos of record r (header, TOPK indices, values, zero pad); the iterators resume the selection scan. */
uint8_t tf_delta_record_byte(const tf_delta_src *s, const tf_delta_rec *r, tf_sel_iter *it_idx, tf_sel_iter *it_val,
                             uint32_t pos);

/* Little-endian loads from a byte pointer (no alignment assumption). */
static inline uint32_t tf_ld_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint16_t tf_ld_u16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline void tf_st_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8), p[2] = (uint8_t)(v >> 16), p[3] = (uint8_t)(v >> 24);
}

#endif /* TF_WIRE_H */
