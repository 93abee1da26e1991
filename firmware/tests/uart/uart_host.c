/* The board's UART side on the host, for sanitizer tests (tests/firmware/test_uart_host_asan.py): line bytes from
 * stdin go through tf_proto_feed into a device whose plan store is one malloc of exactly STORE bytes (so ASan sees
 * any write past it, where a real board keeps its key slot); the board's frames go to stdout. Test code only.
 *
 * usage: uart_host [STORE_BYTES]   (default 65536; the SRAM pool is 64 KB, unsigned blobs only) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "tf_device.h"
#include "tf_proto.h"

static void on_write(const uint8_t *buf, uint32_t n) {
    if (fwrite(buf, 1, n, stdout) != n) {
        exit(3);
    }
}

int main(int argc, char **argv) {
    const unsigned long store_size = argc > 1 ? strtoul(argv[1], NULL, 0) : 65536ul;
    if (store_size < 64 || store_size > (1ul << 26)) {
        fprintf(stderr, "usage: uart_host [STORE_BYTES in 64..2^26]\n");
        return 2;
    }
    /* NOTE: exactly store_size bytes, so the first byte past the store is ASan's redzone; malloc's 16-byte
     * alignment covers the plan's in-place reads (int32 data at 4-byte offsets) */
    uint8_t *store = (uint8_t *)malloc(store_size);
    uint8_t *pool = (uint8_t *)malloc(64 * 1024);
    static tf_device dev;
    static tf_proto proto;
    const tf_verify unsigned_only = {0, NULL, 0};
    if (!store || !pool) {
        return 2;
    }
    tf_device_init(&dev, store, (uint32_t)store_size, pool, 64 * 1024, &unsigned_only);
    tf_proto_init(&proto, on_write);
    tf_proto_set_device(&proto, &dev);
    int c;
    while ((c = getchar()) != EOF) {
        tf_proto_feed(&proto, (uint8_t)c);
    }
    fflush(stdout);
    free(store);
    free(pool);
    return 0;
}
