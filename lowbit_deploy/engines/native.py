"""Where lowbit's native libraries (the CUDA kernel library, the C++ TensorRT plugin libraries) are found.

Two homes: an installed package carries copies in ``lowbit_deploy/_native/`` (the wheel build puts them there, see
setup.py), a source checkout builds them into ``plugins/build/`` (``make kernels`` / ``make plugins``). Imports only
pathlib, so resolving a path costs nothing at ``import lowbit_deploy``.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# Must match NATIVE_PACKAGE_DIR in setup.py (the wheel layout); tests/unit/test_wheel.py checks both ends.
NATIVE_DIR = PACKAGE_DIR / "_native"
PLUGINS_DIR = PACKAGE_DIR.parent / "plugins"
CHECKOUT_BUILD_DIR = PLUGINS_DIR / "build"


def installed_library(name: str, native_dir: Path = NATIVE_DIR) -> Path | None:
    """The installed package's copy of library ``name`` (None in a source checkout or a wheel built without nvcc)."""
    path = native_dir / name
    return path if path.is_file() else None
