/* mps2 (QEMU an386 / an500) board services: CMSDK UART0 with interrupt-driven RX into a ring buffer, SysTick
 * extended to 64 bits, the MPU stack guard, painted-stack high-water. Refuses polling when idle: WFI. */
#include "tf_board.h"
#include "tf_proto.h"
#include "../common/tf_rx_ring.h"

#define REG(a) (*(volatile uint32_t *)(a))

#define UART0_BASE 0x40004000u
#define UART_DATA REG(UART0_BASE + 0x00)
#define UART_STATE REG(UART0_BASE + 0x04)
#define UART_CTRL REG(UART0_BASE + 0x08)
#define UART_INTCLR REG(UART0_BASE + 0x0C)
#define UART_BAUDDIV REG(UART0_BASE + 0x10)
#define UART_STATE_TXFULL 1u
#define UART_STATE_RXFULL 2u
#define UART_CTRL_TXEN 1u
#define UART_CTRL_RXEN 2u
#define UART_CTRL_RXIRQ 8u
#define UART_INT_RX 2u

#define SYST_CSR REG(0xE000E010u)
#define SYST_RVR REG(0xE000E014u)
#define SYST_CVR REG(0xE000E018u)
#define NVIC_ISER0 REG(0xE000E100u)
#define SCB_CPUID REG(0xE000ED00u)
#define SCB_SHCSR REG(0xE000ED24u)
#define MPU_CTRL REG(0xE000ED94u)
#define MPU_RNR REG(0xE000ED98u)
#define MPU_RBAR REG(0xE000ED9Cu)
#define MPU_RASR REG(0xE000EDA0u)

#define SYSCLK_HZ 25000000u
#define STACK_PAINT 0x5AFEC0DEu

extern uint32_t __stack_limit, __stack_top, __guard_start, __arena_start, __arena_end;
extern uint32_t __data_start, __bss_end, __flash_end, __ram_start, __ram_end, __store_start, __store_end;

static tf_rx_ring rx;
static volatile uint32_t tick_wraps;
volatile uint32_t fault_exception; /* IPSR of the last fault, for a debugger */

static void dsb_isb(void) { __asm__ volatile("dsb\n isb" ::: "memory"); }

/* Moves received bytes from the UART into the ring while it has room (interrupts masked or in the ISR). A full
 * ring leaves the byte in the UART: QEMU then takes nothing more from the socket until DATA is read, so a burst
 * that arrives while the main loop is busy (e.g. a request sent during a long TRAIN) waits instead of being lost
 * (flow control; a lost frame delimiter would merge frames and stall the link). */
static void rx_drain(void) {
    while ((UART_STATE & UART_STATE_RXFULL) && !tf_rx_ring_full(&rx)) {
        tf_rx_ring_put(&rx, (uint8_t)UART_DATA);
    }
}

static int uart_has_byte(void) { return (UART_STATE & UART_STATE_RXFULL) != 0; }

void tf_uart0_rx_handler(void) {
    /* NOTE: clear first, then drain: a byte arriving after the last RXFULL check re-raises the interrupt.
     * (Clearing after the drain can lose that interrupt while RXFULL stays set: QEMU then never delivers
     * another byte.) A byte left behind by a full ring is fetched by tf_board_getc. */
    UART_INTCLR = UART_INT_RX;
    rx_drain();
}

void tf_systick_handler(void) { tick_wraps++; }

static void mpu_guard(void) {
    /* Region 0: the 1 KB below the stack, no access, execute never. Privileged code keeps the default map. */
    MPU_RNR = 0;
    MPU_RBAR = (uint32_t)&__guard_start;
    MPU_RASR = (1u << 28) | (0u << 24) | (9u << 1) | 1u; /* XN, AP=none, SIZE=2^(9+1), enable */
    MPU_CTRL = (1u << 2) | 1u;                           /* PRIVDEFENA | ENABLE */
    SCB_SHCSR |= 1u << 16;                               /* MemManage fault enabled */
    dsb_isb();
}

void tf_board_init(void) {
#ifndef TF_NO_MPU /* debugging only: shows what an overflow does without the guard */
    mpu_guard();
#else
    (void)mpu_guard;
#endif
    UART_BAUDDIV = SYSCLK_HZ / 115200u;
    UART_INTCLR = 0xF;
    NVIC_ISER0 = 1u << 0;
    UART_CTRL = UART_CTRL_TXEN | UART_CTRL_RXEN | UART_CTRL_RXIRQ;
    /* NOTE: QEMU's CMSDK UART stops polling its chardev while RX is disabled and resumes only when DATA is
     * read (EMULATION.md). Read once now unless a byte already arrived (the ISR takes that one). */
    if (!(UART_STATE & UART_STATE_RXFULL)) {
        (void)UART_DATA;
    }
    SYST_RVR = 0x00FFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 7u; /* core clock, interrupt on wrap, enable */
    __asm__ volatile("cpsie i" ::: "memory");
}

/* NOTE: the ISR stops at a full ring and its interrupt is already cleared: getc fetches what waits in the UART */
int tf_board_getc(void) { return tf_rx_ring_getc(&rx, rx_drain, 0); }

void tf_board_idle(void) { tf_rx_ring_idle(&rx, uart_has_byte); }

void tf_board_write(const uint8_t *buf, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        while (UART_STATE & UART_STATE_TXFULL) {
        }
        UART_DATA = buf[i];
    }
}

uint64_t tf_board_ticks(void) {
    uint32_t hi, lo;
    do {
        hi = tick_wraps;
        lo = SYST_CVR;
    } while (hi != tick_wraps);
    return ((uint64_t)hi << 24) + (0x00FFFFFFu - lo);
}

uint32_t tf_board_tick_hz(void) { return SYSCLK_HZ; }

uint64_t tf_board_ticks_aligned(void) {
    const uint32_t v0 = SYST_CVR;
    while (SYST_CVR == v0) {
    }
    return tf_board_ticks();
}

uint32_t tf_board_stack_unused(void) {
    const uint32_t *p = &__stack_limit;
    while (p < &__stack_top && *p == STACK_PAINT) {
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
uint32_t tf_board_ram_size(void) { return (uint32_t)((uintptr_t)&__ram_end - (uintptr_t)&__ram_start); }
uint32_t tf_board_flash_used(void) { return (uint32_t)(uintptr_t)&__flash_end; }
uint32_t tf_board_cpuid(void) { return SCB_CPUID; }

/* Entered with SP reset to the stack top (boards/common/startup.c): report ERR_INTERNAL on the UART, then halt. */
void tf_board_fault(uint32_t exception) {
    __asm__ volatile("cpsid i" ::: "memory");
    fault_exception = exception;
    tf_proto_write_status(tf_board_write, TF_ST_ERR_INTERNAL);
    for (;;) {
        __asm__ volatile("wfi");
    }
}
