/* STM32F746 (32F746G-DISCO; Renode stm32f746): clock tree, caches, USART1 on PA9/PB7 (the ST-LINK virtual COM
 * port) with RXNE-interrupt RX into a ring buffer, WFI when idle. Register layout of RM0385 (CR1/BRR/ISR/ICR/
 * RDR/TDR), not the F4's SR/DR. Refuses polling when idle. Emulators without an RCC model (HSIRDY never reads 1)
 * skip the clock set-up; ticks come from DWT CYCCNT where it runs, else SysTick (core.c). */
#include "stm32.h"
#include "../common/tf_rx_ring.h"

#define RCC_BASE 0x40023800u
#define RCC_CR TF_REG(RCC_BASE + 0x00)
#define RCC_PLLCFGR TF_REG(RCC_BASE + 0x04)
#define RCC_CFGR TF_REG(RCC_BASE + 0x08)
#define RCC_AHB1ENR TF_REG(RCC_BASE + 0x30)
#define RCC_APB1ENR TF_REG(RCC_BASE + 0x40)
#define RCC_APB2ENR TF_REG(RCC_BASE + 0x44)
#define PWR_CR1 TF_REG(0x40007000u)
#define PWR_CSR1 TF_REG(0x40007004u)
#define FLASH_ACR TF_REG(0x40023C00u)
#define GPIOA_MODER TF_REG(0x40020000u)
#define GPIOA_AFRH TF_REG(0x40020024u)
#define GPIOB_MODER TF_REG(0x40020400u)
#define GPIOB_AFRL TF_REG(0x40020420u)
#define SCB_CCR TF_REG(0xE000ED14u)
#define SCB_CCSIDR TF_REG(0xE000ED80u)
#define SCB_CSSELR TF_REG(0xE000ED84u)
#define SCB_ICIALLU TF_REG(0xE000EF50u)
#define SCB_DCISW TF_REG(0xE000EF60u)

#define USART1_BASE 0x40011000u
#define USART_CR1 TF_REG(USART1_BASE + 0x00)
#define USART_BRR TF_REG(USART1_BASE + 0x0C)
#define USART_ISR TF_REG(USART1_BASE + 0x1C)
#define USART_ICR TF_REG(USART1_BASE + 0x20)
#define USART_RDR TF_REG(USART1_BASE + 0x24)
#define USART_TDR TF_REG(USART1_BASE + 0x28)
#define ISR_ORE (1u << 3)
#define ISR_RXNE (1u << 5)
#define ISR_TXE (1u << 7)
#define CR1_UE (1u << 0)
#define CR1_RE (1u << 2)
#define CR1_TE (1u << 3)
#define CR1_RXNEIE (1u << 5)

#define HSI_HZ 16000000u
#define PCLK2_HZ (TF_STM32_SYSCLK_HZ / 2u)
#define BAUD 115200u
#define IRQ_WORD (TF_USART_IRQ / 32u)
#define IRQ_BIT (1u << (TF_USART_IRQ % 32u))

static tf_rx_ring rx;

static int wait_set(volatile uint32_t *reg, uint32_t mask, uint32_t want) {
    for (uint32_t i = 0; i < 100000u; i++) {
        if ((*reg & mask) == want) {
            return 1;
        }
    }
    return 0;
}

/* HSI 16 MHz -> PLL (M 16, N 432, P 2, Q 9) = 216 MHz with over-drive; APB1 54, APB2 108 MHz; flash 7 wait
 * states + ART + prefetch (RM0385 3.3.2, 2.7-3.6 V). Returns 0 when there is no RCC to program (an emulator). */
