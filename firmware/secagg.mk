# Secure aggregation's crypto on the firmware (src/crypto/: X25519, ChaCha20, HKDF-SHA256, masks), tested against
# the Python spec's golden vectors (tests/crypto/secagg_vectors.h, from tests/crypto/gen_secagg_vectors.py):
#   make -C firmware -f secagg.mk host        # build + run the host test (exit status = verdict)
#   make -C firmware -f secagg.mk qemu        # the mps2 an386 (M4) / an500 (M7) ELFs that print one result line
# benchmarks/secagg_cost.py runs the ELFs under QEMU -icount shift=0 and reads flash/stack costs from them.
BUILD    ?= build
CC_HOST  ?= gcc
CC_ARM   ?= arm-none-eabi-gcc
RAM_SIZE   ?= 320K
FLASH_SIZE ?= 1024K
STACK_SIZE ?= 8K

WARN     := -std=c99 -Wall -Wextra -Werror -Wshadow -Wpointer-arith -Wstrict-prototypes -Wvla
# the primitives (the device's protocol steps, tf_secagg_device.c, run in the main firmware: Makefile)
CRYPTO   := $(filter-out src/crypto/tf_secagg_device.c,$(wildcard src/crypto/*.c)) src/runtime/tf_sha256.c
INC      := -Iinclude -Isrc/crypto -Itests/crypto -Itests -Itests/vectors
TEST     := tests/crypto/test_secagg_crypto.c
DEPS     := $(wildcard src/crypto/*.h) tests/crypto/secagg_vectors.h include/tf_sha256.h secagg.mk

# the board: its startup, UART and timer (boards/qemu-mps2 without main.c), the firmware it links against for
# board.c's fault report, and this test's main; --gc-sections keeps only what is used
CORE     := $(wildcard src/kernels/*.c src/proto/*.c src/runtime/*.c src/wire/*.c src/device/*.c src/*.c)
BOARD    := boards/common/startup.c boards/qemu-mps2/board.c
ARM      := $(WARN) -O2 -g -mthumb -mfloat-abi=soft -ffp-contract=off -ffunction-sections -fdata-sections \
            -ffreestanding -fno-common -Werror=frame-larger-than=1024 -Wstack-usage=2048 $(INC) -DTF_SECAGG_BOARD \
            -Iboards/qemu-mps2
ARM_LD   := -nostartfiles --specs=nano.specs -Wl,--gc-sections -Wl,--no-warn-rwx-segments \
            -Wl,--defsym=RAM_SIZE=$(RAM_SIZE) -Wl,--defsym=FLASH_SIZE=$(FLASH_SIZE) \
            -Wl,--defsym=STACK_SIZE=$(STACK_SIZE) -Tboards/qemu-mps2/mps2.ld

.PHONY: host qemu
host: $(BUILD)/secagg/host/test_secagg_crypto
	$<

qemu: $(BUILD)/secagg/an386/secagg.elf $(BUILD)/secagg/an500/secagg.elf \
      $(BUILD)/secagg/an386/crypto.o $(BUILD)/secagg/an500/crypto.o

$(BUILD)/secagg/host/test_secagg_crypto: $(CRYPTO) $(TEST) $(DEPS)
	@mkdir -p $(dir $@)
	$(CC_HOST) $(WARN) -O2 -g $(INC) -o $@ $(CRYPTO) $(TEST)

# the crypto alone, relocatable, for its flash cost (text + data of what a device links)
$(BUILD)/secagg/%/crypto.o: $(CRYPTO) $(DEPS)
	@mkdir -p $(dir $@)
	$(CC_ARM) $(ARM) -mcpu=$(if $(filter an386,$*),cortex-m4,cortex-m7) -r -nostdlib -o $@ $(CRYPTO)

$(BUILD)/secagg/%/secagg.elf: $(CRYPTO) $(TEST) $(BOARD) $(CORE) $(DEPS) boards/qemu-mps2/mps2.ld
	@mkdir -p $(dir $@)
	$(CC_ARM) $(ARM) -mcpu=$(if $(filter an386,$*),cortex-m4,cortex-m7) $(ARM_LD) -o $@ \
	  $(CRYPTO) $(TEST) $(BOARD) $(filter-out src/runtime/tf_sha256.c,$(CORE)) src/crypto/tf_secagg_device.c -lgcc
