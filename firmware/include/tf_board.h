/* Board services the portable firmware needs: UART bytes, a tick counter, memory facts. One implementation per
 * board directory: boards/qemu-mps2/board.c, boards/host/board_host.c (host tests). */
#ifndef TF_BOARD_H
#define TF_BOARD_H

#include <stdint.h>

void tf_board_init(void);
/* Next received byte (0..255), or -1 when none is buffered. Never blocks. */
int tf_board_getc(void);
/* Sleep (WFI) until an interrupt arrives if no byte is buffered. */
void tf_board_idle(void);
void tf_board_write(const uint8_t *buf, uint32_t n);
/* Free-running SysTick count of the core clock (25 MHz on mps2; with -icount shift=0, 1 tick = 40 insns). */
uint64_t tf_board_ticks(void);
uint32_t tf_board_tick_hz(void);
/* tf_board_ticks() read right after the counter steps: start a measurement with it and the count is exact
 * (not +-1 tick) under -icount, whatever the phase after sleeping. */
uint64_t tf_board_ticks_aligned(void);
/* Bytes of stack never touched since reset (painted stack); stack size. */
uint32_t tf_board_stack_unused(void);
uint32_t tf_board_stack_size(void);
/* The arena: all SRAM between .bss and the stack guard. */
uint8_t *tf_board_arena(uint32_t *size);
/* The plan store: flash-like memory after the firmware (plans and model updates are used in place from it). */
uint8_t *tf_board_store(uint32_t *size);
uint32_t tf_board_static_ram(void); /* .data + .bss bytes */
uint32_t tf_board_ram_size(void);   /* the SRAM budget the linker script enforces */
uint32_t tf_board_flash_used(void);
uint32_t tf_board_cpuid(void);
__attribute__((noreturn)) void tf_board_fault(uint32_t exception);

#endif /* TF_BOARD_H */
