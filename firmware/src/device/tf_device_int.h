/* Internals shared by the device's files (src/device/): small helpers and the sample-slot address; not an API. */
#ifndef TF_DEVICE_INT_H
#define TF_DEVICE_INT_H

#include "tf_device.h"
#include "tf_frame.h"

#define ALIGN_STORE 64u

static inline uint32_t tf_al(uint32_t n, uint32_t a) { return (n + a - 1) / a * a; } /* n <= 2^32 - a only */

/* n bytes fit at `at` in a region ending at `end`: overflow-safe (at <= end first, then n <= end - at). */
static inline int tf_fits(uint32_t at, uint32_t n, uint32_t end) { return at <= end && n <= end - at; }

static inline tf_dev_result tf_res(uint8_t st, uint32_t detail) {
    tf_dev_result r = {st, detail};
    return r;
}

/* TRAIN / TRAIN_LIST / PERSONALIZE: the learning rate's checks (tf_device_train.c) */
tf_dev_result tf_device_check_lr(const tf_device *d, int32_t lr_m, int32_t lr_e);

/* shared = trainable and not personal: carried by model updates, sent in deltas */
static inline int tf_is_shared(const tf_tensor_info *t) { return t->kind == TF_K_TRAINABLE && !(t->flags & 1u); }

/* slot < sample_cap, and sample_cap * sample_bytes <= store_size - samples_at (layout_after_plan) */
static inline uint8_t *tf_sample_slot(tf_device *d, uint32_t slot) {
    return d->store + d->samples_at + slot * d->sample_bytes;
}

#endif /* TF_DEVICE_INT_H */
