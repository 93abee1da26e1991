/* Board main loop: feed UART bytes to the protocol, sleep when idle. */
#include "tf_board.h"
#include "tf_proto.h"

static void write_cb(const uint8_t *buf, uint32_t n) { tf_board_write(buf, n); }

int main(void) {
    tf_board_init();
    static tf_proto proto;
    tf_proto_init(&proto, write_cb);
    for (;;) {
        int b = tf_board_getc();
        if (b < 0) {
            tf_board_idle();
            continue;
        }
        tf_proto_feed(&proto, (uint8_t)b);
    }
}
