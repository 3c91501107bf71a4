"""Build stage: CUDA kernel library, the TensorRT plugins ``lowbit::UnpackDequantize`` (v1, v2) and
``lowbit::QuantizeDequantizeActivation`` (v1), and engine builds.

Importing this package is cheap: TensorRT, Polygraphy and the CUDA library load only when a function needs them.
Public names are resolved lazily from the submodules listed below.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BuildReport": "engine",
    "build_engine": "engine",
    "count_plugin_layers": "engine",
    "ensure_kernel_library": "kernels",
    "load_kernel_library": "kernels",
    "unpack_dequantize_host": "kernels",
    "unpack_dequantize_cuda": "kernels",
    "unpack_dequantize_bitstream_host": "kernels",
    "unpack_dequantize_bitstream_cuda": "kernels",
    "quantize_dequantize_activation_host": "kernels",
    "quantize_dequantize_activation_cuda": "kernels",
    "ActivationFields": "activation_plugin",
    "node_attributes": "activation_plugin",
    "parse_activation_fields": "activation_plugin",
    "register_activation_plugin": "activation_plugin",
    "register_plugins": "plugin",
    "check_plugin_library": "plugin_library",
    "use_plugins": "plugin_library",
    "parse_fields": "plugin",
    "parse_fields_v2": "plugin",
    "UnpackDequantizeFields": "plugin",
    "UnpackDequantizeBitstreamFields": "plugin",
    "import_tensorrt": "tensorrt_import",
    "tensorrt_backend": "tensorrt_import",
}

__all__ = sorted([*_EXPORTS, "backend_unavailable_reason"])


def backend_unavailable_reason() -> str | None:
    """Why no engine can be built here (None when TensorRT or TensorRT-RTX and Polygraphy are installed).

    Imports nothing: it only looks the packages up, so callers can decide before paying for TensorRT.
    """
    from importlib.util import find_spec

    if find_spec("tensorrt") is None and find_spec("tensorrt_rtx") is None:
        return "TensorRT is not installed (pip install 'lowbit-deploy[tensorrt-rtx]')"
    if find_spec("polygraphy") is None:
        return "Polygraphy is not installed (pip install polygraphy)"
    return None


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
