/* STM32F746 (32F746G-DISCO; Renode stm32f746): clock tree, caches and USART1 on PA9/PB7 (the ST-LINK virtual COM
 * port), register layout of RM0385 (CR1/BRR/ISR/ICR/RDR/TDR), not the F4's SR/DR; the receive ring, transmit loop
 * and idle are usart.c. Refuses polling when idle. Emulators without an RCC model (HSIRDY never reads 1) skip the
 * clock set-up; ticks come from DWT CYCCNT where it runs, else SysTick (core.c). */
#include "stm32.h"

#define RCC_APB1ENR TF_REG(RCC_BASE + 0x40)
#define PWR_CR1 TF_REG(0x40007000u)
#define PWR_CSR1 TF_REG(0x40007004u)
#define GPIOB_MODER TF_REG(0x40020400u)
#define GPIOB_AFRL TF_REG(0x40020420u)
#define SCB_CCR TF_REG(0xE000ED14u)
#define SCB_CCSIDR TF_REG(0xE000ED80u)
#define SCB_CSSELR TF_REG(0xE000ED84u)
#define SCB_ICIALLU TF_REG(0xE000EF50u)
#define SCB_DCISW TF_REG(0xE000EF60u)

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

/* HSI 16 MHz -> PLL (M 16, N 432, P 2, Q 9) = 216 MHz with over-drive; APB1 54, APB2 108 MHz; flash 7 wait
 * states + ART + prefetch (RM0385 3.3.2, 2.7-3.6 V). Returns 0 when there is no RCC to program (an emulator). */
static int clock_init(void) {
    if (!(RCC_CR & 2u)) { /* HSIRDY: set on silicon after reset */
        return 0;
    }
    RCC_APB1ENR |= 1u << 28; /* PWR */
    RCC_PLLCFGR = (9u << 24) | (0u << 22) | (0u << 16) | (432u << 6) | 16u;
    RCC_CR |= 1u << 24; /* PLLON */
    if (!tf_stm32_wait_set(&RCC_CR, 1u << 25, 1u << 25)) {
        return 0;
    }
    PWR_CR1 |= 1u << 16; /* ODEN */
    if (!tf_stm32_wait_set(&PWR_CSR1, 1u << 16, 1u << 16)) {
        return 0;
    }
    PWR_CR1 |= 1u << 17; /* ODSWEN */
    if (!tf_stm32_wait_set(&PWR_CSR1, 1u << 17, 1u << 17)) {
        return 0;
    }
    FLASH_ACR = (1u << 9) | (1u << 8) | 7u;                          /* ARTEN PRFTEN, LATENCY 7 */
    RCC_CFGR = (RCC_CFGR & ~0xFCF3u) | (4u << 13) | (5u << 10) | 2u; /* PPRE2 /2, PPRE1 /4, SW = PLL */
    return tf_stm32_wait_set(&RCC_CFGR, 0xCu, 0x8u);
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

int tf_usart_rx_ready(void) {
    const uint32_t isr = USART_ISR;
    if (isr & ISR_ORE) {
        USART_ICR = ISR_ORE; /* an overrun keeps the interrupt asserted until cleared */
    }
    return (isr & ISR_RXNE) != 0;
}

uint8_t tf_usart_rx_byte(void) { return (uint8_t)USART_RDR; }

int tf_usart_tx_ready(void) { return (USART_ISR & ISR_TXE) != 0; }

void tf_usart_tx_byte(uint8_t b) { USART_TDR = b; }

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
    USART_BRR = TF_USART_BRR(pll);
    USART_CR1 = CR1_UE | CR1_TE | CR1_RE | CR1_RXNEIE;
    tf_usart_start();
}
