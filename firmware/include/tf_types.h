/* Common types of the TinyFleet firmware: status codes, fixed-width ints, small helpers.
 * Refuses anything platform specific (board code lives in boards/). */
#ifndef TF_TYPES_H
#define TF_TYPES_H

#include <stddef.h>
#include <stdint.h>

/* Every kernel returns one of these; 0 is success. (Format readers return the wire error codes of
 * device_agent/wire/errors.py instead: tf_wire.h.) */
typedef enum {
    TF_OK = 0,
    TF_ERR_ARG = 1,      /* a NULL pointer or a parameter outside its documented range */
    TF_ERR_SHAPE = 2,    /* dimensions inconsistent (e.g. groups do not divide channels) */
    TF_ERR_SCRATCH = 3,  /* caller's scratch smaller than *_get_buffer_size() */
    TF_ERR_OVERFLOW = 4, /* an int32 accumulator bound of this kernel would be exceeded */
} tf_status;

/* NOTE: C99 leaves >> of negative values implementation-defined; gcc and clang (our only compilers) shift
 * arithmetically, which the spec (numpy >>) requires. Left shifts of negatives are UB: we multiply instead. */
#define TF_POW2_I64(n) ((int64_t)1 << (n))

static inline int32_t tf_clamp_i32(int64_t v, int32_t lo, int32_t hi) {
    return v < lo ? lo : (v > hi ? hi : (int32_t)v);
}

/* Bit-packed mask, LSB first: bit i lives in byte i/8 at position i%8 (numpy packbits(bitorder="little")). */
static inline void tf_mask_put(uint8_t *mask, int32_t i, int on) {
    uint8_t bit = (uint8_t)(1u << (i & 7));
    if (on) {
        mask[i >> 3] |= bit;
    } else {
        mask[i >> 3] &= (uint8_t)~bit;
    }
}

static inline int tf_mask_get(const uint8_t *mask, int32_t i) { return (mask[i >> 3] >> (i & 7)) & 1; }

#endif /* TF_TYPES_H */
