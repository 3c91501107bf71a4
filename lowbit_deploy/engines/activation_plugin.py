"""TensorRT plugin for ``lowbit::QuantizeDequantizeActivation`` v1 (docs/ops/QuantizeDequantizeActivation_v1.md),
written in Python: the fallback of the C++ plugin in plugins/quantize_dequantize_activation/.

A classic IPluginV3 (OneCore + OneBuild + OneRuntime) with an IPluginCreatorV3One, like engines/plugin.py. The fields
(``qmin``, ``qmax``) are parsed and validated by name in :func:`parse_activation_fields`, the inputs checked at build
time by :func:`check_activation_inputs` / :func:`check_activation_input_types` (pure Python, testable without
TensorRT), and ``enqueue`` calls the kernel library's CUDA launcher through ctypes. Field names, checks, messages and
serialized types (one INT32 each) are those of the C++ plugin, so an engine built with either is byte-identical.

TensorRT's ONNX parser picks this plugin for a node ``lowbit::QuantizeDequantizeActivation`` with the attributes
``qmin``, ``qmax`` (ints), ``plugin_namespace="lowbit"`` and ``plugin_version="1"`` (strings); see
:func:`node_attributes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import UserError
from .plugin_common import (
    PLUGIN_NAMESPACE,
    check_field_names,
    creator_class,
    int32_scalar,
    plugin_base,
    register_creator,
)

OP_NAME = "QuantizeDequantizeActivation"
PLUGIN_VERSION = "1"
FIELD_NAMES = ("qmin", "qmax")
# qmax - qmin + 1 <= 65536 (kMAX_ACTIVATION_GRID_LEVELS in plugins/common/lowbitFormat.h).
MAX_GRID_LEVELS = 65536
INPUT_NAMES = ("x", "scale", "step_index", "zero_point")
# Output types offered to TensorRT: FLOAT (declared by get_output_data_types) and HALF (the float32 value rounded to
# nearest even), for builds that choose precisions; strongly typed networks (TensorRT-RTX) keep FLOAT.
OUTPUT_TYPE_NAMES = ("FLOAT", "HALF")
MIN_INPUTS, MAX_INPUTS = 3, 4
_X, _SCALE, _STEP_INDEX, _ZERO_POINT = range(4)


@dataclass(frozen=True)
class ActivationFields:
    """Validated plugin state: exactly the fields the engine serializes."""

    qmin: int
    qmax: int

    field_names = FIELD_NAMES

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1


def node_attributes(qmin: int, qmax: int) -> dict[str, Any]:
    """The attributes of the ONNX node that TensorRT's parser maps to this plugin (``onnx.helper.make_node(...,
    domain="lowbit", **node_attributes(qmin, qmax))``): the fields plus the plugin's namespace and version."""
    parse_activation_fields({"qmin": np.array([qmin]), "qmax": np.array([qmax])})
    return {"qmin": int(qmin), "qmax": int(qmax), "plugin_namespace": PLUGIN_NAMESPACE,
            "plugin_version": PLUGIN_VERSION}


def parse_activation_fields(fields: Mapping[str, Any]) -> ActivationFields:
    """Validate raw field values (numpy arrays or Python numbers) by name, in the order of the C++ plugin
    (quantizeDequantizeActivationFields.cpp): names, each scalar, ``qmin < qmax``, at most 65536 levels. Raises
    UserError saying what is wrong."""
    check_field_names(fields, FIELD_NAMES, OP_NAME)
    qmin, qmax = (int32_scalar(fields, name, OP_NAME) for name in FIELD_NAMES)
    if qmin >= qmax:
        raise UserError(f"{OP_NAME}: qmin={qmin} must be smaller than qmax={qmax}")
    parsed = ActivationFields(qmin, qmax)
    if parsed.levels > MAX_GRID_LEVELS:
        raise UserError(f"{OP_NAME}: the grid [{qmin}, {qmax}] has {parsed.levels} levels; at most {MAX_GRID_LEVELS} "
                        "are allowed (qmax - qmin + 1 <= 65536)")
    return parsed


def _input(index: int) -> str:
    return f"input {index} ({INPUT_NAMES[index]})"


def _check_count(num_inputs: int, num_outputs: int) -> None:
    if not MIN_INPUTS <= num_inputs <= MAX_INPUTS or num_outputs != 1:
        raise UserError(f"{OP_NAME}: expected 3 or 4 inputs (x, scale, step_index[, zero_point]) and 1 output, got "
                        f"{num_inputs} inputs and {num_outputs} outputs")


def check_activation_inputs(input_dims: Sequence[Sequence[int]], num_outputs: int) -> None:
    """Build-time checks (twin of lowbit::plugin::checkActivationInputs): 3 or 4 inputs and 1 output, x of rank >= 1,
    scale/step_index/zero_point one-dimensional, a non-empty step table, and step_index as long as the batch of x and
    zero_point as long as scale where both extents are known (an extent < 0 is unknown)."""
    _check_count(len(input_dims), num_outputs)
    if len(input_dims[_X]) < 1:
        raise UserError(f"{OP_NAME}: {_input(_X)} needs rank >= 1 (dimension 0 is the batch), got rank 0")
    for index, extent in ((_SCALE, "T"), (_STEP_INDEX, "B"), (_ZERO_POINT, "T")):
        if index < len(input_dims) and len(input_dims[index]) != 1:
            raise UserError(f"{OP_NAME}: {_input(index)} must be one-dimensional [{extent}], got rank "
                            f"{len(input_dims[index])}")
    steps, indices, batch = input_dims[_SCALE][0], input_dims[_STEP_INDEX][0], input_dims[_X][0]
    if steps == 0:
        raise UserError(f"{OP_NAME}: {_input(_SCALE)} is empty; the step table needs at least one entry")
    if indices >= 0 and batch >= 0 and indices != batch:
        raise UserError(f"{OP_NAME}: {_input(_STEP_INDEX)} has {indices} entries but x has a batch of {batch} (one "
                        "step index per sample)")
    if len(input_dims) == MAX_INPUTS:
        zero_points = input_dims[_ZERO_POINT][0]
        if zero_points >= 0 and steps >= 0 and zero_points != steps:
            raise UserError(f"{OP_NAME}: {_input(_ZERO_POINT)} has {zero_points} entries but scale has {steps} (one "
                            "zero point per step)")


