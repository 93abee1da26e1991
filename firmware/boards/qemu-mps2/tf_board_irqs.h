/* The mps2 boards' interrupts for the shared vector table (boards/common/startup.c): 32, of which the board handles
 * UART0 RX (IRQ 0); UART0 TX (IRQ 1) is not used: the board writes by polling. */
#ifndef TF_BOARD_IRQS_H
#define TF_BOARD_IRQS_H

void tf_uart0_rx_handler(void);
void tf_systick_handler(void);

#define TF_N_IRQ 32
#define TF_IRQ_VECTORS [16 + 0] = tf_uart0_rx_handler

#endif /* TF_BOARD_IRQS_H */
