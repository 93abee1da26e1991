/* The firmware's training runtime as a host shared library (libtinyfleet_native.so), for Python's native
 * engine (device_agent/native.py): the same C the boards run, driven through a handle per device. A handle
 * owns a 4-byte aligned copy of the plan blob and one pool (arena + trainable copies) from malloc; this file
 * is the only place of the library that allocates, and it refuses nothing the board runtime accepts. */
#include <stdlib.h>
#include <string.h>

#include "tf_runtime.h"

#ifndef TF_NATIVE_BUILD_ID
#error "TF_NATIVE_BUILD_ID: the hash of the sources this library is built from (boards/host/native.mk)"
#endif

/* What the library was built from (boards/host/native.mk): native.py refuses a library whose id differs from its
 * source tree's, instead of failing later on a plan the older code reads differently. */
const char *tf_native_build_id(void) { return TF_NATIVE_BUILD_ID; }

typedef struct {
    tf_runtime rt;
    uint8_t *blob;
    uint8_t *pool;
} tf_native;

/* Open a plan blob (unsigned envelope, as plan_to_bytes writes it). NULL on error; *err = wire error
 * (1..99) or 100 + runtime load error, *err_op = the op the runtime refused. */
tf_native *tf_native_open(const uint8_t *blob, uint32_t n, int32_t *err, int32_t *err_op) {
    *err = 0;
    *err_op = -1;
    tf_native *h = (tf_native *)calloc(1, sizeof(tf_native));
    if (!h) {
        *err = 200;
        return NULL;
    }
    h->blob = (uint8_t *)malloc(n ? n : 1); /* malloc is at least 8-byte aligned: the reader wants 4 */
    if (!h->blob) {
        free(h);
        *err = 200;
        return NULL;
    }
    memcpy(h->blob, blob, n);
    const tf_verify unsigned_only = {0, NULL, 0};
    tf_plan plan;
    int e = tf_plan_read(h->blob, n, &unsigned_only, &plan);
    if (!e) {
        const uint32_t need = tf_runtime_pool_need(&plan);
        h->pool = (uint8_t *)malloc(need ? need : 1);
        e = h->pool ? tf_runtime_load(&h->rt, &plan, h->pool, need, 1) + 100 : 200;
        if (e == 100) {
            return h;
        }
        *err_op = h->rt.err_op;
    }
    *err = e;
    free(h->pool);
    free(h->blob);
    free(h);
    return NULL;
}

void tf_native_close(tf_native *h) {
    if (h) {
        free(h->pool);
        free(h->blob);
        free(h);
    }
}

/* n training steps at batch 1: sample i at samples + i * sample_bytes, label labels[i], one learning rate.
 * Returns 0 or the runtime error of the failing step; *done = steps completed; per completed step i,
 * correct[i] (prediction before the update) and p_q15[i] (softmax probability of the label, Q15). */
int tf_native_steps(tf_native *h, const uint8_t *samples, uint32_t sample_bytes, const int32_t *labels, uint32_t n,
                    int32_t lr_m, int32_t lr_e, uint32_t *done, int32_t *correct, int32_t *p_q15) {
    *done = 0;
    for (uint32_t i = 0; i < n; i++) {
        tf_step_result r;
        const int e = tf_runtime_step(&h->rt, samples + (size_t)i * sample_bytes, labels[i], lr_m, lr_e, &r);
        if (e) {
            return e;
        }
        correct[i] = r.correct;
        p_q15[i] = r.p_label_q15;
        *done += 1;
    }
    return 0;
}

/* Copy a TRAINABLE tensor's bytes out (write = 0) or in (write = 1); -1 if id is not trainable or n differs. */
int tf_native_tensor(tf_native *h, int32_t id, uint8_t *buf, uint32_t n, int write) {
    if (id < 0 || (uint32_t)id >= h->rt.plan.n_tensors) {
        return -1;
    }
    tf_tensor_info t;
    tf_plan_tensor(&h->rt.plan, id, &t);
    if (t.kind != TF_K_TRAINABLE || t.nbytes != n || !h->rt.ptr[id]) {
        return -1;
    }
    if (write) {
        memcpy(h->rt.ptr[id], buf, n);
    } else {
        memcpy(buf, h->rt.ptr[id], n);
    }
    return 0;
}

uint32_t tf_native_get_step(const tf_native *h) { return h->rt.step; }
void tf_native_set_step(tf_native *h, uint32_t step) { h->rt.step = step; }
void tf_native_state_hash(const tf_native *h, uint8_t out[32]) { tf_runtime_state_hash(&h->rt, out); }
int32_t tf_native_err_op(const tf_native *h) { return h->rt.err_op; }

/* The recipe's state (plan v2 RECIPE): samples accumulated since the last applied update, and the optimizer
 * region (copied out; n must be its size). A new model version resets both, as on a board. */
uint32_t tf_native_get_pending(const tf_native *h) { return h->rt.pending; }
void tf_native_set_pending(tf_native *h, uint32_t pending) { h->rt.pending = pending; }
void tf_native_reset_optimizer(tf_native *h) { tf_runtime_reset_optimizer(&h->rt); }
int tf_native_optimizer(const tf_native *h, uint8_t *buf, uint32_t n) {
    if (n != h->rt.plan.opt_bytes || (n && !h->rt.opt)) {
        return -1;
    }
    if (n) {
        memcpy(buf, h->rt.opt, n);
    }
    return 0;
}
