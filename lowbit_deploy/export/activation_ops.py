"""ONNX emission of quantized activations (docs/ops/QuantizeDequantizeActivation_v1.md).

A deployed layer whose input is quantized holds a :class:`DeployedActivationQuantizer` as ``input_quantizer``. One
autograd Function carries both its torch value (the op's reference math on the stored tables) and its ONNX emission:

* a per-step table, an asymmetric grid, or fewer than 8 bits -> ``lowbit::QuantizeDequantizeActivation`` (inputs:
  the activation, the float32 scale table, the step index, the zero-point table for asymmetric grids), run by the
  model-local function here in any ONNX runtime and by the lowbit plugin in TensorRT;
* one constant scale, symmetric, 8 bits -> standard ``QuantizeLinear`` / ``DequantizeLinear`` (int8, zero point 0),
  which TensorRT runs natively (it quantizes activations at INT8, not below).

Models whose signature has no step index (no cached time, no per-step scale) feed the op a zero index per sample.
"""

from __future__ import annotations

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from ..quant.activation import ActivationQuantizer, StepContext, fake_quantize_activation
from ..quant.activation_grid import ActivationGrid
from .lowbit_ops import OP_DOMAIN, PLUGIN_NAMESPACE

ACTIVATION_OP_TYPE = "QuantizeDequantizeActivation"
ACTIVATION_OP_VERSION = 1
NATIVE_ACTIVATION_BITS = 8  # TensorRT's native activation Q/DQ (INT8)


def reference_value(x: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, zero_point: torch.Tensor | None,
                    qmin: int, qmax: int) -> torch.Tensor:
    """The op's math on the stored tables, by the training forward's own function (so deployed and trained values
    cannot drift; its straight-through rounding yields exactly ``round(v)``, with +0.0 for a rounded -0.0 as the op
    says)."""
    zero = None if zero_point is None else zero_point.index_select(0, rows)
    return fake_quantize_activation(x, scale.index_select(0, rows), zero, qmin, qmax)


class QuantizeDequantizeActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, rows, zero_point, quantizer: "DeployedActivationQuantizer"):
        return reference_value(x, scale, rows, zero_point, quantizer.qmin, quantizer.qmax)

    @staticmethod
    def symbolic(g, x, scale, rows, zero_point, quantizer: "DeployedActivationQuantizer"):
        if quantizer.native:
            # One constant scale: a scalar float32 scale and an int8 zero point of 0 (symmetric).
            scalar = g.op("Squeeze", scale, g.op("Constant", value_t=torch.tensor([0], dtype=torch.int64)))
            zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
            quantized = g.op("QuantizeLinear", x, scalar, zero)
            output = g.op("DequantizeLinear", quantized, scalar, zero)
        else:
            inputs = [x, scale, rows] + ([zero_point] if quantizer.zero_point is not None else [])
            output = g.op(f"{OP_DOMAIN}::{ACTIVATION_OP_TYPE}", *inputs, qmin_i=quantizer.qmin,
                          qmax_i=quantizer.qmax, plugin_namespace_s=PLUGIN_NAMESPACE,
                          plugin_version_s=str(ACTIVATION_OP_VERSION))
        output.setType(x.type())
        return output


class DeployedActivationQuantizer(nn.Module):
    """The stored tables of a trained :class:`ActivationQuantizer` and the step index to select by."""

    def __init__(self, trained: ActivationQuantizer, context: StepContext | None) -> None:
        super().__init__()
        if trained.per_step and context is None:
            raise ValueError("a per-step activation scale table needs the deployed graph's step index")
        self.grid: ActivationGrid = trained.grid
        self.register_buffer("act_scale", trained.deployed_scale().clone())
        zero_point = trained.deployed_zero_point()
        self.register_buffer("act_zero_point", zero_point.clone() if zero_point is not None else None)
        self.context = context if trained.per_step else None
        self.per_step = trained.per_step

    @property
    def qmin(self) -> int:
        return self.grid.qmin

    @property
    def qmax(self) -> int:
        return self.grid.qmax

    @property
    def zero_point(self) -> torch.Tensor | None:
        return self.act_zero_point

    @property
    def native(self) -> bool:
        """Exported as standard QuantizeLinear/DequantizeLinear (TensorRT's native INT8 path)."""
        return not self.per_step and self.grid.symmetric and self.grid.bits == NATIVE_ACTIVATION_BITS

    def extra_repr(self) -> str:
        kind = "QuantizeLinear/DequantizeLinear" if self.native else f"{OP_DOMAIN}::{ACTIVATION_OP_TYPE}"
        return f"{self.grid.describe()}, {self.act_scale.numel()} step(s), {kind}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_step:
            rows = self.context.index
            if rows is None:
                raise RuntimeError("a per-step activation quantizer ran before the step index was published")
        else:
            rows = torch.zeros(x.shape[0], dtype=torch.int64)
        return QuantizeDequantizeActivationFunction.apply(x, self.act_scale, rows, self.act_zero_point, self)


