# Quick start: `make bench` (the benchmark) and `make test` (the whole suite).
# Both set up .venv first (torch, triton, test tools), then build the package with its
# C++/CUDA extension in place.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CUDA_HOME ?= $(wildcard /usr/local/cuda)
export CUDA_HOME
export MAX_JOBS ?= 2
BENCH_ARGS ?=

.PHONY: test bench build clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

build: $(VENV)/.built

test: $(VENV)/.built
	$(PY) -m pytest -q --durations=15 tests

bench: $(VENV)/.built
	$(PY) -m albef_fast.bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info albef_fast/*.so $(VENV)/.built
