/* Host stand-in for the board services (tf_board.h), so the protocol and self-test run in host tests.
 * Output goes to a test-installed sink; there is no UART, MPU or SysTick here. */
#include <stdlib.h>

#include "tf_board.h"

static uint8_t host_arena[64 * 1024];
static uint64_t host_ticks;

void tf_board_init(void) {}
int tf_board_getc(void) { return -1; }
void tf_board_idle(void) {}
void tf_board_write(const uint8_t *buf, uint32_t n) {
    (void)buf;
    (void)n;
}
uint64_t tf_board_ticks(void) { return host_ticks++; }
uint32_t tf_board_tick_hz(void) { return 1; }
uint64_t tf_board_ticks_aligned(void) { return host_ticks++; }
uint32_t tf_board_stack_unused(void) { return 0; }
uint32_t tf_board_stack_size(void) { return 0; }
uint8_t *tf_board_arena(uint32_t *size) {
    *size = sizeof(host_arena);
    return host_arena;
}
static uint32_t host_store[64 * 1024];
uint8_t *tf_board_store(uint32_t *size) {
    *size = sizeof(host_store);
    return (uint8_t *)host_store;
}
uint32_t tf_board_static_ram(void) { return 0; }
uint32_t tf_board_ram_size(void) { return 0; }
uint32_t tf_board_flash_used(void) { return 0; }
uint32_t tf_board_cpuid(void) { return 0; }
void tf_board_fault(uint32_t exception) {
    (void)exception;
    abort();
}
