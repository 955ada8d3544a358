# `make` sets up the environment and runs the default job; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all setup demo test bench bench-latency clean aarch64-tools aarch64-sysroot test-aarch64
all: demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/repq-tvm demo

# one pytest-xdist worker per core of a CI runner (2); whole test files per worker, so module fixtures build once
TEST_WORKERS ?= 2
test: setup aarch64-tools
	$(BIN)/python -m pytest -q --durations=10 -n $(TEST_WORKERS) --dist loadfile

bench: setup
	$(BIN)/python benchmarks/accuracy_table.py

# repq-tvm W8/A8 + W4/A4 artifacts vs PyTorch FP32, ONNX Runtime FP32/INT8, OpenVINO default/FP32/INT8 (NNCF), side by
# side on DeiT-Ti/S and Swin-T, batch 1 and 8 (installs the bench extra; 20-40 min on 2 cores). Pass options with
# LATENCY_ARGS, e.g. make bench-latency LATENCY_ARGS="--models deit_tiny_patch16_224 --batches 1 --rounds 5"
bench-latency: setup
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python benchmarks/latency.py $(LATENCY_ARGS)

# aarch64 cross toolchain (compile --target aarch64-neon-dotprod) and user-mode QEMU (run those artifacts here).
# Installed with apt when missing and we are root; otherwise only says what to install.
AARCH64_PACKAGES := gcc-aarch64-linux-gnu qemu-user-static
AARCH64_SYSROOT ?= runs/aarch64-sysroot

aarch64-tools:
	@if command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && command -v qemu-aarch64-static >/dev/null 2>&1; then \
		echo "aarch64 tools: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "aarch64 tools: apt-get install $(AARCH64_PACKAGES)"; \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(AARCH64_PACKAGES) >/dev/null; \
	else \
		echo "aarch64 tools missing: install the Debian packages $(AARCH64_PACKAGES) (the aarch64 tests need them)"; \
	fi

# arm64 Debian sysroot with python3 + aarch64 TVM/NumPy wheels, for running aarch64 artifacts under qemu (~2 min)
aarch64-sysroot: setup aarch64-tools
	scripts/aarch64_sysroot.sh $(AARCH64_SYSROOT)

# the opt-in aarch64-under-qemu vs x86 agreement tests (device runner, and TVM's RPC server under qemu)
test-aarch64: aarch64-sysroot
	REPQ_TVM_AARCH64_SYSROOT=$(AARCH64_SYSROOT) $(BIN)/python -m pytest -q -m slow tests/test_aarch64.py tests/test_rpc.py

clean:
	rm -rf out .pytest_cache
