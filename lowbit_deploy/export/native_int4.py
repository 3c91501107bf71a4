"""Native INT4 export: a signed 4-bit layer as an INT4 initializer + standard ``DequantizeLinear`` (zero point 0).

TensorRT runs such layers with its own INT4 weight path instead of the ``lowbit::UnpackDequantize`` plugin. Engine
bytes per extra weight, TensorRT-RTX 1.7, 512-wide layers (tests/trt/test_native_int4_engine.py): Conv 3x3 0.50,
Linear 0.56, float32 4.0. The layout, as ONNX defines it:

* codes: ``TensorProto.INT4``, two's complement in ``[-8, 7]``, two codes per byte, the first in the low nibble
  (``raw_data``: TensorRT's parser wants raw bytes, not a value list). Zero point: none, i.e. 0 (TensorRT rejects
  any other).
* Conv2d: codes ``[Cout, Cin, kh, kw]``, scale ``[Cout]``, ``axis=0`` (per output channel). Blocked DQ on a 4-D
  weight is refused by TensorRT ("blocking dimension must be the last or second to last"), per-channel works.
* Linear: codes ``[out, in]`` (torch's layout), scale ``[out, in / block]``, ``axis=1, block_size=block``: blocked
  along the input dimension K, the layout of TensorRT's INT4 GEMM (a per-channel DQ on a MatMul weight also builds,
  but measured 0.63 engine bytes per weight against 0.52 blocked, over a float32 build of 4 MatMuls 512x512). Our
  scales are per output channel, so the blocked scale is that scale repeated for every block (``4 / block`` bytes
  per weight). The graph is F.linear's own: ``Gemm(transB=1)`` for 2-D inputs, ``MatMul(x, Transpose(DQ))``
  otherwise. Not the ``[in, out]``, ``axis=0`` layout feeding MatMul directly: ONNX Runtime fuses that into
  ``com.microsoft::MatMulNBits``, which by default quantizes the activations to int8 (measured 72 dB SQNR on the
  tiny UNet instead of ~126), so the file would no longer compute what the torch model does.

Scales are float32 because ``DequantizeLinear``'s output has the scale's type: fp16 scales would round
``q * scale`` in fp16 (an 11-bit significand times a 4-bit integer needs up to 15 bits), and TensorRT-RTX refuses
an fp16 weight feeding an fp32 MatMul. The float32 scale holds the trained fp16 scale exactly, and
``float32(q) * float32(scale_fp16)`` is exact in float32, so ONNX Runtime, TensorRT and the torch reference below
decode the very same weight -- the one the packed format decodes too.

Int4 ``DequantizeLinear`` needs opset 21, and the TorchScript exporter stops at 20: layers are traced at 20 with
int8 codes, then :func:`finalize_native_int4` repacks the codes as INT4 and declares opset 21, after checking that
every op of the graph means the same at 21.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..quant.fake_quant import QUANTIZABLE_LAYERS, QuantizedLayer, quantized_input, reclassed
from ..quant.plan import EXPORT_GRID, NATIVE_INT4_MIN_BLOCK, WeightExport

NATIVE_INT4_OPSET = 21
# The TorchScript exporter's highest opset; the traced graph is declared NATIVE_INT4_OPSET afterwards.
TRACE_OPSET = 20
# Widest block first: 128 measured 0.517 engine bytes per weight, 64 0.524, 32 0.540, 16 0.571 (4 MatMuls 512x512
# over a float32 build); 256 saves only 0.004 more and no longer divides SD's 320-wide layers.
LINEAR_BLOCK_SIZES = (128, 64, 32, NATIVE_INT4_MIN_BLOCK)
# Ops whose opset-21 version differs from their opset-20 one only by accepting more types (int4/uint4/float8);
# GroupNormalization-21, for one, changed its semantics and is not listed.
_SAME_MEANING_AT_21 = frozenset({"Cast", "CastLike", "Constant", "ConstantOfShape", "DequantizeLinear", "Flatten",
                                 "Identity", "If", "Loop", "Pad", "QuantizeLinear", "Reshape", "Scan", "Shape",
                                 "Size", "Squeeze", "Transpose", "Unsqueeze"})
_INT4 = EXPORT_GRID[WeightExport.NATIVE_INT4]
CODES = "int4_codes"
SCALE = "scale"


def linear_block_size(in_features: int) -> int:
    block = next((size for size in LINEAR_BLOCK_SIZES if in_features % size == 0), None)
    if block is None:
        raise UserError(f"a native INT4 Linear needs in_features divisible by {NATIVE_INT4_MIN_BLOCK}, not "
                        f"{in_features}; export this layer packed")
    return block


class DequantizeInt4Function(torch.autograd.Function):
    """Value: the torch reference decode; ONNX: one standard ``DequantizeLinear`` (codes repacked by finalize)."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scale: torch.Tensor, layer: "NativeInt4Layer") -> torch.Tensor:
        return layer.weight_value.view_as(layer.weight_value)  # not a copy: see UnpackDequantizeFunction.forward

    @staticmethod
    def symbolic(g, codes, scale, layer: "NativeInt4Layer"):
        attributes = {f"{name}_i": value for name, value in layer.dequantize_attributes.items()}
        output = g.op("DequantizeLinear", codes, scale, **attributes)
        output.setType(scale.type().with_dtype(torch.float32).with_sizes(list(layer.weight_value.shape)))
        return output


