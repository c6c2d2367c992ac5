# `make demo` and `make test` work on a fresh machine: they create .venv, install the
# CPU torch wheel first (so pip never pulls a multi-GB CUDA build), then the package.
# On a GPU machine override the pin, e.g. `make test TORCH_SPEC=torch`.
PYTHON ?= python3
WHEEL_DIR ?= .whl
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megatron-mile-installed

.PHONY: setup demo test bench gpu-wheels

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# CE vs focal vs MiLe on the demo data: train, convert, lm-eval, frequency buckets, table and pictures.
demo: $(STAMP)
	PYTHON=$(PY) bash examples/demo.sh

# Two pytest-xdist workers, one test file each at a time: a file's shared fixtures (trained runs,
# the README's scratch checkout) are built once, and the README's blocks run in order.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: $(STAMP)
	$(PY) benchmarks/loss_bench.py

# megatron-core 0.16.1 and zstandard as Python 3.12 wheels in .whl/, for a GPU machine that has torch
# but not these and cannot download: benchmarks/gpu_smoke.sh installs them from there (--wheel-dir).
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(WHEEL_DIR) megatron-core==0.16.1 zstandard==0.25.0
