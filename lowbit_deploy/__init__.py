"""lowbit-deploy: 1-4-bit weight quantization of diffusion UNets, packed ONNX export, TensorRT plugins, parity.

Importing this package is cheap on purpose: no torch, TensorRT, CUDA or ONNX Runtime is loaded until a stage runs.
"""

__version__ = "0.1.0"
