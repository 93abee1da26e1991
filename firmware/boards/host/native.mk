# The firmware's training runtime as a host shared library for Python (`engine: native`, device_agent/native.py):
# `make -C firmware -f boards/host/native.mk` -> build/native/libtinyfleet_native.so. The kernels, runtime and
# wire readers the boards run, plus boards/host/tf_native.c (the handle API); -O3 -march=native (built where it runs; integer arithmetic, so the flags cannot change a bit).
BUILD   ?= build
CC_HOST ?= gcc
SRC     := $(wildcard src/kernels/*.c) $(wildcard src/runtime/*.c) $(wildcard src/wire/*.c) src/proto/tf_crc.c \
           boards/host/tf_native.c
CFLAGS  := -std=c99 -Wall -Wextra -Werror -Wshadow -Wvla -O3 -march=native -g -ffp-contract=off -fPIC -Iinclude
LIB     := $(BUILD)/native/libtinyfleet_native.so

$(LIB): $(SRC) $(wildcard include/*.h) boards/host/native.mk
	@mkdir -p $(dir $@)
	$(CC_HOST) $(CFLAGS) -shared -o $@.tmp $(SRC) && mv $@.tmp $@
