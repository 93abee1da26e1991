/* int8 training kernels of TinyFleet, CMSIS-NN shape: one .c per op, params structs, const inputs, output last,
 * tf_status return, scratch from the caller (sized by the *_get_buffer_size() companion).
 * The arithmetic is docs/engine.md; the Python reference (device_agent/engine) is the spec, bit for bit.
 * Layout: activations (C, H, W) int8 (batch 1), weights (C_out, C_in/groups, KH, KW) int8 per-output-channel,
 * error gradients int8 with one power-of-two exponent per tensor (real value g * 2^e). */
#ifndef TF_KERNELS_H
#define TF_KERNELS_H

#include "tf_types.h"

typedef struct {
    int32_t c, h, w; /* an activation or gradient tensor (C, H, W) */
} tf_dims;

typedef struct {
    int32_t n, c, h, w; /* a filter (C_out, C_in/groups, KH, KW) */
} tf_filter_dims;

typedef struct {
    void *buf; /* caller-owned scratch (from the plan's arena), may be NULL when size is 0 */
    int32_t size;
} tf_ctx;

typedef struct {
    int32_t stride_h, stride_w, pad_h, pad_w, groups;
    int32_t input_offset;  /* -zero_point(x) */
    int32_t output_offset; /* zero_point(y) */
    int32_t act_min, act_max;
} tf_conv_params;

typedef struct {
    const int32_t *mult;  /* (C_out,) requantization multipliers, qmath.quantize_multiplier */
    const int32_t *shift; /* (C_out,) right shifts in [1, 62] */
} tf_per_channel_quant;

/* ---- forward ---- */

/* CONV2D: y = clamp(requantize(b + sum (x - zx) w) + zy); optional mask of act_min <= pre <= act_max.
 * x (C_in, H, W) int8; w (C_out, C_in/groups, KH, KW) int8; bias (C_out,) int32 or NULL;
 * y (C_out, OH, OW) int8; mask ceil(C_out*OH*OW / 8) bytes or NULL. Needs no scratch. */
/* Shared shape check of the conv family: y = floor((x + 2 pad - K) / stride) + 1, groups divide channels. */
tf_status tf_conv_check(const tf_dims *x, const tf_filter_dims *w, const tf_dims *y, int32_t groups, int32_t stride_h,
                        int32_t stride_w, int32_t pad_h, int32_t pad_w);

tf_status tf_conv2d_s8(const tf_conv_params *p, const tf_per_channel_quant *q, const tf_dims *x_dims, const int8_t *x,
                       const tf_filter_dims *w_dims, const int8_t *w, const int32_t *bias, const tf_dims *y_dims,
                       int8_t *y, uint8_t *mask);

typedef struct {
    int32_t a_offset, b_offset; /* -zero_point(a), -zero_point(b) */
    int32_t mult_a, mult_b, shift;
    int32_t output_offset; /* zero_point(y) */
    int32_t act_min, act_max;
} tf_add_params;

/* ADD: y = clamp((((a-za) mult_a + (b-zb) mult_b + 2^(shift-1)) >> shift) + zy). a, b, y (n,) int8. */
tf_status tf_add_s8(const tf_add_params *p, int32_t n, const int8_t *a, const int8_t *b, int8_t *y, uint8_t *mask);

typedef struct {
    int32_t input_offset, output_offset, mult, shift;
} tf_avgpool_params;

/* AVGPOOL (global): y[c] = clamp_int8(requantize(sum_p (x[c,p] - zx)) + zy). x (C, H, W), y (C,). */
tf_status tf_avgpool_s8(const tf_avgpool_params *p, const tf_dims *x_dims, const int8_t *x, int8_t *y);

/* CLAMP: y = clamp(x, act_min, act_max), mask as CONV2D. x, y (n,) int8 (may alias). */
tf_status tf_clamp_s8(int32_t act_min, int32_t act_max, int32_t n, const int8_t *x, int8_t *y, uint8_t *mask);

