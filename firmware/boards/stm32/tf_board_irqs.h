/* The STM32 ports' interrupts for the shared vector table (boards/common/startup.c): the F746's 98 (the F405 has
 * 82: one table serves both), of which the ports handle the protocol USART's (USART1: IRQ 37 on both). */
#ifndef TF_BOARD_IRQS_H
#define TF_BOARD_IRQS_H

#include "stm32.h"

#define TF_N_IRQ 98
#define TF_IRQ_VECTORS [16 + TF_USART_IRQ] = tf_usart_irq_handler

#endif /* TF_BOARD_IRQS_H */
