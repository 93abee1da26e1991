/* Host test binary: runs the kernel self-test over the golden vectors and exits non-zero on any mismatch. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "selftest.h"

static uint8_t work[TF_SELFTEST_WORK_BYTES];

static void log_line(const char *line) { printf("%s\n", line); }

int main(int argc, char **argv) {
    int verbose = argc > 1 && strcmp(argv[1], "-v") == 0;
    tf_selftest_result res;
    tf_selftest_run(work, sizeof(work), log_line, verbose, &res);
    printf("kernel vectors: %d/%d passed, crc32 %08x\n", (int)res.passed, (int)res.cases, (unsigned)res.crc32);
    return res.passed == res.cases ? EXIT_SUCCESS : EXIT_FAILURE;
}
