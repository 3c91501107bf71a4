"""Fixtures for engine-build tests: the C++ plugin library (skipped with the reason only where it cannot be built)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# Where `make plugins` looks for TensorRT headers when none are given (shared/third_party beside the checkout).
VENDORED_HEADERS = Path(__file__).resolve().parents[3] / "shared" / "third_party" / "tensorrt-oss"


@pytest.fixture(scope="session")
def cpp_plugin_library():
    """The checked ``liblowbit_plugins_trt11.so``. Skips where nvcc or cmake is missing (``make test`` then skips
    building it, with a note); where both exist a missing or stale library is a failure, not a skip."""
    from lowbit_deploy.engines.kernels import find_nvcc
    from lowbit_deploy.engines.plugin_library import check_plugin_library
    from lowbit_deploy.engines.tensorrt_import import tensorrt_backend
    from lowbit_deploy.errors import UserError

    try:
        return check_plugin_library(tensorrt_backend("tensorrt_rtx"))
    except UserError as error:
        if find_nvcc() is None or shutil.which("cmake") is None or not VENDORED_HEADERS.is_dir():
            pytest.skip(f"C++ plugin library unavailable (no nvcc, cmake or TensorRT headers to build it): {error}")
        pytest.fail(f"nvcc and cmake exist but the C++ plugin library is unusable: {error}")
