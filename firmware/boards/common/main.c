/* Board main loop: feed UART bytes to the protocol, sleep when idle. */
#include <stddef.h>

#include "tf_board.h"
#include "tf_device.h"
#include "tf_proto.h"
#include "tf_wire.h"

extern const uint8_t __key_slot[]; /* the linker script: the last TF_KEY_SLOT_BYTES of the flash budget */

static void write_cb(const uint8_t *buf, uint32_t n) { tf_board_write(buf, n); }

int main(void) {
    tf_board_init();
    static tf_proto proto;
    static tf_device device;
    uint32_t store_size = 0, pool_size = 0;
    uint8_t *store = tf_board_store(&store_size);
    uint8_t *pool = tf_board_arena(&pool_size);
    /* The signature policy from the key slot in flash (Ed25519 fleet key or HMAC key; erased: "unsigned only",
     * as emulated fleets and tests run; damaged: every blob refused). */
    tf_verify verify;
    (void)tf_key_slot_read(__key_slot, TF_KEY_SLOT_BYTES, &verify);
    tf_device_init(&device, store, store_size, pool, pool_size, &verify);
    (void)tf_device_boot(&device); /* a plan provisioned in the flash image, if any (else LOAD_PLAN brings one) */
    tf_proto_init(&proto, write_cb);
    tf_proto_set_device(&proto, &device);
    for (;;) {
        int b = tf_board_getc();
        if (b < 0) {
            tf_board_idle();
            continue;
        }
        tf_proto_feed(&proto, (uint8_t)b);
    }
}
