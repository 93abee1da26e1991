/* Reset and vector table for the mps2 boards: copy .data, zero .bss, paint the stack, jump to main.
 * Faults (incl. a stack overflow into the MPU guard) move SP to a safe place and report over UART0. */
#include <stdint.h>

#include "tf_board.h"

extern uint32_t __data_start, __data_end, __data_load, __bss_start, __bss_end;
extern uint32_t __stack_top, __stack_limit;

int main(void);
void tf_reset_handler(void);
void tf_fault_entry(void);
void tf_default_handler(void);
void tf_uart0_rx_handler(void);
void tf_systick_handler(void);

__attribute__((naked, noreturn)) void tf_reset_handler(void) {
    /* NOTE: naked + asm so nothing touches the stack before it is painted. */
    __asm__ volatile("ldr r0, =__data_start\n ldr r1, =__data_end\n ldr r2, =__data_load\n"
                     "1: cmp r0, r1\n bhs 2f\n ldr r3, [r2], #4\n str r3, [r0], #4\n b 1b\n"
                     "2: ldr r0, =__bss_start\n ldr r1, =__bss_end\n movs r3, #0\n"
                     "3: cmp r0, r1\n bhs 4f\n str r3, [r0], #4\n b 3b\n"
                     "4: ldr r0, =__stack_limit\n mov r1, sp\n ldr r3, =0x5AFEC0DE\n"
                     "5: cmp r0, r1\n bhs 6f\n str r3, [r0], #4\n b 5b\n"
                     "6: bl main\n"
                     "7: b 7b\n");
}

/* A fault may come from a stack overflow: reset SP to the top before any C code runs. */
__attribute__((naked, noreturn)) void tf_fault_entry(void) {
    __asm__ volatile("mrs r0, ipsr\n"
                     "ldr r1, =__stack_top\n mov sp, r1\n"
                     "b tf_board_fault\n");
}

void tf_default_handler(void) { tf_board_fault(0xFF); }

typedef void (*tf_vector)(void);

/* Cortex-M core vectors, then mps2 IRQs: UART0 RX is IRQ 0, UART0 TX IRQ 1. */
__attribute__((section(".vectors"), used)) const tf_vector tf_vectors[16 + 32] = {
    (tf_vector)(uintptr_t)&__stack_top,
    tf_reset_handler,
    tf_fault_entry, /* NMI */
    tf_fault_entry, /* HardFault */
    tf_fault_entry, /* MemManage (MPU stack guard) */
    tf_fault_entry, /* BusFault */
    tf_fault_entry, /* UsageFault */
    0,
    0,
    0,
    0,
    tf_default_handler, /* SVCall */
    tf_default_handler, /* DebugMon */
    0,
    tf_default_handler, /* PendSV */
    tf_systick_handler,
    tf_uart0_rx_handler, /* IRQ 0: UART0 RX */
    [17 ... 47] = tf_default_handler,
};
