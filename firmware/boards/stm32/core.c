/* STM32 board services shared by the F4 and F7 ports: SysTick extended to 64 bits (or the DWT cycle counter
 * where the core has a running one), the MPU stack guard, painted-stack high-water and the memory facts from the
 * linker script. The clock tree and the USART registers are per family (usart_f4.c, usart_f7.c), the USART's
 * receive ring and transmit loop are usart.c. */
#include "stm32.h"
#include "tf_proto.h"

extern uint32_t __stack_limit, __stack_top, __guard_start, __arena_start, __arena_end;
extern uint32_t __data_start, __bss_end, __flash_start, __flash_end, __store_start, __store_end, __ram_size;

static volatile uint32_t tick_wraps;
static volatile uint32_t cyc_hi, cyc_last; /* DWT: 64-bit extension, advanced at least every SysTick wrap */
static int use_dwt;
volatile uint32_t fault_exception; /* IPSR of the last fault, for a debugger */

void tf_stm32_dsb_isb(void) { __asm__ volatile("dsb\n isb" ::: "memory"); }

int tf_stm32_wait_set(volatile uint32_t *reg, uint32_t mask, uint32_t want) {
    for (uint32_t i = 0; i < 100000u; i++) {
        if ((*reg & mask) == want) {
            return 1;
        }
    }
    return 0;
}

static void cyc_extend(void) {
    const uint32_t now = DWT_CYCCNT;
    if (now < cyc_last) {
        cyc_hi++;
    }
    cyc_last = now;
}

void tf_systick_handler(void) {
    tick_wraps++;
    if (use_dwt) {
        cyc_extend(); /* a wrap period of 2^24 cycles is far below the 2^32 of CYCCNT: no wrap is missed */
    }
}

static void mpu_guard(void) {
    /* Region 0: the 1 KB below the stack, no access, execute never. Privileged code keeps the default map. */
    MPU_RNR = 0;
    MPU_RBAR = (uint32_t)&__guard_start;
    MPU_RASR = (1u << 28) | (0u << 24) | (9u << 1) | 1u; /* XN, AP=none, SIZE=2^(9+1), enable */
    MPU_CTRL = (1u << 2) | 1u;                           /* PRIVDEFENA | ENABLE */
    SCB_SHCSR |= 1u << 16;                               /* MemManage fault enabled */
    tf_stm32_dsb_isb();
}

/* DWT CYCCNT (Cortex-M7: unlock the DWT first). An emulator that does not model DWT leaves it at zero: then the
 * ticks come from SysTick (same core clock, 24-bit counter extended by its interrupt). */
static int dwt_start(void) {
    DEMCR |= 1u << 24; /* TRCENA */
    DWT_LAR = 0xC5ACCE55u;
    DWT_CYCCNT = 0;
    DWT_CTRL |= 1u;
    for (volatile int i = 0; i < 16; i++) {
    }
    return DWT_CYCCNT != 0;
}

void tf_stm32_core_init(void) {
    SCB_VTOR = (uint32_t)&__flash_start; /* the vector table heads the flash (booted through its alias at 0) */
#ifndef TF_NO_MPU
    mpu_guard();
#else
    (void)mpu_guard;
#endif
#ifdef TF_STM32_DWT
    use_dwt = dwt_start();
    cyc_last = DWT_CYCCNT;
#else
    (void)dwt_start;
#endif
    SYST_RVR = 0x00FFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 7u; /* core clock, interrupt on wrap, enable */
}

int tf_stm32_dwt_running(void) { return use_dwt; }

uint64_t tf_board_ticks(void) {
    if (use_dwt) {
        uint32_t hi, lo;
        __asm__ volatile("cpsid i" ::: "memory");
        cyc_extend();
        hi = cyc_hi;
        lo = cyc_last;
        __asm__ volatile("cpsie i" ::: "memory");
        return ((uint64_t)hi << 32) | lo;
    }
    uint32_t hi, lo;
    do {
        hi = tick_wraps;
        lo = SYST_CVR;
    } while (hi != tick_wraps);
    return ((uint64_t)hi << 24) + (0x00FFFFFFu - lo);
}

uint32_t tf_board_tick_hz(void) { return TF_STM32_SYSCLK_HZ; }

uint64_t tf_board_ticks_aligned(void) {
    if (use_dwt) {
        return tf_board_ticks(); /* a cycle counter has no phase to align to */
    }
    const uint32_t v0 = SYST_CVR;
    while (SYST_CVR == v0) {
    }
    return tf_board_ticks();
}

uint32_t tf_board_stack_unused(void) {
    const uint32_t *p = &__stack_limit;
    while (p < &__stack_top && *p == TF_STACK_PAINT) {
        p++;
    }
    return (uint32_t)((uintptr_t)p - (uintptr_t)&__stack_limit);
}

uint32_t tf_board_stack_size(void) { return (uint32_t)((uintptr_t)&__stack_top - (uintptr_t)&__stack_limit); }

uint8_t *tf_board_arena(uint32_t *size) {
    *size = (uint32_t)((uintptr_t)&__arena_end - (uintptr_t)&__arena_start);
    return (uint8_t *)&__arena_start;
}

uint8_t *tf_board_store(uint32_t *size) {
    *size = (uint32_t)((uintptr_t)&__store_end - (uintptr_t)&__store_start);
    return (uint8_t *)&__store_start;
}

uint32_t tf_board_static_ram(void) { return (uint32_t)((uintptr_t)&__bss_end - (uintptr_t)&__data_start); }
uint32_t tf_board_ram_size(void) { return (uint32_t)(uintptr_t)&__ram_size; }
uint32_t tf_board_flash_used(void) { return (uint32_t)((uintptr_t)&__flash_end - (uintptr_t)&__flash_start); }
uint32_t tf_board_cpuid(void) { return SCB_CPUID; }

/* Entered with SP reset to the stack top (boards/common/startup.c): report ERR_INTERNAL on the USART, then halt. */
void tf_board_fault(uint32_t exception) {
    __asm__ volatile("cpsid i" ::: "memory");
    fault_exception = exception;
    tf_proto_write_status(tf_board_write, TF_ST_ERR_INTERNAL);
    for (;;) {
        __asm__ volatile("wfi");
    }
}
