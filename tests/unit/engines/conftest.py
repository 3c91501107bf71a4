"""Fixtures for build-stage unit tests (CPU only)."""

from __future__ import annotations

import pytest

from lowbit_deploy.errors import UserError


@pytest.fixture(scope="session")
def kernel_library():
    """The loaded liblowbit_kernels.so (built with nvcc on first use); skipped with the reason when it cannot be."""
    from lowbit_deploy.engines.kernels import load_kernel_library

    try:
        return load_kernel_library()
    except UserError as error:
        pytest.skip(f"kernel library unavailable: {error}")
