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
DEMO_RECIPE ?= recipes/tiny-bitsfusion-1.99.yaml
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=
# Extra CMake arguments of the C++ plugin build, e.g. CMAKE_ARGS=-DTensorRT_INCLUDE_DIR=/usr/include/x86_64-linux-gnu
CMAKE_ARGS ?=

.PHONY: setup kernels plugins cpp-app demo test bench clean help

help:
	@echo "make demo   - set up, then run train -> export -> build -> validate on the embedded default ($(DEMO_DIR))"
	@echo "make test   - set up, build the CUDA kernels and C++ plugin libraries (if nvcc exists), run the tests"
	@echo "make bench  - size, QAT-cost and quality benchmarks (prints ratios)"
	@echo "make cpp-app - the C++ example that runs an engine (examples/cpp_app/build/lowbit_cpp_app)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[tensorrt-rtx,dev,text]"
	touch $(STAMP)

setup: $(STAMP)

# The CUDA kernel library (host reference path + GPU kernels behind a C ABI). Skipped, with a note, without nvcc:
# everything but the kernel tests and engine execution works without it.
kernels:
	@if command -v $${NVCC:-nvcc} >/dev/null 2>&1; then $(MAKE) --no-print-directory -C plugins; \
	else echo "note: nvcc not found; CUDA kernel library not built (kernel tests will skip)"; fi

# The C++ TensorRT plugin libraries (plugins/CMakeLists.txt -> plugins/build/liblowbit_plugins_trt{11,10}.so), which
# `lowbit-deploy build` loads by default. Skipped, with a note, without nvcc or cmake: builds then need
# `--plugin python`, and the C++ plugin tests skip.
plugins:
	@if ! command -v $${NVCC:-nvcc} >/dev/null 2>&1; then \
		echo "note: nvcc not found; C++ plugin library not built (use --plugin python; its tests will skip)"; \
	elif ! command -v cmake >/dev/null 2>&1; then \
		echo "note: cmake not found; C++ plugin library not built (use --plugin python; its tests will skip)"; \
	elif [ -z "$(CMAKE_ARGS)" ] && [ ! -d ../shared/third_party/tensorrt-oss ]; then \
		echo "note: no TensorRT headers (../shared/third_party/tensorrt-oss); pass CMAKE_ARGS=-DTensorRT_INCLUDE_DIR=..."; \
	else $(MAKE) --no-print-directory -C plugins tensorrt NVCC=$${NVCC:-nvcc} CMAKE_ARGS="$(CMAKE_ARGS)"; fi

# The C++ example app (examples/cpp_app): links the TensorRT-RTX library of the .venv's tensorrt-rtx wheel and the
# CUDA toolkit's static cudart. Skipped, with a note, without a C++ compiler, cmake, the CUDA toolkit or TensorRT
# headers. Not a dependency of `test`: tests/trt/test_cpp_app.py compiles its own copy (and skips where it cannot).
CPP_APP_CMAKE_ARGS ?=
cpp-app: setup
	@if ! command -v $${CXX:-c++} >/dev/null 2>&1; then \
		echo "note: no C++ compiler ($${CXX:-c++}); examples/cpp_app not built"; \
	elif ! command -v cmake >/dev/null 2>&1; then \
		echo "note: cmake not found; examples/cpp_app not built"; \
	elif ! command -v $${NVCC:-nvcc} >/dev/null 2>&1 && [ ! -d /usr/local/cuda/include ]; then \
		echo "note: no CUDA toolkit (nvcc or /usr/local/cuda); examples/cpp_app not built"; \
	elif [ -z "$(CPP_APP_CMAKE_ARGS)" ] && [ ! -d ../shared/third_party/tensorrt-oss/11.1/include ]; then \
		echo "note: no TensorRT headers (../shared/third_party/tensorrt-oss/11.1); pass CPP_APP_CMAKE_ARGS=\"-DTensorRT_INCLUDE_DIR=... -DTensorRT_LIBRARY=...\""; \
	else cmake -S examples/cpp_app -B examples/cpp_app/build -DLOWBIT_VENV=$(abspath $(VENV)) $(CPP_APP_CMAKE_ARGS) >/dev/null \
		&& cmake --build examples/cpp_app/build -j 2 \
		&& echo "built examples/cpp_app/build/lowbit_cpp_app (run: see README, 'Embedding an engine in your app')"; fi

# Without the C++ plugin library the demo builds its engine with the Python plugin (same engine bytes).
demo: setup kernels plugins
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/lowbit-deploy run $(DEMO_RECIPE) --out $(DEMO_DIR) \
		$$(test -f plugins/build/liblowbit_plugins_trt11.so || echo --plugin python)

test: setup kernels plugins
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: setup kernels plugins
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) plugins/build runs
