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

#define TF_STACK_PAINT 0x5AFEC0DEu
/* The protocol USART's interrupt: USART1 is IRQ 37 on the F405 and the F746 alike. */
#define TF_USART_IRQ 37u

#ifndef TF_STM32_SYSCLK_HZ
#error "TF_STM32_SYSCLK_HZ: the core clock the port sets up (Makefile: 168 MHz F405, 216 MHz F746)"
#endif

void tf_stm32_core_init(void); /* VTOR, MPU guard, DWT (TF_STM32_DWT), SysTick */
void tf_stm32_dsb_isb(void);
int tf_stm32_dwt_running(void);
void tf_usart_irq_handler(void);
void tf_systick_handler(void);

#endif /* TF_STM32_H */