def make_activation_function(opset: int, with_zero_point: bool) -> onnx.FunctionProto:
    """``lowbit::QuantizeDequantizeActivation`` in standard ops (the portable reference)."""
    inputs = ["x", "scale", "step_index"] + (["zero_point"] if with_zero_point else [])
    bounds = []
    for bound in ("qmin", "qmax"):  # Constant nodes whose value is the node's attribute
        node = helper.make_node("Constant", [], [f"{bound}_int"])
        node.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name=bound,
                                                  type=onnx.AttributeProto.INT))
        bounds.append(node)
    qmin_node, qmax_node = bounds
    nodes = [
        qmin_node, qmax_node,
        helper.make_node("Cast", ["qmin_int"], ["qmin_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["qmax_int"], ["qmax_f"], to=TensorProto.FLOAT),
        # [B] per-sample scale, reshaped to [B, 1, ..., 1] (the rank of x).
        helper.make_node("Gather", ["scale", "step_index"], ["s_rows"], axis=0),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Shape", ["x_shape"], ["x_rank"]),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.INT64, [1], [1])),
        helper.make_node("Sub", ["x_rank", "one"], ["ones_count"]),
        helper.make_node("ConstantOfShape", ["ones_count"], ["ones"],
                         value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
        helper.make_node("Shape", ["step_index"], ["batch"]),
        helper.make_node("Concat", ["batch", "ones"], ["broadcast_shape"], axis=0),
        helper.make_node("Reshape", ["s_rows", "broadcast_shape"], ["s"]),
        helper.make_node("Div", ["x", "s"], ["ratio"]),
        helper.make_node("Round", ["ratio"], ["rounded"]),
    ]
    if with_zero_point:
        nodes += [
            helper.make_node("Gather", ["zero_point", "step_index"], ["z_rows"], axis=0),
            helper.make_node("Reshape", ["z_rows", "broadcast_shape"], ["z"]),
            helper.make_node("Add", ["rounded", "z"], ["shifted"]),
            helper.make_node("Clip", ["shifted", "qmin_f", "qmax_f"], ["clipped"]),
            helper.make_node("Sub", ["clipped", "z"], ["centred"]),
            helper.make_node("Mul", ["centred", "s"], ["y"]),
        ]
    else:
        nodes += [
            # The absent zero point is added as 0, which makes round(-0.3) +0.0 as the op says. ONNX Runtime removes
            # an Add of a constant 0, so the 0 is s * 0 (s > 0, never constant: it is gathered by step index).
            helper.make_node("Constant", [], ["zero_f"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
            helper.make_node("Mul", ["s", "zero_f"], ["no_zero"]),
            helper.make_node("Add", ["rounded", "no_zero"], ["shifted"]),
            helper.make_node("Clip", ["shifted", "qmin_f", "qmax_f"], ["clipped"]),
            helper.make_node("Mul", ["clipped", "s"], ["y"]),
        ]
    return helper.make_function(OP_DOMAIN, ACTIVATION_OP_TYPE, inputs=inputs, outputs=["y"], nodes=nodes,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=["qmin", "qmax"])


def attach_activation_function(model: onnx.ModelProto, opset: int) -> int:
    """Add the local function for the model's activation nodes (and declare the ``lowbit`` domain where no
    ``UnpackDequantize`` node did); returns how many activation nodes the model has."""
    nodes = [n for n in model.graph.node if n.domain == OP_DOMAIN and n.op_type == ACTIVATION_OP_TYPE]
    if not nodes:
        return 0
    arities = {len(node.input) for node in nodes}
    if len(arities) > 1:
        raise ValueError("a model's activation nodes must all have a zero point or none (one function per model)")
    if not any(entry.domain == OP_DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(OP_DOMAIN, ACTIVATION_OP_VERSION))
    if not any(fn.domain == OP_DOMAIN and fn.name == ACTIVATION_OP_TYPE for fn in model.functions):
        model.functions.append(make_activation_function(opset, arities.pop() == 4))
    return len(nodes)
