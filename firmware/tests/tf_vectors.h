/* Types of the generated golden vectors (tests/firmware/gen_kernel_vectors.py writes kernel_vectors.h). */
#ifndef TF_VECTORS_H
#define TF_VECTORS_H

#include <stdint.h>

typedef struct {
    const char *name;
    const void *data; /* little-endian values of the buffer's dtype, 8-byte aligned */
    int32_t nbytes;
} tf_vec_buf;

typedef struct {
    const char *name;
    int32_t op; /* ir.OpType value, or a self-test atom id >= 100 */
    int32_t n_params;
    const int32_t *params;
    int32_t n_bufs;
    const tf_vec_buf *bufs; /* inputs, then expected outputs (order per op: see selftest.c) */
} tf_vec_case;

#endif /* TF_VECTORS_H */
