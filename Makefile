# TinyFleet: `make setup` once, then `make test`. See README.md.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTEST  := $(BIN)/python -m pytest
DEBS    := mosquitto qemu-system-arm gcc-arm-none-eabi libnewlib-arm-none-eabi dataset-fashion-mnist chromium
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup debs test test-pure test-broker test-firmware test-e2e lint clean firmware firmware-test

setup: debs $(BIN)/tinyfleet

# Debian packages only where missing (mosquitto for broker tests and the embedded broker,
# the ARM toolchain and QEMU for firmware tests, Fashion-MNIST for the accuracy benchmark,
# headless Chromium to check the simulation report renders).
debs:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v qemu-system-arm >/dev/null 2>&1 || missing="$$missing qemu-system-arm"; \
	command -v arm-none-eabi-gcc >/dev/null 2>&1 || missing="$$missing gcc-arm-none-eabi libnewlib-arm-none-eabi"; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/tinyfleet: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Fast by default: pure + broker + firmware groups; long scale runs live in benchmarks/.
test:
	$(PYTEST) -q -x tests

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

lint:
	$(BIN)/ruff check fleet device_agent tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
