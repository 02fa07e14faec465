# `make demo` and `make test` set everything up on a fresh machine with Python 3.11 and pip.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# CPU machines get the CPU build of torch (a bare `torch` pulls a multi-GB CUDA build). GPU users install
# their CUDA torch into .venv first (see README); an importable torch is never replaced.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: demo test test-slow bench gpu-check clean
# DeepSpeed compiles its CPU all-reduce op the first time a CPU process group starts (47 s on 2 cores): built here,
# once (torch's extension cache keeps it), rather than inside the first test or run that needs it.
$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[test]"
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null \
		|| echo "note: DeepSpeed's CPU all-reduce op did not build; CPU processes under DeepSpeed need a C++ compiler"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python train.py hydra.run.dir=runs/demo

# A test process per core and one more, each test file kept in one (its module fixtures are built once): the suite
# is mostly short training subprocesses, one thread each (tests/conftest.py), and a share of it waits (on process
# start-up, on the SLURM scheduler), which the extra process fills (two more measured slower: 16:06 against 14:37).
# Files start in tests/conftest.py's order. Ruff's lint (pyproject.toml) runs first: a second.
PYTEST := $(BIN)/python -m pytest -q -n $$(( $$(nproc) + 1 )) --dist loadfile --no-loadscope-reorder

# `make test` leaves out the tests marked slow (pyproject.toml), which had kept it past 15 minutes on 2 cores: the real
# SLURM cluster's jobs (549 CPU-seconds) and the micro protocol's sitting (197). `make test-slow` runs them, and CI
# (.ci/run) runs both: 11:06 and 9:38 here (2026-12-07).
test: $(BIN)/.installed
	$(BIN)/ruff check --quiet .
	$(PYTEST) -m "not slow"

test-slow: $(BIN)/.installed
	$(PYTEST) -m slow

# A GPU node's check (mea/tools/gpu_check.py): the CUDA suite, the benchmarks and every variant under every engine, in
# one table written to runs/gpu-check/. It runs with what is installed, the venv where there is one, and names what is
# missing (a bare GPU image) or says there is no GPU, in one line. GPU_CHECK_ARGS="--budget 480": what fits 8 minutes.
GPU_CHECK_ARGS ?=
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m mea.tools.gpu_check $(GPU_CHECK_ARGS)

bench: $(BIN)/.installed
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/data_pipeline.py

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
