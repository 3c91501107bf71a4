# Two commands on a fresh machine: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv and install everything first; re-running skips what is already done.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned on purpose: on the project's machines and in CI pip takes this CPU wheel from local disk, while an unpinned
# `torch` would pull a multi-GB CUDA build. Elsewhere choose your build, e.g. a CPU wheel from PyTorch's index:
#   make test TORCH_SPEC="torch>=2.4" TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed-stamp
KERNELS := plugins/build/liblowbit_kernels.so
DEMO_RECIPE ?= recipes/tiny-w2-balanced.yaml
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup kernels demo test bench clean help

help:
	@echo "make demo   - set up, then run train -> export -> build -> validate on the embedded default ($(DEMO_DIR))"
	@echo "make test   - set up, build the CUDA kernels (if nvcc exists), run the test suite"
	@echo "make bench  - size, QAT-cost and quality benchmarks (prints ratios)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[tensorrt-rtx,dev]"
	touch $(STAMP)

setup: $(STAMP)

# The CUDA kernel library (host reference path + GPU kernels behind a C ABI). Skipped, with a note, without nvcc:
# everything but the kernel tests and engine execution works without it.
kernels:
	@if command -v $${NVCC:-nvcc} >/dev/null 2>&1; then $(MAKE) --no-print-directory -C plugins; \
	else echo "note: nvcc not found; CUDA kernel library not built (kernel tests will skip)"; fi

demo: setup kernels
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/lowbit-deploy run $(DEMO_RECIPE) --out $(DEMO_DIR)

test: setup kernels
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: setup kernels
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) plugins/build runs