static int clock_init(void) {
    if (!(RCC_CR & 2u)) { /* HSIRDY: set on silicon after reset */
        return 0;
    }
    RCC_APB1ENR |= 1u << 28; /* PWR */
    RCC_PLLCFGR = (9u << 24) | (0u << 22) | (0u << 16) | (432u << 6) | 16u;
    RCC_CR |= 1u << 24; /* PLLON */
    if (!wait_set(&RCC_CR, 1u << 25, 1u << 25)) {
        return 0;
    }
    PWR_CR1 |= 1u << 16; /* ODEN */
    if (!wait_set(&PWR_CSR1, 1u << 16, 1u << 16)) {
        return 0;
    }
    PWR_CR1 |= 1u << 17; /* ODSWEN */
    if (!wait_set(&PWR_CSR1, 1u << 17, 1u << 17)) {
        return 0;
    }
    FLASH_ACR = (1u << 9) | (1u << 8) | 7u;                          /* ARTEN PRFTEN, LATENCY 7 */
    RCC_CFGR = (RCC_CFGR & ~0xFCF3u) | (4u << 13) | (5u << 10) | 2u; /* PPRE2 /2, PPRE1 /4, SW = PLL */
    return wait_set(&RCC_CFGR, 0xCu, 0x8u);
}

/* Instruction and data caches on (ARMv7-M architecture manual B3.5; the D-cache invalidated by set/way first). */
static void caches_on(void) {
    SCB_ICIALLU = 0;
    SCB_CSSELR = 0; /* level 1 data cache */
    tf_stm32_dsb_isb();
    const uint32_t ccsidr = SCB_CCSIDR;
    const uint32_t sets = ((ccsidr >> 13) & 0x7FFFu) + 1u, ways = ((ccsidr >> 3) & 0x3FFu) + 1u;
    for (uint32_t s = 0; s < sets; s++) {
        for (uint32_t w = 0; w < ways; w++) {
            SCB_DCISW = (s << 5) | (w << 30);
        }
    }
    tf_stm32_dsb_isb();
    SCB_CCR |= (1u << 17) | (1u << 16); /* IC | DC */
    tf_stm32_dsb_isb();
}

static void rx_drain(void) {
    for (;;) {
        const uint32_t isr = USART_ISR;
        if (isr & ISR_ORE) {
            USART_ICR = ISR_ORE; /* an overrun keeps the interrupt asserted until cleared */
        }
        if (!(isr & ISR_RXNE)) {
            return;
        }
        if (tf_rx_ring_full(&rx)) {
            NVIC_ICER(IRQ_WORD) = IRQ_BIT; /* ring full: the byte waits in RDR (usart_f4.c rx_drain) */
            return;
        }
        tf_rx_ring_put(&rx, (uint8_t)USART_RDR);
    }
}

void tf_usart_irq_handler(void) { rx_drain(); }

void tf_board_init(void) {
    tf_stm32_core_init();
    caches_on();
    RCC_AHB1ENR |= 3u;                                      /* GPIOA, GPIOB */
    RCC_APB2ENR |= 1u << 4;                                 /* USART1 */
    GPIOA_MODER = (GPIOA_MODER & ~(3u << 18)) | (2u << 18); /* PA9 TX: alternate function */
    GPIOA_AFRH = (GPIOA_AFRH & ~(0xFu << 4)) | (7u << 4);   /* AF7 */
    GPIOB_MODER = (GPIOB_MODER & ~(3u << 14)) | (2u << 14); /* PB7 RX */
    GPIOB_AFRL = (GPIOB_AFRL & ~(0xFu << 28)) | (7u << 28);
    const int pll = clock_init();
    USART_CR1 = 0; /* BRR is written with the USART disabled */
    USART_BRR = ((pll ? PCLK2_HZ : HSI_HZ) + BAUD / 2u) / BAUD;
    USART_CR1 = CR1_UE | CR1_TE | CR1_RE | CR1_RXNEIE;
    NVIC_ISER(IRQ_WORD) = IRQ_BIT;
    __asm__ volatile("cpsie i" ::: "memory");
}

/* A full ring masked the interrupt (rx_drain); unmask it once the main loop made room. */
static void rx_rearm(void) {
    if (!tf_rx_ring_full(&rx)) {
        NVIC_ISER(IRQ_WORD) = IRQ_BIT;
    }
}

static int uart_has_byte(void) { return (USART_ISR & ISR_RXNE) != 0; }

int tf_board_getc(void) { return tf_rx_ring_getc(&rx, rx_drain, rx_rearm); }

void tf_board_idle(void) { tf_rx_ring_idle(&rx, uart_has_byte); }

void tf_board_write(const uint8_t *buf, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        while (!(USART_ISR & ISR_TXE)) {
        }
        USART_TDR = buf[i];
    }
}
