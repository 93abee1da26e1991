/* Kernel self-test over the generated golden vectors: run every case, compare every output byte.
 * Linked into the host test binary and into the board firmware (the SELFTEST command). */
#ifndef TF_SELFTEST_H
#define TF_SELFTEST_H

#include <stdint.h>

typedef struct {
    int32_t cases, passed;
    int32_t first_failed; /* index of the first failing case, -1 if none */
    uint32_t crc32;       /* CRC-32 over all computed outputs, in case order: one number to compare */
} tf_selftest_result;

/* log: called with one line per failure (and per case when verbose); may be NULL.
 * work: scratch of at least TF_SELFTEST_WORK_BYTES (outputs and kernel scratch). */
#define TF_SELFTEST_WORK_BYTES (48 * 1024)
void tf_selftest_run(uint8_t *work, uint32_t work_size, void (*log)(const char *line), int verbose,
                     tf_selftest_result *res);
int32_t tf_selftest_case_count(void);

#endif /* TF_SELFTEST_H */
