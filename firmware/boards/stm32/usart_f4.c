/* STM32F405 (QEMU netduinoplus2, Renode stm32f4): clock tree and USART1 on PA9/PA10, register layout of RM0090
 * (SR/DR/BRR/CR1); the receive ring, transmit loop and idle are usart.c. Refuses polling when idle.
 * QEMU's model has no RCC, GPIO or flash-interface model (their registers read as zero) and ignores BRR: the
 * clock set-up below is skipped there (HSIRDY never reads 1) and SysTick counts at the machine's fixed 168 MHz. */
#include "stm32.h"

#define USART_SR TF_REG(USART1_BASE + 0x00)
#define USART_DR TF_REG(USART1_BASE + 0x04)
#define USART_BRR TF_REG(USART1_BASE + 0x08)
#define USART_CR1 TF_REG(USART1_BASE + 0x0C)
#define SR_RXNE (1u << 5)
#define SR_TXE (1u << 7)
#define CR1_UE (1u << 13)
#define CR1_TE (1u << 3)
#define CR1_RE (1u << 2)
#define CR1_RXNEIE (1u << 5)

/* HSI 16 MHz -> PLL (M 16, N 336, P 2, Q 7) = 168 MHz; AHB 168, APB1 42, APB2 84 MHz; flash 5 wait states with
 * prefetch and caches (RM0090 3.5.1, 2.7-3.6 V). Returns 0 when there is no RCC to program (an emulator). */
static int clock_init(void) {
    if (!(RCC_CR & 2u)) { /* HSIRDY: set on silicon after reset */
        return 0;
    }
    FLASH_ACR = (1u << 10) | (1u << 9) | (1u << 8) | 5u; /* DCEN ICEN PRFTEN, LATENCY 5 */
    RCC_PLLCFGR = (7u << 24) | (0u << 22) | (0u << 16) | (336u << 6) | 16u;
    RCC_CR |= 1u << 24; /* PLLON */
    if (!tf_stm32_wait_set(&RCC_CR, 1u << 25, 1u << 25)) {
        return 0;
    }
    RCC_CFGR = (RCC_CFGR & ~0xFCF3u) | (4u << 13) | (5u << 10) | 2u; /* PPRE2 /2, PPRE1 /4, SW = PLL */
    return tf_stm32_wait_set(&RCC_CFGR, 0xCu, 0x8u);
}

/* NOTE: reading SR then DR also clears an overrun. */
int tf_usart_rx_ready(void) { return (USART_SR & SR_RXNE) != 0; }

uint8_t tf_usart_rx_byte(void) { return (uint8_t)USART_DR; }

int tf_usart_tx_ready(void) { return (USART_SR & SR_TXE) != 0; }

void tf_usart_tx_byte(uint8_t b) { USART_DR = b; }

void tf_board_init(void) {
    tf_stm32_core_init();
    RCC_AHB1ENR |= 1u;                                          /* GPIOA */
    RCC_APB2ENR |= 1u << 4;                                     /* USART1 */
    GPIOA_MODER = (GPIOA_MODER & ~(0xFu << 18)) | (0xAu << 18); /* PA9, PA10: alternate function */
    GPIOA_AFRH = (GPIOA_AFRH & ~(0xFFu << 4)) | (0x77u << 4);   /* AF7 = USART1 */
    USART_BRR = TF_USART_BRR(clock_init());
    USART_CR1 = CR1_UE | CR1_TE | CR1_RE | CR1_RXNEIE;
    tf_usart_start();
}
