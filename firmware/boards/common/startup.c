/* Reset and vector table every Cortex-M port shares: copy .data, zero .bss, paint the stack, jump to main. Faults
 * (incl. a stack overflow into the MPU guard) move SP to the stack top and report through tf_board_fault. The
 * board's interrupts come from the tf_board_irqs.h on its include path: TF_N_IRQ, and TF_IRQ_VECTORS for those it
 * handles (the rest go to the default handler); a board without one does not build. The linker script provides
 * the symbols the asm names. */
#include <stdint.h>

#include "tf_board.h"
#include "tf_board_irqs.h"

extern uint32_t __stack_top;

int main(void);
void tf_reset_handler(void);
void tf_fault_entry(void);
void tf_default_handler(void);

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

/* The Cortex-M core's 16 entries, then the board's TF_N_IRQ interrupts. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Woverride-init" /* NOTE: the board's handlers override the default on purpose */
__attribute__((section(".vectors"), used)) const tf_vector tf_vectors[16 + TF_N_IRQ] = {
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
    [16 ... 16 + TF_N_IRQ - 1] = tf_default_handler,
    TF_IRQ_VECTORS,
};
#pragma GCC diagnostic pop
