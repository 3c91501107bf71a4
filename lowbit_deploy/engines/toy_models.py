"""Tiny ONNX models with ``lowbit::UnpackDequantize`` and ``lowbit::QuantizeDequantizeActivation`` nodes, for build
tests and smoke checks of a TensorRT install.

Built by hand with ``onnx.helper`` so the build stage can be tested without the export stage. Each weight gets the
node and model-local function the export stage emits (lowbit_deploy/export/lowbit_ops.py), so the file also runs
in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..export.lowbit_ops import OP_TYPE, PackedWeight, attach_function, make_initializers, make_node
from ..export.onnx_export import IR_VERSION
from ..quant import packing

OPSET = 17


def random_weight(name: str, shape: tuple[int, ...], levels: int, fmt: packing.PackingFormat,
                  rng: np.random.Generator) -> PackedWeight:
    """A packed weight with random codes on a grid of ``levels`` centred on 0 and random positive fp16 scales."""
    q = rng.integers(0, levels, size=shape) - levels // 2
    scale = (rng.random(shape[0]) * 0.1 + 0.01).astype(np.float16)
    return PackedWeight.from_integers(name, q, -(levels // 2), levels, scale, fmt)


def conv_chain_model(weights: list[PackedWeight], input_shape: tuple[int, int, int, int]) -> onnx.ModelProto:
    """x -> Conv(w0) -> Relu -> Conv(w1) -> ... -> y, every weight decoded by an UnpackDequantize node ("same" pads)."""
    nodes, initializers = [], []
    current = "x"
    for index, weight in enumerate(weights):
        kernel = weight.shape[2]
        decoded = f"{weight.name}.weight"
        nodes.append(make_node(weight, decoded))
        initializers += list(make_initializers(weight))
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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    attach_function(model, OPSET)
    model.ir_version = IR_VERSION
    return model


def plain_conv_model(weights: list[PackedWeight], input_shape: tuple[int, int, int, int],
                     dtype: type[np.floating] = np.float32) -> onnx.ModelProto:
    """The same chain with dense weights (float32, or float16 with float16 I/O) as initializers: the baseline for
    engine-size comparisons."""
    model = conv_chain_model(weights, input_shape)
    graph = model.graph
    keep = [node for node in graph.node if node.op_type != OP_TYPE]
    dense = [numpy_helper.from_array(w.dequantized().astype(dtype), f"{w.name}.weight") for w in weights]
    element_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for value in (*graph.input, *graph.output):
        value.type.tensor_type.elem_type = element_type
    del graph.node[:]
    graph.node.extend(keep)
    del graph.initializer[:]
    graph.initializer.extend(dense)
    del model.functions[:]
    del model.opset_import[1:]
    return model


def activation_model(input_shape: tuple[int, ...], steps: int, qmin: int, qmax: int, with_zero_point: bool,
                     rng: np.random.Generator, dynamic_batch: bool = False) -> onnx.ModelProto:
    """x, step_index -> Relu -> ``lowbit::QuantizeDequantizeActivation`` (scale [steps], optional zero point as
    initializers) -> y: the node as engines/activation_plugin.node_attributes describes it, without the export
    stage's local function (only TensorRT runs this model)."""
    from .activation_plugin import OP_NAME, node_attributes

    batch = "batch" if dynamic_batch else input_shape[0]
    scale = (rng.random(steps) * 0.2 + 0.01).astype(np.float32)
    initializers = [numpy_helper.from_array(scale, "act.scale")]
    inputs = ["relu", "act.scale", "step_index"]
    if with_zero_point:
        zero_point = rng.integers(qmin, qmax + 1, size=steps).astype(np.float32)
        initializers.append(numpy_helper.from_array(zero_point, "act.zero_point"))
        inputs.append("act.zero_point")
    nodes = [helper.make_node("Relu", ["x"], ["relu"], name="relu"),
             helper.make_node(OP_NAME, inputs, ["y"], name="act.qdq", domain="lowbit",
                              **node_attributes(qmin, qmax))]
    shape = [batch, *input_shape[1:]]
    graph = helper.make_graph(
        nodes, "lowbit_activation_toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("step_index", TensorProto.INT64, [batch])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("lowbit", 1)])
    model.ir_version = IR_VERSION
    return model