typedef struct {
    int32_t input_offset;              /* -zero_point(x) */
    int32_t pw_act_min, pw_act_max;    /* clamp of the expanded channel */
    const int32_t *pw_mult, *pw_shift; /* (C_mid,) */
    int32_t mid_zero_point;            /* zero point of the expanded channel */
    int32_t dw_stride_h, dw_stride_w, dw_pad_h, dw_pad_w;
    int32_t dw_act_min, dw_act_max;
    const int32_t *dw_mult, *dw_shift; /* (C_out,) */
    int32_t output_offset;             /* zero_point(y) */
} tf_pwdw_params;

/* PWDW: CONV2D(1x1, pw) then depthwise CONV2D (groups = C_mid), one expanded channel at a time.
 * x (C_in, H, W); w_pw (C_mid, C_in, 1, 1), b_pw (C_mid,); w_dw (C_out, 1, KH, KW) with C_out a multiple of
 * C_mid, b_dw (C_out,); y (C_out, OH, OW). Scratch: H*W int8 (one expanded channel). No mask. */
int32_t tf_pwdw_get_buffer_size(const tf_dims *x_dims);
tf_status tf_pwdw_s8(const tf_ctx *ctx, const tf_pwdw_params *p, const tf_dims *x_dims, const int8_t *x,
                     const tf_filter_dims *pw_dims, const int8_t *w_pw, const int32_t *b_pw,
                     const tf_filter_dims *dw_dims, const int8_t *w_dw, const int32_t *b_dw, const tf_dims *y_dims,
                     int8_t *y);

#define TF_PATCH_MAX_LAYERS 16

/* PATCH layer table (device_agent/engine/patch.py): every array has one value per layer, in_a / in_b are refs
 * (0 = the op's input x, j + 1 = layer j), kind 0 = conv, 1 = add; mult / shift concatenate the conv layers'
 * per-output-channel arrays (n_channels values). */
typedef struct {
    int32_t n_layers, tiles_h, tiles_w, n_channels;
    int32_t input_offset; /* -zero_point(x) */
    const int32_t *kind, *in_a, *in_b, *stride_h, *stride_w, *pad_h, *pad_w, *groups, *act_min, *act_max;
    const int32_t *zero_point, *add_mult_a, *add_mult_b, *add_shift, *fused, *buf_off, *mult, *shift;
} tf_patch_params;

typedef struct {
    const int8_t *w[TF_PATCH_MAX_LAYERS];  /* conv layer l: (C_out, C_in/groups, KH, KW) int8; add: NULL */
    const int32_t *b[TF_PATCH_MAX_LAYERS]; /* (C_out,) int32 */
    tf_filter_dims wd[TF_PATCH_MAX_LAYERS];
} tf_patch_weights;

/* PATCH: the layers over tiles_h x tiles_w output tiles, halos recomputed; x (C, H, W) the op's input, y the last
 * layer's output. Same bytes as the unpatched ops. tf_patch_check validates the table and fills out (n_layers,)
 * with every layer's dims; tf_patch_get_buffer_size is the scratch it needs (the highest buf_off + one tile's
 * buffer, -1 when a needed buffer has no offset). */
tf_status tf_patch_check(const tf_patch_params *p, const tf_patch_weights *wt, const tf_dims *x_dims,
                         const tf_dims *y_dims, tf_dims *out);
int32_t tf_patch_get_buffer_size(const tf_patch_params *p, const tf_patch_weights *wt, const tf_dims *out);
tf_status tf_patch_s8(const tf_ctx *ctx, const tf_patch_params *p, const tf_patch_weights *wt, const tf_dims *x_dims,
                      const int8_t *x, const tf_dims *y_dims, int8_t *y);

/* EMBEDDING: y[d, 0, l] = table[ids[l], d]. ids (L,) int32 in [0, V), table (V, D) int8, y (D, 1, L). */
tf_status tf_embedding_s8(int32_t vocab, int32_t dim, int32_t length, const int32_t *ids, const int8_t *table,
                          int8_t *y);

/* ---- loss ---- */