class NativeInt4Layer(nn.Module):
    """Mixin of the native INT4 layers: int8-held codes and float32 scales as buffers, the weight decoded once."""

    weight_value: torch.Tensor          # exactly what DequantizeLinear outputs: float32(q) * float32(scale_fp16)
    dequantize_attributes: dict[str, int]

    def decoded_weight(self) -> torch.Tensor:
        return DequantizeInt4Function.apply(self.int4_codes, self.scale, self)

    @staticmethod
    def layout(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        """Integer weight ``q`` ([out, ...]) and per-channel ``scale`` -> stored codes, stored scale, DQ attributes."""
        raise NotImplementedError


class NativeInt4Conv2d(nn.Conv2d, NativeInt4Layer):
    @staticmethod
    def layout(q, scale):
        return q, scale, {"axis": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(quantized_input(self, x), self.decoded_weight(), self.bias)


class NativeInt4Linear(nn.Linear, NativeInt4Layer):
    @staticmethod
    def layout(q, scale):
        block = linear_block_size(q.shape[1])
        return q, scale[:, None].repeat(1, q.shape[1] // block), {"axis": 1, "block_size": block}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantized_input(self, x), self.decoded_weight(), self.bias)


NATIVE_INT4_LAYERS: dict[type[nn.Module], type[NativeInt4Layer]] = {nn.Conv2d: NativeInt4Conv2d,
                                                                      nn.Linear: NativeInt4Linear}


def native_int4_layer(name: str, layer: QuantizedLayer) -> NativeInt4Layer:
    """The deployed native-INT4 twin of a fake-quantized signed 4-bit layer (shares its bias and hyper-parameters)."""
    quantizer = layer.weight_quantizer
    if quantizer.grid != _INT4:
        raise UserError(f"layer {name} was trained on the {quantizer.grid.describe()}; native INT4 stores only the "
                        f"{_INT4.describe()} - the checkpoint and its plan disagree, re-run training")
    float_type = next(base for base in type(layer).__mro__[1:] if base in QUANTIZABLE_LAYERS)
    q = quantizer.integer_weight(layer.latent_weight()).to(torch.int8)
    scale = quantizer.deployed_scale()  # float32 holding the fp16 scale exactly (see the module docstring)
    module_type = NATIVE_INT4_LAYERS[float_type]
    codes, stored_scale, attributes = module_type.layout(q, scale)
    module = reclassed(module_type, layer)
    del module._modules["weight_quantizer"]
    del module._parameters["weight"]
    module.register_buffer(CODES, codes)
    module.register_buffer(SCALE, stored_scale.contiguous())
    module.dequantize_attributes = attributes
    module.weight_value = codes.to(torch.float32) * scale.reshape(-1, *([1] * (q.dim() - 1)))
    return module


def native_int4_layers(model: nn.Module) -> dict[str, NativeInt4Layer]:
    """Every native INT4 layer of ``model`` by its module path (the prefix of its initializer names)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, NativeInt4Layer)}


def int4_initializer(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """``codes`` (integers in [-8, 7]) as an INT4 initializer: two per byte, the first in the low nibble."""
    flat = codes.reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < _INT4.qmin or flat.max() > _INT4.qmax):
        raise ValueError(f"{name}: codes outside [{_INT4.qmin}, {_INT4.qmax}] do not fit INT4")
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    raw = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
    return onnx.helper.make_tensor(name, onnx.TensorProto.INT4, list(codes.shape), raw, raw=True)


def _check_same_meaning_at_21(model: onnx.ModelProto) -> None:
    changed = sorted({node.op_type for node in model.graph.node if node.domain in ("", "ai.onnx")
                      and onnx.defs.get_schema(node.op_type, NATIVE_INT4_OPSET).since_version
                      != onnx.defs.get_schema(node.op_type, TRACE_OPSET).since_version}
                     - _SAME_MEANING_AT_21)
    if changed:
        raise RuntimeError(f"the traced graph uses {changed}, whose opset-{NATIVE_INT4_OPSET} meaning differs from "
                           f"opset {TRACE_OPSET}; native INT4 export cannot declare opset {NATIVE_INT4_OPSET}")


def finalize_native_int4(model: onnx.ModelProto, layers: dict[str, NativeInt4Layer]) -> None:
    """Repack the traced int8 codes of ``layers`` as INT4 initializers and declare opset 21 (in place)."""
    from onnx import numpy_helper

    _check_same_meaning_at_21(model)
    by_name = {tensor.name: index for index, tensor in enumerate(model.graph.initializer)}
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    for layer in layers:
        name = f"{layer}.{CODES}"
        if name not in by_name or consumers.get(name) != {"DequantizeLinear"}:
            raise RuntimeError(f"the traced graph has no DequantizeLinear over initializer {name}")
        codes = numpy_helper.to_array(model.graph.initializer[by_name[name]])
        model.graph.initializer[by_name[name]].CopyFrom(int4_initializer(name, codes))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = NATIVE_INT4_OPSET


def int4_storage(model: onnx.ModelProto, layers: dict[str, NativeInt4Layer]) -> dict[str, Any]:
    """Weights, stored bytes (INT4 codes + float32 scales) and bytes per weight of the native INT4 layers."""
    from onnx import numpy_helper

    # INT4 codes are measured as stored (raw bytes, two per byte); any other tensor by its array size.
    sizes = {tensor.name: len(tensor.raw_data) or numpy_helper.to_array(tensor).nbytes
             for tensor in model.graph.initializer}
    weights = sum(int(module.int4_codes.numel()) for module in layers.values())
    stored = sum(sizes.get(f"{layer}.{CODES}", 0) + sizes.get(f"{layer}.{SCALE}", 0) for layer in layers)
    return {"native_int4_layers": len(layers), "native_int4_weights": weights, "native_int4_bytes": stored,
            "native_int4_bytes_per_weight": stored / weights if weights else None}


__all__ = ["NATIVE_INT4_LAYERS", "NATIVE_INT4_OPSET", "NativeInt4Layer", "finalize_native_int4", "int4_initializer",
           "int4_storage", "linear_block_size", "native_int4_layer", "native_int4_layers"]
