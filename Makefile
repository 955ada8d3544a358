# `make` sets up the environment and runs the default job; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all setup demo test bench clean
all: demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/repq-tvm demo

test: setup
	$(BIN)/python -m pytest -q --durations=10

bench: setup
	$(BIN)/python benchmarks/accuracy_table.py

clean:
	rm -rf out .pytest_cache
