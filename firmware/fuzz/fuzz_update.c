/* libFuzzer target: the board's model update reader (TFUP v1, tf_update_read_only in src/wire/tf_update_read.c) under
 * ASan/UBSan, under both signature policies and resealed (own length, fresh CRC, unsigned) so mutated bodies
 * reach the record checks. */
#include <stddef.h>
#include <stdint.h>

#include "fuzz_util.h"
#include "tf_device.h"

static void check(const uint8_t *blob, size_t n, const tf_verify *v) {
    int e = tf_update_read_only(blob, (uint32_t)n, v);
    if (e < 0 || e > TF_WE_PLAN_MISMATCH) {
        __builtin_trap(); /* a code outside errors.WireError */
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
