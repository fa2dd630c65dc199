# Everything a newcomer needs: `make demo` and `make test` on a fresh machine (Python 3.10+, gcc).
# The virtual environment and the extension build are made on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEV_DEPS := numpy scipy pytest hypothesis pytest-benchmark scikit-learn rich matplotlib mnist1d setuptools wheel ninja
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py
LOG ?= gpu-logs

.PHONY: demo test test-fast bench build build-cpu cuda-build-check aarch64-build-check gpu-check clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(DEV_DEPS)
	touch $@

# --no-build-isolation: compile against the torch in the venv (isolation would fetch another one).
$(VENV)/.built: $(VENV)/.deps $(CSRC)
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

# CPU-only build for fast iteration (skips the CUDA sources even with a CUDA torch).
build-cpu: $(VENV)/.deps
	UNLEARN_EXT_CUDA=0 MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(VENV)/.built

demo: build
	$(VENV)/bin/unlearn-ext demo

test: build
	$(PY) -m pytest tests -q

test-fast: build
	$(PY) -m pytest tests -q -m "not slow"

# The peers (opacus, bitsandbytes, torchao) install pinned to the venv's torch so pip cannot swap it.
BENCH_DEPS := opacus bitsandbytes torchao
$(VENV)/.bench-deps: $(VENV)/.deps
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(PY) -m pip install -q -c $(VENV)/torch-pin.txt $(BENCH_DEPS)
	touch $@

# Every file in benchmarks/: the timed benchmarks and the ones that time themselves and only record
# notes (distributed runs); --benchmark-only would skip the latter.
bench: build $(VENV)/.bench-deps
	$(PY) -m pytest benchmarks -q -s

# Compiles the CUDA sources with nvcc against a CUDA build of torch (no GPU needed).
cuda-build-check:
	bash scripts/check_cuda_build.sh

# Compiles the CPU sources for aarch64 with a cross compiler (installed with apt-get when missing).
aarch64-build-check: $(VENV)/.deps
	bash scripts/check_aarch64_build.sh $(PY)

# On a GPU machine with its own torch: build, CUDA tests, compute-sanitizer, GPU benchmarks.
gpu-check:
	bash scripts/gpu_check.sh $(LOG)

clean:
	rm -rf build unlearn_ext/_C*.so *.egg-info
