# The README's first two commands: `make bench` and `make test`. Each creates
# .venv/ on first use, installs torch and the tools, builds the extension
# (CPU kernels always; CUDA kernels whenever torch is a CUDA build and nvcc is
# found) and runs. `make test` includes the wheel check (tests/test_wheel.py
# runs tools/check_wheel.sh: after the build it only links, about a minute);
# `make check-wheel` runs that check alone. The suite runs on TEST_JOBS
# processes (pytest-xdist; default 2, CI's cores), each test file in one of
# them (--dist loadfile): a module's fixtures (the one spawn of the
# distributed ranks) are set up once, and the large-tensor tests of one file
# never run at the same time.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# torch.utils.cpp_extension otherwise guesses /usr/local and fails on -lcudart.
ifeq ($(CUDA_HOME),)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME := /usr/local/cuda
endif
endif
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
# Extra pytest/bench arguments: make test ARGS="-k adam", make bench ARGS="--cases large".
ARGS ?=
TEST_JOBS ?= 2

.PHONY: all venv build test bench wheel check-wheel info clean

all: build

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.11" triton numpy pytest ninja setuptools wheel matplotlib lion-pytorch hypothesis scikit-learn pytest-xdist
	touch $@

venv: $(VENV)/.deps

# Always rebuilds (ninja keeps it incremental inside one build): every CUDA
# source compiles in every `make test` run.
build: venv
	$(PY) -m pip install -q --no-build-isolation -e .

test: build
	$(PY) -m pytest -q --durations=15 -n $(TEST_JOBS) --dist loadfile tests $(ARGS)

bench: build
	$(PY) benchmarks/run.py $(ARGS)

info: build
	$(PY) -m pyoptim info

# A wheel for the archs in TORCH_CUDA_ARCH_LIST, into dist/; its metadata pins
# the torch release it is built against.
wheel: venv
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

# The wheel built, installed into a fresh venv outside the tree, smoke-tested there.
check-wheel: build
	PYTHON=$(PY) bash tools/check_wheel.sh

clean:
	rm -rf build dist *.egg-info pyoptim/*.so pyoptim/_build_info.py
