"""Runtimes for exported artifacts behind one interface: :func:`open_runner` gives a :class:`Runner` for
``model.onnx`` (ONNX Runtime, CPU) or ``model.engine`` (TensorRT, GPU), and :class:`DeployedUNet2D` puts either behind
diffusers' ``UNet2DConditionModel`` call.

Importing this package loads nothing heavy: the names below resolve on first access, and the submodules import
onnxruntime, tensorrt and diffusers when a runner is opened.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Runner": "runners",
    "RunnerOptions": "runners",
    "BACKENDS": "runners",
    "BackendUnavailableError": "runners",
    "EngineRunner": "runners",
    "TorchRunner": "runners",
    "open_runner": "runners",
    "register_backend": "runners",
    "OrtRunner": "ort",
    "read_signature": "ort",
    "DeployedUNet2D": "diffusers_unet",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
