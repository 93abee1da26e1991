/* The UART receive path every board port shares: a byte ring between the receive interrupt (the only writer of
 * head) and the main loop (the only writer of tail), on one core, without locks. It never drops a byte: a port's
 * drain stops at a full ring and leaves the byte in the UART's data register, so the sender waits (flow control:
 * QEMU takes nothing more from the socket until it is read); the caller decides how its interrupt stays quiet. */
#ifndef TF_RX_RING_H
#define TF_RX_RING_H

#include <stdint.h>

#define TF_RX_RING_BYTES 1024u /* holds a whole maximum-size frame (~520 bytes encoded) */

typedef struct {
    volatile uint8_t buf[TF_RX_RING_BYTES];
    volatile uint32_t head, tail;
} tf_rx_ring;

static inline int tf_rx_ring_empty(const tf_rx_ring *r) { return r->head == r->tail; }

static inline int tf_rx_ring_full(const tf_rx_ring *r) { return (r->head + 1u) % TF_RX_RING_BYTES == r->tail; }

/* Only when not full (the drain checks). */
static inline void tf_rx_ring_put(tf_rx_ring *r, uint8_t b) {
    r->buf[r->head] = b;
    r->head = (r->head + 1u) % TF_RX_RING_BYTES;
}

/* tf_board_getc: the next byte, or -1. On an empty ring the UART is drained with interrupts masked first (the ISR
 * stops at a full ring, so bytes may wait in the UART), then `rearm` (may be NULL) re-enables the interrupt a full
 * ring had masked. */
static inline int tf_rx_ring_getc(tf_rx_ring *r, void (*drain)(void), void (*rearm)(void)) {
    if (tf_rx_ring_empty(r)) {
        __asm__ volatile("cpsid i" ::: "memory");
        drain();
        if (rearm != 0) {
            rearm();
        }
        __asm__ volatile("cpsie i" ::: "memory");
        if (tf_rx_ring_empty(r)) {
            return -1;
        }
    }
    const int b = r->buf[r->tail];
    r->tail = (r->tail + 1u) % TF_RX_RING_BYTES;
    return b;
}

/* tf_board_idle: sleep until an interrupt unless a byte waits, in the ring or in the UART (`uart_has_byte`). */
static inline void tf_rx_ring_idle(const tf_rx_ring *r, int (*uart_has_byte)(void)) {
    __asm__ volatile("cpsid i" ::: "memory");
    if (tf_rx_ring_empty(r) && !uart_has_byte()) {
        __asm__ volatile("dsb\n wfi" ::: "memory"); /* a pending IRQ still wakes WFI with PRIMASK set */
    }
    __asm__ volatile("cpsie i\n isb" ::: "memory");
}

#endif