def input_type_name(index: int) -> str:
    """Name of the TensorRT DataType input ``index`` must have: step_index INT64, the others FLOAT."""
    return "INT64" if index == _STEP_INDEX else "FLOAT"


def check_activation_input_types(type_names: Sequence[str]) -> None:
    """Build-time type check (twin of lowbit::plugin::checkActivationInputTypes); names as TensorRT's DataType."""
    for index, name in enumerate(type_names[:MAX_INPUTS]):
        if name != input_type_name(index):
            raise UserError(f"{OP_NAME}: {_input(index)} has type {name}; expected {input_type_name(index)}")


def serialization_arrays(fields: ActivationFields) -> dict[str, np.ndarray]:
    """The serialized fields: one INT32 each, in FIELD_NAMES order (as SerializedActivationFields in C++)."""
    return {name: np.array([getattr(fields, name)], dtype=np.int32) for name in FIELD_NAMES}


def _known_extents(dims: Any) -> tuple[int, ...]:
    return tuple(d.get_constant_value() if d.is_constant() else -1 for d in dims)


@lru_cache(maxsize=None)
def activation_plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """(plugin class, creator class) bound to the TensorRT module ``trt``."""

    class QuantizeDequantizeActivationPlugin(plugin_base(trt)):
        def __init__(self, fields: ActivationFields) -> None:
            super().__init__(OP_NAME, PLUGIN_VERSION, fields)

        def serialization_arrays(self) -> dict[str, np.ndarray]:
            return serialization_arrays(self.fields)

        def get_output_data_types(self, input_types: Any) -> list[Any]:
            # x float32 is part of the contract: a HALF activation is refused here, while the network is built.
            _check_count(len(input_types), 1)
            check_activation_input_types([t.name for t in input_types])
            return [trt.DataType.FLOAT]

        def get_output_shapes(self, inputs: Any, shape_inputs: Any, expr_builder: Any) -> list[Any]:
            # Ranks always, extents where they are build-time constants: a mismatch is refused before the engine
            # exists (a dynamic batch is checked again per shape in on_shape_change).
            check_activation_inputs([_known_extents(dims) for dims in inputs], 1)
            output = trt.DimsExprs(len(inputs[_X]))
            for axis, extent in enumerate(inputs[_X]):
                output[axis] = extent
            return [output]

        def supports_format_combination(self, pos: int, in_out: Any, num_inputs: int) -> bool:
            # Output: float32 (declared), or float16 for builds that choose precisions (inputs keep their one type).
            desc = in_out[pos].desc
            wanted = (input_type_name(pos),) if pos < num_inputs else OUTPUT_TYPE_NAMES
            return desc.format == trt.TensorFormat.LINEAR and desc.type.name in wanted

        def configure_plugin(self, inputs: Any, outputs: Any) -> None:
            check_activation_inputs([tuple(i.desc.dims) for i in inputs], len(outputs))
            check_activation_input_types([i.desc.type.name for i in inputs])
            if outputs[0].desc.type.name not in OUTPUT_TYPE_NAMES:
                raise UserError(f"{OP_NAME}: the output must be FLOAT or HALF, got {outputs[0].desc.type}")

        def on_shape_change(self, inputs: Any, outputs: Any) -> None:
            check_activation_inputs([tuple(i.dims) for i in inputs], len(outputs))

        def enqueue(self, input_desc: Any, output_desc: Any, inputs: Any, outputs: Any, workspace: int,
                    stream: int) -> None:
            library = self.attached_library()
            x_dims = tuple(input_desc[_X].dims)
            zero_point = int(inputs[_ZERO_POINT]) if len(input_desc) == MAX_INPUTS else None
            library.quantize_dequantize_activation_launch(
                int(inputs[_X]), int(inputs[_SCALE]), int(inputs[_STEP_INDEX]), zero_point, int(outputs[0]),
                x_dims[0], math.prod(x_dims[1:]), tuple(input_desc[_SCALE].dims)[0], self.fields.qmin,
                self.fields.qmax, int(stream), out_fp16=output_desc[0].type.name == "HALF")

    creator = creator_class(trt, OP_NAME, PLUGIN_VERSION, FIELD_NAMES,
                            lambda fields: QuantizeDequantizeActivationPlugin(parse_activation_fields(fields)))
    return QuantizeDequantizeActivationPlugin, creator


def register_activation_plugin(trt: ModuleType | None = None) -> Any:
    """Register the Python creator with ``trt``'s plugin registry (once per module) and return it. Called by
    engines.plugin.register_plugins, so every path that registers the Python UnpackDequantize creators (builds with
    ``--plugin python``, the TensorRT runner) registers this one too."""
    if trt is None:
        from .tensorrt_import import import_tensorrt

        trt = import_tensorrt()
    return register_creator(trt, OP_NAME, PLUGIN_VERSION, activation_plugin_classes(trt)[1])
