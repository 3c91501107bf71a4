"""Deliberate, minimal corruptions of an exported model, to prove that validation catches them.

A gate is only worth what it catches: each mutation here is the smallest change of its kind that a packing or
export bug could make to one quantized layer -- one code moved to its neighbouring level, one scale moved by one
fp16 ulp, one bias moved by a relative 1e-3 (about one fp16 ulp). ``benchmarks/mutation.py`` applies every kind to
every quantized layer and counts how many ``validate`` catches; the test suite runs a reduced version.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..export.lowbit_ops import OP_DOMAIN, OP_TYPE
from ..quant.packing import PackingFormat, pack_codes, unpack_codes

# The exporter names a layer's initializers after its state-dict keys under the DeployedUNet wrapper.
INITIALIZER_PREFIX = "unet."
BIAS_RELATIVE_CHANGE = 1e-3


class MutationKind(str, Enum):
    CODE = "code"    # one packed code moved to a neighbouring level
    SCALE = "scale"  # one per-channel scale moved by one fp16 ulp
    BIAS = "bias"    # one bias value moved by a relative 1e-3 (at least one ulp of its stored type)


@dataclass(frozen=True)
class Mutation:
    layer: str
    kind: MutationKind
    detail: str


def quantized_layer_names(model: onnx.ModelProto) -> list[str]:
    """Layers decoded by a ``lowbit::UnpackDequantize`` node, in graph order."""
    names = []
    for node in model.graph.node:
        if node.domain == OP_DOMAIN and node.op_type == OP_TYPE:
            packed = node.input[0]
            names.append(packed[len(INITIALIZER_PREFIX):-len(".packed")])
    return names


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto | None:
    return next((tensor for tensor in model.graph.initializer if tensor.name == name), None)


def _replace(model: onnx.ModelProto, tensor: onnx.TensorProto, values: np.ndarray) -> None:
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def _unpack_node(model: onnx.ModelProto, layer: str) -> onnx.NodeProto:
    packed = f"{INITIALIZER_PREFIX}{layer}.packed"
    node = next((n for n in model.graph.node if n.domain == OP_DOMAIN and n.input and n.input[0] == packed), None)
    if node is None:
        raise ValueError(f"no {OP_DOMAIN}::{OP_TYPE} node reads {packed}")
    return node


def _packing_format(attributes: dict) -> PackingFormat:
    if attributes["plugin_version"] == b"2":
        return PackingFormat.BITSTREAM
    return {8: PackingFormat.INT8_WORDS, 32: PackingFormat.INT32_WORDS}[attributes["word_bits"]]


def _mutate_code(model: onnx.ModelProto, layer: str, rng: np.random.Generator) -> str | None:
    node = _unpack_node(model, layer)
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    fmt, levels = _packing_format(attributes), attributes["levels"]
    tensor = _initializer(model, node.input[0])
    words = numpy_helper.to_array(tensor)
    numel = int(np.prod(attributes["shape"]))
    codes = unpack_codes(words, levels, fmt, numel).copy()
    index = int(rng.integers(numel))
    old = int(codes[index])
    codes[index] = old + 1 if old + 1 < levels else old - 1
    _replace(model, tensor, pack_codes(codes, levels, fmt).astype(words.dtype))
    return f"code {index}: {old} -> {int(codes[index])} (of {levels} levels, {fmt.value})"


def _mutate_scale(model: onnx.ModelProto, layer: str, rng: np.random.Generator) -> str | None:
    tensor = _initializer(model, f"{INITIALIZER_PREFIX}{layer}.scale")
    scales = numpy_helper.to_array(tensor).copy()
    channel = int(rng.integers(scales.size))
    old = scales[channel]
    scales[channel] = np.nextafter(old, np.array(np.inf, dtype=scales.dtype))
    _replace(model, tensor, scales)
    return f"scale of channel {channel}: {float(old)!r} -> {float(scales[channel])!r} (one {scales.dtype} ulp)"


def _bias_initializer(model: onnx.ModelProto, layer: str) -> onnx.TensorProto | None:
    # fp16 float storage keeps the bias behind a parametrization; fp32 storage keeps its plain name.
    for name in (f"{layer}.parametrizations.bias.original", f"{layer}.bias"):
        tensor = _initializer(model, INITIALIZER_PREFIX + name)
        if tensor is not None:
            return tensor
    return None


def _mutate_bias(model: onnx.ModelProto, layer: str, rng: np.random.Generator) -> str | None:
    tensor = _bias_initializer(model, layer)
    if tensor is None:
        return None
    bias = numpy_helper.to_array(tensor).copy()
    nonzero = np.flatnonzero(bias)
    if nonzero.size == 0:
        return None
    index = int(rng.choice(nonzero))
    old = bias[index]
    new = bias.dtype.type(old * (1 + BIAS_RELATIVE_CHANGE))
    if new == old:  # the relative change is below the stored type's resolution: move one ulp away from zero
        new = np.nextafter(old, np.array(np.copysign(np.inf, old), dtype=bias.dtype))
    bias[index] = new
    _replace(model, tensor, bias)
    return f"bias {index}: {float(old)!r} -> {float(new)!r}"


_MUTATORS: dict[MutationKind, Callable[[onnx.ModelProto, str, np.random.Generator], str | None]] = {
    MutationKind.CODE: _mutate_code,
    MutationKind.SCALE: _mutate_scale,
    MutationKind.BIAS: _mutate_bias,
}


def mutate(model: onnx.ModelProto, layer: str, kind: MutationKind, seed: int = 0) -> Mutation | None:
    """Apply one mutation of ``kind`` to ``layer`` of ``model`` in place (the position drawn from ``seed``); None
    when the layer has nothing of that kind (e.g. no bias, or an all-zero bias)."""
    detail = _MUTATORS[MutationKind(kind)](model, layer, np.random.default_rng(seed))
    return None if detail is None else Mutation(layer, MutationKind(kind), detail)


__all__ = ["Mutation", "MutationKind", "mutate", "quantized_layer_names"]