typedef struct {
    int32_t p_label_q15; /* softmax probability of the label, Q15 (loss = -ln(p / 2^15), computed by the host) */
    int32_t correct;     /* argmax(logits) == label, first max wins */
} tf_ce_result;

/* SOFTMAX_CE: logits (K,) int8, exp_lut (256,) int32 -> g (K,) int8 with exponent *g_exp, and *res. */
tf_status tf_softmax_ce_s8(const int32_t *exp_lut, int32_t k, const int8_t *logits, int32_t label, int8_t *g,
                           int32_t *g_exp, tf_ce_result *res);

/* ---- backward ---- */

/* dyn_requant of an int32 buffer: acc (n,) * 2^exp -> g (n,) int8 * 2^(*g_exp). g may alias acc's bytes. */
tf_status tf_dyn_requant_s32(int32_t n, const int32_t *acc, int32_t exp, int8_t *g, int32_t *g_exp);

/* APPLY_MASK: g = g * mask, in place. mask bit-packed LSB first, g (n,) int8. */
tf_status tf_apply_mask_s8(int32_t n, const uint8_t *mask, int8_t *g);

/* GRAD_ACCUM: (g, e) = dyn_requant(rshift_round(g1, e-e1) + rshift_round(g2, e-e2), e), e = max(e1, e2).
 * g1, g2, g (n,) int8; g may alias g1 or g2. No scratch (two passes). */
tf_status tf_grad_accum_s8(int32_t n, const int8_t *g1, int32_t e1, const int8_t *g2, int32_t e2, int8_t *g,
                           int32_t *g_exp);

/* AVGPOOL_BWD: acc[c,h,w] = g_y[c] * inv_hw, dyn_requant(acc, e_y - 16). g_y (C,), g_x (C, H, W). */
tf_status tf_avgpool_bwd_s8(int32_t inv_hw, const tf_dims *gx_dims, const int8_t *g_y, int32_t e_y, int8_t *g_x,
                            int32_t *e_x);

typedef struct {
    int32_t stride_h, stride_w, pad_h, pad_w, groups;
    int32_t wscale_p; /* frexp exponent of max_c s_w[c] */
} tf_conv_bwd_params;

/* CONV2D_BWD_INPUT: g' = rshift_round(g_y[c] * wscale_q[c], 8); acc = conv_transpose(g', w);
 * (g_x, e_x) = dyn_requant(acc, e_y + wscale_p - 7).
 * g_y (C_out, OH, OW) int8; wscale_q (C_out,) int32; w (C_out, C_in/groups, KH, KW); g_x (C_in, H, W) int8.
 * 1x1 stride-1 and depthwise (any stride) convs: with int32 scratch for every g_x element
 * (tf_conv2d_bwd_input_fast_buffer_size, 4-byte aligned; for 1x1 it also holds g' and a weight block as int16
 * pairs behind the sums: the GEMM path) one pass; with less (4-byte aligned, at least one unit: a pixel chunk
 * of the 1x1 GEMM or one depthwise channel) the chunked path keeps the units that fit (int32, or packed to 16
 * bits exactly enough for the final rounding) and computes the others twice; without scratch two passes (max,
 * then write); g' of one pixel (<= 384 output channels per chunk) or one zero-stuffed channel plane (<= 400)
 * lives on the stack.
 * Other convs: int16 g' in scratch (tf_conv2d_bwd_input_get_buffer_size), with an extra int32 per g_x element
 * one pass, else two; no scratch at all: g' recomputed per term. Every path gives the same numbers. */
/* Scratch bytes of the one-pass 1x1 / depthwise path, or -1 when the conv takes the general path. */
int32_t tf_conv2d_bwd_input_fast_buffer_size(const tf_conv_bwd_params *p, const tf_filter_dims *w_dims,
                                             const tf_dims *gx_dims);
int32_t tf_conv2d_bwd_input_get_buffer_size(const tf_dims *gy_dims, const tf_dims *gx_dims, int one_pass);
tf_status tf_conv2d_bwd_input_s8(const tf_ctx *ctx, const tf_conv_bwd_params *p, const int32_t *wscale_q,
                                 const tf_dims *gy_dims, const int8_t *g_y, int32_t e_y, const tf_filter_dims *w_dims,
                                 const int8_t *w, const tf_dims *gx_dims, int8_t *g_x, int32_t *e_x);

