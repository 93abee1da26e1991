/* STM32F405 (QEMU netduinoplus2, Renode stm32f4): clock tree, USART1 on PA9/PA10 with RXNE-interrupt RX into a
 * ring buffer, WFI when idle. Register layout of RM0090 (SR/DR/BRR/CR1). Refuses polling when idle.
 * QEMU's model has no RCC, GPIO or flash-interface model (their registers read as zero) and ignores BRR: the
 * clock set-up below is skipped there (HSIRDY never reads 1) and SysTick counts at the machine's fixed 168 MHz. */
#include "stm32.h"
#include "../common/tf_rx_ring.h"

#define RCC_BASE 0x40023800u
#define RCC_CR TF_REG(RCC_BASE + 0x00)
#define RCC_PLLCFGR TF_REG(RCC_BASE + 0x04)
#define RCC_CFGR TF_REG(RCC_BASE + 0x08)
#define RCC_AHB1ENR TF_REG(RCC_BASE + 0x30)
#define RCC_APB2ENR TF_REG(RCC_BASE + 0x44)
#define FLASH_ACR TF_REG(0x40023C00u)
#define GPIOA_MODER TF_REG(0x40020000u)
#define GPIOA_AFRH TF_REG(0x40020024u)

#define USART1_BASE 0x40011000u
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

/* HSI 16 MHz -> PLL (M 16, N 336, P 2, Q 7) = 168 MHz; AHB 168, APB1 42, APB2 84 MHz; flash 5 wait states with
 * prefetch and caches (RM0090 3.5.1, 2.7-3.6 V). Returns 0 when there is no RCC to program (an emulator). */
static int clock_init(void) {
    if (!(RCC_CR & 2u)) { /* HSIRDY: set on silicon after reset */
        return 0;
    }
    FLASH_ACR = (1u << 10) | (1u << 9) | (1u << 8) | 5u; /* DCEN ICEN PRFTEN, LATENCY 5 */
    RCC_PLLCFGR = (7u << 24) | (0u << 22) | (0u << 16) | (336u << 6) | 16u;
    RCC_CR |= 1u << 24; /* PLLON */
    if (!wait_set(&RCC_CR, 1u << 25, 1u << 25)) {
        return 0;
    }
    RCC_CFGR = (RCC_CFGR & ~0xFCF3u) | (4u << 13) | (5u << 10) | 2u; /* PPRE2 /2, PPRE1 /4, SW = PLL */
    return wait_set(&RCC_CFGR, 0xCu, 0x8u);
}

static void rx_drain(void) {
    while (USART_SR & SR_RXNE) { /* reading SR then DR also clears an overrun */
        if (tf_rx_ring_full(&rx)) {
            /* NOTE: ring full: the byte stays in DR and its interrupt is masked in the NVIC (RXNE stays high
             * until DR is read); the sender waits (QEMU takes nothing more from the socket while RXNE is set).
             * tf_board_getc unmasks it once the main loop made room. */
            NVIC_ICER(IRQ_WORD) = IRQ_BIT;
            return;
        }
        tf_rx_ring_put(&rx, (uint8_t)USART_DR);
    }
}

void tf_usart_irq_handler(void) { rx_drain(); }

void tf_board_init(void) {
    tf_stm32_core_init();
    RCC_AHB1ENR |= 1u;                                          /* GPIOA */
    RCC_APB2ENR |= 1u << 4;                                     /* USART1 */
    GPIOA_MODER = (GPIOA_MODER & ~(0xFu << 18)) | (0xAu << 18); /* PA9, PA10: alternate function */
    GPIOA_AFRH = (GPIOA_AFRH & ~(0xFFu << 4)) | (0x77u << 4);   /* AF7 = USART1 */
    const int pll = clock_init();
    USART_BRR = ((pll ? PCLK2_HZ : HSI_HZ) + BAUD / 2u) / BAUD; /* oversampling by 16 */
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

static int uart_has_byte(void) { return (USART_SR & SR_RXNE) != 0; }

int tf_board_getc(void) { return tf_rx_ring_getc(&rx, rx_drain, rx_rearm); }

void tf_board_idle(void) { tf_rx_ring_idle(&rx, uart_has_byte); }

void tf_board_write(const uint8_t *buf, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        while (!(USART_SR & SR_TXE)) {
        }
        USART_DR = buf[i];
    }
}
