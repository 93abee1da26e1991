/* The training recipe's learning-rate schedule (docs/engine.md "Training recipe"), the C twin of
 * device_agent/engine/recipe.py lr_factor_q15 / scaled_lr: integers only, one 65-entry Q15 cosine table. */
#ifndef TF_RECIPE_H
#define TF_RECIPE_H

#include <stdint.h>

#define TF_RECIPE_ACC_BITS_W 16 /* weight buffer units: 2^-16 LSB (recipe.ACC_BITS_W) */
#define TF_RECIPE_ACC_BITS_B 12 /* bias buffer units: 2^-12 LSB (recipe.ACC_BITS_B) */
/* Bits of a per-sample sum: weights |sum g (x - zx)| <= 32768 px x 128 x 255 < 2^30, bias |sum g| <= 2^22. A
 * step whose delta (sum x m) shifted left by exponent + bits could pass 2^62 is refused (tf_runtime.c,
 * TF_ERR_OVERFLOW), as by engine/recipe.py fixed_delta (recipe.ACC_MAX_BITS) */
#define TF_RECIPE_ACC_MAX_BITS_W 30
#define TF_RECIPE_ACC_MAX_BITS_B 22

/* 0.5 (1 + cos(pi i / 64)) in Q15, i = 0..64 (recipe.COS_Q15, copied verbatim; src/runtime/tf_recipe.c) */
extern const int32_t tf_cos_q15[65];

/* Schedule factor in Q15 at update step u: linear warm-up over `warmup` steps, then cosine to lr_min_q15 at
 * `total` (total = 0: 32768 after warm-up). */
int32_t tf_lr_factor_q15(uint32_t u, uint32_t warmup, uint32_t total, int32_t lr_min_q15);

/* The per-sample rate (lr_m, lr_e) / accum_steps, renormalised to a 15-bit mantissa (recipe.per_sample_lr). */
void tf_per_sample_lr(int32_t lr_m, int32_t lr_e, uint32_t accum_steps, int32_t *m, int32_t *e);

/* (lr_m, lr_e) times a Q15 factor, renormalised (recipe.scaled_lr); returns 0 when the factor is <= 0 (no
 * update is added), else 1 with *m, *e set. */
int tf_scaled_lr(int32_t lr_m, int32_t lr_e, int32_t f_q15, int32_t *m, int32_t *e);

#endif /* TF_RECIPE_H */