/* ---- update ---- */

typedef struct {
    int32_t stride_h, stride_w, pad_h, pad_w, groups;
    int32_t k; /* input channels saved (the first k), weights of channels >= k stay */
    int32_t update_weight, update_bias;
    int32_t input_offset;              /* -zero_point(x) */
    int32_t lr_m, lr_e;                /* learning rate as qmath.mant_exp */
    uint32_t step;                     /* the device's update counter */
    uint32_t w_tensor_id, b_tensor_id; /* plan tensor ids, seeds of rng_u32 */
} tf_conv_update_params;

typedef struct {
    const int32_t *w_m, *w_e, *b_m, *b_e; /* (C_out,) QAS mantissas / exponents (qmath.mant_exp) */
} tf_qas;

/* CONV2D_UPDATE, per output channel compute, update, discard (docs/engine.md "Update").
 * g_y (C_out, OH, OW) int8 already masked, exponent e_y; x_saved (k, H, W) int8;
 * w (C_out, C_in/groups, KH, KW) int8 updated in place; b (C_out,) int32 updated in place (or NULL).
 * No scratch. */
tf_status tf_conv2d_update_s8(const tf_conv_update_params *p, const tf_qas *qas, const tf_dims *gy_dims,
                              const int8_t *g_y, int32_t e_y, const tf_dims *x_dims, const int8_t *x_saved,
                              const tf_filter_dims *w_dims, int8_t *w, int32_t *b);

/* Optimizer state of one CONV2D_UPDATE under a training recipe (docs/engine.md "Training recipe"): pointers into
 * the optimizer region, compact over the trained weights in C order of (c, j < k_c, kh, kw). */
typedef struct {
    int32_t beta_q15;  /* momentum in Q15, 0 none */
    int32_t frac_bits; /* 0 (stochastic rounding at the boundary), 8 or 16 */
    int32_t apply;     /* this sample ends a mini-batch: the parameters take v, then v decays */
    int32_t add;       /* 0 when the schedule factor is 0: no update is added this sample */
    int32_t *wbuf;     /* (trained weights,) int32 v, or NULL (B = 1 and no momentum: v is transient) */
    int32_t *bbuf;     /* (C_out,) int32 v of the biases, or NULL */
    void *frac;        /* (trained weights,) int8 (F = 8) / int16 (F = 16) residuals, or NULL */
} tf_recipe_state;

/* CONV2D_UPDATE under a recipe: the default update's sums, accumulated in fixed point and applied on the
 * mini-batch boundary. p->lr_m, p->lr_e: the scheduled per-sample rate; p->step seeds the F = 0 rounding.
 * Shapes as tf_conv2d_update_s8; w and b are written only when r->apply. No scratch. */
tf_status tf_conv2d_update_recipe_s8(const tf_conv_update_params *p, const tf_qas *qas, const tf_recipe_state *r,
                                     const tf_dims *gy_dims, const int8_t *g_y, int32_t e_y, const tf_dims *x_dims,
                                     const int8_t *x_saved, const tf_filter_dims *w_dims, int8_t *w, int32_t *b);

typedef struct {
    int32_t qas_m, qas_e; /* 1 / s_table as qmath.mant_exp */
    int32_t lr_m, lr_e;
    uint32_t step, table_tensor_id;
} tf_embedding_update_params;

/* EMBEDDING_UPDATE: acc[ids[l], :] += g_y[:, 0, l]; table -= scaled_update(acc) on the looked-up rows.
 * g_y (D, 1, L) int8 with exponent e_y; ids (L,); table (V, D) int8 updated in place. */
tf_status tf_embedding_update_s8(const tf_embedding_update_params *p, int32_t vocab, int32_t dim, int32_t length,
                                 const int8_t *g_y, int32_t e_y, const int32_t *ids, int8_t *table);

#endif /* TF_KERNELS_H */
