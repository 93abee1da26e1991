/* The STM32 ports' protocol USART, shared by both families: RXNE-interrupt receive into the byte ring
 * (boards/common/tf_rx_ring.h), its interrupt masked in the NVIC while the ring is full, polled transmit, WFI when
 * idle. Only the registers are per family (tf_usart_* in usart_f4.c: RM0090 SR/DR; usart_f7.c: RM0385 ISR/RDR/TDR).
 * Refuses polling when idle and never drops a received byte. */
#include "stm32.h"
#include "../common/tf_rx_ring.h"

#define IRQ_WORD (TF_USART_IRQ / 32u)
#define IRQ_BIT (1u << (TF_USART_IRQ % 32u))

static tf_rx_ring rx;

static void rx_drain(void) {
    while (tf_usart_rx_ready()) {
        if (tf_rx_ring_full(&rx)) {
            /* NOTE: ring full: the byte stays in the data register and its interrupt is masked in the NVIC (RXNE
             * stays high until the byte is read); the sender waits (QEMU takes nothing more from the socket while
             * RXNE is set). tf_board_getc unmasks it once the main loop made room. */
            NVIC_ICER(IRQ_WORD) = IRQ_BIT;
            return;
        }
        tf_rx_ring_put(&rx, tf_usart_rx_byte());
    }
}

void tf_usart_irq_handler(void) { rx_drain(); }

void tf_usart_start(void) {
    NVIC_ISER(IRQ_WORD) = IRQ_BIT;
    __asm__ volatile("cpsie i" ::: "memory");
}

/* A full ring masked the interrupt (rx_drain); unmask it once the main loop made room. */
static void rx_rearm(void) {
    if (!tf_rx_ring_full(&rx)) {
        NVIC_ISER(IRQ_WORD) = IRQ_BIT;
    }
}

int tf_board_getc(void) { return tf_rx_ring_getc(&rx, rx_drain, rx_rearm); }

void tf_board_idle(void) { tf_rx_ring_idle(&rx, tf_usart_rx_ready); }

void tf_board_write(const uint8_t *buf, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        while (!tf_usart_tx_ready()) {
        }
        tf_usart_tx_byte(buf[i]);
    }
}
