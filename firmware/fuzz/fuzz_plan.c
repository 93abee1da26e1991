/* libFuzzer target: the strict plan reader (tf_plan_read) and what consumes an accepted plan (every accessor of
 * tf_wire.h, the runtime's prepare step, then two training steps when the plan is small enough to run in
 * microseconds), under ASan/UBSan. Each input runs as given under both signature policies, then resealed (own
 * length, fresh CRC, unsigned) so mutated bodies reach the body checks. */
#include <stddef.h>
#include <stdint.h>

#include "fuzz_util.h"
#include "tf_runtime.h"

static _Alignas(
    8) uint8_t pool[512 * 1024]; /* above any MCU's SRAM (stm32f746: 320 KiB): every arena a device could hold */
static tf_runtime rt;
static uint8_t sample[sizeof(pool)];

/* Work bound of one step: per op (sum of its tensors' elements)^2 bounds any product of two of them (conv: y x w,
 * backward and update: g x w, g x x); PATCH times its tiles and layers, its scratch counted. Steps run only below
 * STEP_BUDGET (~50x the real multiply-adds on the test plans: the PATCH plan, 7.6e8, steps in ~15 ms under ASan),
 * so a plan of big tensors costs a prepare, never a libFuzzer timeout. */
#define STEP_BUDGET 1000000000u
static int small_enough(const tf_plan *p) {
    uint64_t work = 0;
    uint32_t off = p->ops_off;
    for (uint32_t i = 0; i < p->n_ops; i++) {
        tf_op_view op;
        tf_plan_op(p, off, &op);
        off += op.size;
        uint64_t t = 0;
        for (uint32_t k = 0; k < (uint32_t)op.n_in + op.n_out; k++) {
            tf_tensor_info ti;
            if (op.ids[k] < 0) {
                continue; /* CONV2D_UPDATE without its input (bias only) */
            }
            tf_plan_tensor(p, op.ids[k], &ti);
            t += (uint64_t)ti.numel;
        }
        if (rt.scratch[i] >= 0) {
            tf_tensor_info ti;
            tf_plan_tensor(p, rt.scratch[i], &ti);
            t += ti.nbytes;
        }
        if (t > STEP_BUDGET) {
            return 0;
        }
        uint64_t w = t * t;
        if (op.type == TF_OP_PATCH) {
            const int32_t *at = op.attrs; /* tiles_h, tiles_w, then the kind array (count first): all checked */
            const uint64_t f = (uint64_t)(uint32_t)at[0] * (uint32_t)at[1];
            if (f > STEP_BUDGET) {
                return 0;
            }
            w *= f * (uint32_t)at[2];
        }
        work += w;
        if (work > STEP_BUDGET) {
            return 0;
        }
    }
    return 1;
}

/* Two steps on a sample made of the input's bytes (labels 0 and 1; int32 ids 0..7): exec paths with the plan's
 * attributes. */
static void train(const uint8_t *blob, size_t n) {
    tf_tensor_info tin;
    tf_plan_tensor(&rt.plan, rt.plan.input_id, &tin);
    if (rt.plan.label_id < 0 || !small_enough(&rt.plan) || tin.nbytes > sizeof(sample)) {
        return;
    }
    for (uint32_t i = 0; i < tin.nbytes; i++) {
        sample[i] = blob[(i * 7u) % n];
        if (tin.dtype == TF_DT_INT32) { /* token ids: small, so most are in the table */
            sample[i] = (i & 3) ? 0 : sample[i] & 7;
        }
    }
    for (int32_t s = 0; s < 2; s++) {
        tf_step_result r;
        if (tf_runtime_step(&rt, sample, rt.n_classes > 1 ? s : 0, 16384 + s, -12 - s, &r) != TF_RT_OK) {
            return;
        }
    }
}

/* Touch every byte the accessors hand out: any read the reader did not bound shows up under ASan. */
static uint32_t walk(const tf_plan *p) {
    uint32_t sum = 0;
    for (uint32_t i = 0; i < p->n_tensors; i++) {
        tf_tensor_info t;
        tf_plan_tensor(p, (int32_t)i, &t);
        for (uint32_t k = 0; k < t.n_scales; k++) {
            sum += p->blob[t.scales_off + 4 * k];
        }
        if (t.data_len) {
            sum += p->blob[t.data_off] + p->blob[t.data_off + t.data_len - 1];
        }
    }
    uint32_t off = p->ops_off;
    for (uint32_t i = 0; i < p->n_ops; i++) {
        tf_op_view op;
        tf_plan_op(p, off, &op);
        const uint8_t *end = p->blob + off + op.size;
        for (const uint8_t *q = (const uint8_t *)op.ids; q < end; q++) {
            sum += *q;
        }
        off += op.size;
    }
    for (uint32_t i = 0; i < 2 + p->n_tensors + p->n_ops; i++) {
        uint32_t len = 0;
        const char *s = tf_plan_string(p, i, &len);
        for (uint32_t k = 0; k < len; k++) {
            sum += (uint8_t)s[k];
        }
    }
    return sum;
}

static void check(const uint8_t *blob, size_t n, const tf_verify *v) {
    tf_plan plan;
    int e = tf_plan_read(blob, (uint32_t)n, v, &plan);
    if (e < 0 || e > TF_WE_PLAN_MISMATCH) {
        __builtin_trap(); /* a code outside errors.WireError */
    }
    if (e == TF_WE_OK) {
        volatile uint32_t s = walk(&plan);
        (void)s;
        (void)tf_runtime_pool_need(&plan);
        if (tf_runtime_load(&rt, &plan, pool, sizeof(pool), 1) == TF_RT_OK) {
            train(blob, n);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n) {
    uint8_t *b = tf_fuzz_copy(data, n);
    const tf_verify unsigned_only = {0, NULL, 0}, hmac = {2, TF_FUZZ_HMAC_KEY, sizeof(TF_FUZZ_HMAC_KEY)},
                    ed25519 = {1, TF_FUZZ_ED25519_PUB, sizeof(TF_FUZZ_ED25519_PUB)};
    check(b, n, &unsigned_only);
    check(b, n, &hmac);
    check(b, n, &ed25519);
    if (tf_fuzz_reseal(b, n)) {
        check(b, n, &unsigned_only);
    }
    free(b);
    return 0;
}
