"""Runtimes for exported artifacts: ONNX Runtime (``ort``) and TensorRT engines (``trt``).

Submodules import their heavy dependencies lazily; importing this package loads nothing but the package itself.
"""
