# The firmware's training runtime as a host shared library for Python (`engine: native`, device_agent/native.py):
# `make -C firmware -f boards/host/native.mk` -> build/native/libtinyfleet_native.so. The kernels, runtime and
# wire readers the boards run, plus boards/host/tf_native.c (the handle API); -O3 -march=native (built where it runs; integer arithmetic, so the flags cannot change a bit).
BUILD   ?= build
CC_HOST ?= gcc
SRC     := $(wildcard src/kernels/*.c) $(wildcard src/runtime/*.c) $(wildcard src/wire/*.c) src/proto/tf_crc.c \
           boards/host/tf_native.c
HDR     := $(wildcard include/*.h src/kernels/*.h src/runtime/*.h src/wire/*.h)
# The build id the library exports (tf_native_build_id): what it was built from, as the first 16 hex digits of the
# sha256 of `sha256sum` over SRC and HDR in path order. device_agent/native.py (NATIVE_SOURCES) computes the same
# from a source tree and refuses a library built from other sources; keep the two file lists alike.
BUILD_ID := $(shell sha256sum $(sort $(SRC) $(HDR)) | sha256sum | cut -c1-16)
CFLAGS  := -std=c99 -Wall -Wextra -Werror -Wshadow -Wvla -O3 -march=native -g -ffp-contract=off -fPIC -Iinclude \
           -DTF_NATIVE_BUILD_ID='"$(BUILD_ID)"'
LIB     := $(BUILD)/native/libtinyfleet_native.so
# NOTE: rewritten only when the id changes, so a rebuild follows any change of content (not only of mtime).
ID_FILE := $(BUILD)/native/build-id

$(LIB): $(SRC) $(HDR) $(ID_FILE) boards/host/native.mk
	@mkdir -p $(dir $@)
	$(CC_HOST) $(CFLAGS) -shared -o $@.tmp $(SRC) && mv $@.tmp $@

# `make -s -f boards/host/native.mk build-id`: the id a build of these sources gets (tests/pure/test_native_build_id.py)
.PHONY: build-id
build-id:
	@echo $(BUILD_ID)

$(ID_FILE): FORCE
	@mkdir -p $(dir $@)
	@[ "$$(cat $@ 2>/dev/null)" = "$(BUILD_ID)" ] || echo "$(BUILD_ID)" > $@

FORCE:
