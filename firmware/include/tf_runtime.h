/* The plan executor: prepares a plan read by tf_plan_read (every op's shapes, kinds and attributes checked once,
 * scratch found, TRAINABLE tensors copied to SRAM) and runs one training step on one sample (N = 1), bit-exact
 * with device_agent/engine/trainer.py. The arena is the caller's memory laid out exactly at the plan's offsets;
 * nothing is allocated. CONST data is used in place from the blob (flash). */
#ifndef TF_RUNTIME_H
#define TF_RUNTIME_H

#include "tf_wire.h"

#define TF_MAX_TENSORS 512
#define TF_MAX_OPS 512
#define TF_MAX_CLASSES 1024
/* Largest |exponent| a plan attribute (qas_*_e, wscale_p) or a step's lr_e may carry (engine/qmath.py EXP_LIMIT):
 * any float's mant_exp is within +-1100, and with this bound the exponent sums of a step (lr_e + qas_e + 15 +
 * e_y, e_y + wscale_p - 7 + shift, over <= TF_MAX_OPS ops) stay far inside int32. */
#define TF_EXP_LIMIT 4096

/* prepare errors (tf_runtime_load), reported with the op index in err_op */
enum {
    TF_RT_OK = 0,
    TF_RT_TOO_BIG = 1,    /* more tensors / ops / classes than this build's tables */
    TF_RT_NO_MEMORY = 2,  /* arena + trainable copies exceed the board's memory */
    TF_RT_BAD_OP = 3,     /* an op whose tensors, shapes or attributes do not fit its kernel */
    TF_RT_NO_SCRATCH = 4, /* an op needs scratch the plan did not plan */
    TF_RT_KERNEL = 5,     /* a kernel refused at run time (see err_status) */
    TF_RT_BAD_SAMPLE = 6, /* label out of range or token id out of the table */
};

typedef struct {
    int32_t correct;     /* argmax(logits) == label before the update */
    int32_t p_label_q15; /* softmax probability of the label, Q15 */
} tf_step_result;

typedef struct {
    tf_plan plan;
    uint8_t plan_hash[32];
    uint8_t *arena;  /* plan.arena_bytes, at the pool start */
    uint8_t *params; /* trainable copies, after the arena */
    uint32_t params_bytes;
    uint32_t n_trainable;
    uint8_t *ptr[TF_MAX_TENSORS]; /* value of each tensor (arena, SRAM copy or blob), NULL if never used */
    int32_t exp[TF_MAX_TENSORS];  /* gradient exponents of the current step */
    uint32_t op_off[TF_MAX_OPS];
    int16_t scratch[TF_MAX_OPS]; /* scratch tensor id per op, -1 none, <= -2 a free arena gap (tf_runtime.c) */
    uint32_t step;               /* update counter (uint32, wraps), seeds the stochastic rounding; with a recipe
                                    it counts applied updates only */
    uint8_t *opt;                /* the recipe's optimizer region (plan.opt_bytes, after the trainable copies) */
    uint32_t pending;            /* recipe: samples accumulated since the last applied update (< accum_steps) */
    uint32_t slot_next;          /* recipe: slot of the next CONV2D_UPDATE while ops run */
    uint32_t opt_cursor;         /* recipe: canonical layout position while the prepare checks the slots */
    int32_t n_classes;
    int8_t logits[TF_MAX_CLASSES]; /* logits of the last step (read by SOFTMAX_CE) */
    int32_t err_op, err_status;
    /* per op: 0, or the op's free arena gap is smaller than it wanted: frac / 256 of it (tf_runtime.c) */
    uint8_t gap_frac[TF_MAX_OPS];
} tf_runtime;

/* Prepare a plan that passed tf_plan_read. pool: the board's SRAM for arena + trainable copies. Nothing in the
 * pool is written unless the prepare passed and copy_params is set (then the trainable copies are reset to the
 * plan's values); copy_params = 0 re-attaches a plan whose trained values are still in the pool. */
int tf_runtime_load(tf_runtime *rt, const tf_plan *plan, uint8_t *pool, uint32_t pool_size, int copy_params);
/* Bytes of SRAM the plan needs from the pool (arena + aligned trainable copies + the recipe's optimizer region). */
uint32_t tf_runtime_pool_need(const tf_plan *plan);
/* One training step on one sample (input tensor bytes), label, learning rate lr_m * 2^lr_e. With a recipe
 * (plan.has_recipe) each sample adds with the rate / accum_steps (tf_per_sample_lr), scaled by the schedule at
 * the current update step; the parameters change on every accum_steps-th sample only. */
int tf_runtime_step(tf_runtime *rt, const uint8_t *sample, int32_t label, int32_t lr_m, int32_t lr_e,
                    tf_step_result *res);
/* SHA-256 over the trainable tensors in id order, little-endian bytes (= Trainer.state_hash). */
void tf_runtime_state_hash(const tf_runtime *rt, uint8_t out[32]);
/* Re-copy every trainable tensor from the plan blob (the plan's initial model); resets the optimizer state. */
void tf_runtime_reset_params(tf_runtime *rt);
/* Zero the recipe's optimizer region and the pending sample count (a new model version arrived). */
void tf_runtime_reset_optimizer(tf_runtime *rt);

#endif /* TF_RUNTIME_H */
