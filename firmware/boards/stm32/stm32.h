/* Core (ARMv7-M system control space) registers and the hooks shared by the STM32 ports (boards/stm32/). */
#ifndef TF_STM32_H
#define TF_STM32_H

#include <stdint.h>

#include "tf_board.h"

#define TF_REG(a) (*(volatile uint32_t *)(a))

#define SYST_CSR TF_REG(0xE000E010u)
#define SYST_RVR TF_REG(0xE000E014u)
#define SYST_CVR TF_REG(0xE000E018u)
#define NVIC_ISER(n) TF_REG(0xE000E100u + 4u * (n))
#define NVIC_ICER(n) TF_REG(0xE000E180u + 4u * (n))
#define SCB_CPUID TF_REG(0xE000ED00u)
#define SCB_VTOR TF_REG(0xE000ED08u)
#define SCB_SHCSR TF_REG(0xE000ED24u)
#define MPU_CTRL TF_REG(0xE000ED94u)
#define MPU_RNR TF_REG(0xE000ED98u)
#define MPU_RBAR TF_REG(0xE000ED9Cu)
#define MPU_RASR TF_REG(0xE000EDA0u)
#define DEMCR TF_REG(0xE000EDFCu)
#define DWT_CTRL TF_REG(0xE0001000u)
#define DWT_CYCCNT TF_REG(0xE0001004u)
#define DWT_LAR TF_REG(0xE0001FB0u)

/* Peripherals at the same address with the same bits on the F405 and the F746. */
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

#define TF_STACK_PAINT 0x5AFEC0DEu
/* The protocol USART's interrupt: USART1 is IRQ 37 on the F405 and the F746 alike. */
#define TF_USART_IRQ 37u

#ifndef TF_STM32_SYSCLK_HZ
#error "TF_STM32_SYSCLK_HZ: the core clock the port sets up (Makefile: 168 MHz F405, 216 MHz F746)"
#endif

/* USART1's BRR for 115200 baud at 16x oversampling: from APB2 (SYSCLK / 2) once the PLL runs, else the 16 MHz HSI
 * the part resets to. */
#define TF_USART_BRR(pll) ((((pll) ? TF_STM32_SYSCLK_HZ / 2u : 16000000u) + 115200u / 2u) / 115200u)

void tf_stm32_core_init(void); /* VTOR, MPU guard, DWT (TF_STM32_DWT), SysTick */
void tf_stm32_dsb_isb(void);
int tf_stm32_dwt_running(void);
/* 1 once (*reg & mask) == want, 0 if it is not after 100000 reads (an emulator without the peripheral). */
int tf_stm32_wait_set(volatile uint32_t *reg, uint32_t mask, uint32_t want);
void tf_systick_handler(void);

/* The protocol USART (usart.c) over its family's registers (usart_f4.c, usart_f7.c). */
void tf_usart_irq_handler(void);
/* Unmask the USART interrupt and enable interrupts: the end of tf_board_init. */
void tf_usart_start(void);
/* A received byte waits in the data register (also clears an overrun that would keep the interrupt up). */
int tf_usart_rx_ready(void);
uint8_t tf_usart_rx_byte(void);
int tf_usart_tx_ready(void);
void tf_usart_tx_byte(uint8_t b);

#endif /* TF_STM32_H */
