"""Tiny ONNX models with ``lowbit::UnpackDequantize`` nodes, for build tests and smoke checks of a TensorRT install.

Built by hand with ``onnx.helper`` so the build stage can be tested without the export stage. Each weight gets the
node attributes of docs/ops/UnpackDequantize_v1.md (plugin_namespace/plugin_version included) and, when the export
stage is installed, its model-local reference function, so the file also runs in ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..quant import packing
from .plugin import OP_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

OPSET = 17


@dataclass(frozen=True)
class ToyWeight:
    """One packed conv weight and the float32 weight it decodes to (the reference)."""

    name: str
    packed_words: np.ndarray
    scale_fp16: np.ndarray
    levels: int
    qmin: int
    fmt: packing.PackingFormat
    shape: tuple[int, ...]

    @property
    def codes_per_word(self) -> int:
        return packing.codes_per_word(self.levels, self.fmt.word_bits)

    def dequantized(self) -> np.ndarray:
        codes = packing.unpack_codes(self.packed_words, self.levels, self.fmt, int(np.prod(self.shape)))
        q = (codes + self.qmin).astype(np.float32).reshape(self.shape[0], -1)
        return (q * self.scale_fp16.astype(np.float32)[:, None]).reshape(self.shape)


def random_weight(name: str, shape: tuple[int, ...], levels: int, fmt: packing.PackingFormat,
                  rng: np.random.Generator) -> ToyWeight:
    codes = rng.integers(0, levels, size=shape)
    scale = (rng.random(shape[0]) * 0.1 + 0.01).astype(np.float16)
    qmin = -(levels // 2)
    return ToyWeight(name, packing.pack_codes(codes, levels, fmt), scale, levels, qmin, fmt, shape)


def _attach_reference_function(model: onnx.ModelProto) -> None:
    # TensorRT does not need the function when the creator is registered (measured: the build succeeds without it),
    # but ONNX Runtime and onnx.checker do; the export stage owns the one real definition, so reuse it when present.
    try:
        from ..export.lowbit_ops import make_function
    except ImportError:
        return
    model.functions.append(make_function(OPSET))


def unpack_node(weight: ToyWeight, output: str) -> onnx.NodeProto:
    return helper.make_node(
        OP_NAME, [f"{weight.name}.packed", f"{weight.name}.scale"], [output], name=f"{weight.name}.unpack",
        domain=PLUGIN_NAMESPACE, levels=weight.levels, qmin=weight.qmin, word_bits=weight.fmt.word_bits,
        codes_per_word=weight.codes_per_word, shape=list(weight.shape), plugin_namespace=PLUGIN_NAMESPACE,
        plugin_version=PLUGIN_VERSION)


def conv_chain_model(weights: list[ToyWeight], input_shape: tuple[int, int, int, int]) -> onnx.ModelProto:
    """x -> Conv(w0) -> Relu -> Conv(w1) -> ... -> y, every weight decoded by an UnpackDequantize node ("same" pads)."""
    nodes, initializers = [], []
    current = "x"
    for index, weight in enumerate(weights):
        kernel = weight.shape[2]
        decoded = f"{weight.name}.weight"
        nodes.append(unpack_node(weight, decoded))
        initializers += [numpy_helper.from_array(weight.packed_words, f"{weight.name}.packed"),
                         numpy_helper.from_array(weight.scale_fp16, f"{weight.name}.scale")]
        conv_out = "y" if index == len(weights) - 1 else f"conv{index}"
        nodes.append(helper.make_node("Conv", [current, decoded], [conv_out], name=f"conv{index}",
                                      pads=[kernel // 2] * 4))
        if conv_out != "y":
            nodes.append(helper.make_node("Relu", [conv_out], [f"relu{index}"], name=f"relu{index}"))
            current = f"relu{index}"
    batch, _, height, width = input_shape
    graph = helper.make_graph(
        nodes, "lowbit_toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, weights[-1].shape[0], height, width])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(PLUGIN_NAMESPACE, 1)])
    _attach_reference_function(model)
    model.ir_version = 10  # ONNX Runtime 1.31 rejects newer IR versions
    return model


def plain_conv_model(weights: list[ToyWeight], input_shape: tuple[int, int, int, int]) -> onnx.ModelProto:
    """The same chain with float32 weights as initializers (baseline for engine-size comparisons)."""
    model = conv_chain_model(weights, input_shape)
    graph = model.graph
    keep = [node for node in graph.node if node.op_type != OP_NAME]
    dense = [numpy_helper.from_array(w.dequantized(), f"{w.name}.weight") for w in weights]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.initializer[:]
    graph.initializer.extend(dense)
    del model.functions[:]
    del model.opset_import[1:]
    return model
