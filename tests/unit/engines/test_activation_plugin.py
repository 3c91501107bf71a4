"""QuantizeDequantizeActivation plugin fields and build-time input checks (pure Python), the Python creator in a
TensorRT registry, and the C++ header's op identity and grid limit agreeing with the Python plugin."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lowbit_deploy.engines import activation_plugin
from lowbit_deploy.engines.activation_plugin import (
    FIELD_NAMES,
    ActivationFields,
    check_activation_input_types,
    check_activation_inputs,
    node_attributes,
    parse_activation_fields,
    serialization_arrays,
)
from lowbit_deploy.engines.tensorrt_import import tensorrt_importable
from lowbit_deploy.errors import UserError
from lowbit_deploy.quant.activation_grid import ActivationGrid

PLUGINS = Path(__file__).resolve().parents[3] / "plugins"
VALID = {"qmin": np.array([-8], np.int32), "qmax": np.array([7], np.int32)}
# Every malformed field set: (overrides, fields to drop, expected message). Shared with the creator test below.
MALFORMED = [
    ({}, ["qmin"], r"missing required field\(s\) \['qmin'\]; expected \['qmin', 'qmax'\]"),
    ({}, ["qmax"], r"missing required field\(s\) \['qmax'\]"),
    ({}, ["qmin", "qmax"], r"missing required field\(s\) \['qmin', 'qmax'\]"),
    ({"levels": np.array([16], np.int32)}, [], r"unknown field\(s\) \['levels'\]"),
    # A creator sees the FLOAT32 field type first; parse_activation_fields the float values.
    ({"qmin": np.array([-8.0], np.float32)}, [], "field 'qmin' (must be one integer|has type FLOAT32; expected INT32 or "
                                                 "INT64)"),
    ({"qmax": np.array([7, 8], np.int32)}, [], "field 'qmax' must be one integer"),
    ({"qmax": np.array([], np.int32)}, [], "field 'qmax' must be one integer"),
    ({"qmin": np.array([2**40], np.int64)}, [], "field 'qmin'=1099511627776 does not fit a 32-bit integer"),
    ({"qmax": np.array([-2**33], np.int64)}, [], "field 'qmax'=-8589934592 does not fit a 32-bit integer"),
    ({"qmin": np.array([7], np.int32)}, [], "qmin=7 must be smaller than qmax=7"),
    ({"qmin": np.array([8], np.int32)}, [], "qmin=8 must be smaller than qmax=7"),
    ({"qmin": np.array([0], np.int32), "qmax": np.array([-1], np.int32)}, [], "must be smaller than qmax=-1"),
    ({"qmin": np.array([0], np.int32), "qmax": np.array([65536], np.int32)}, [],
     r"the grid \[0, 65536\] has 65537 levels; at most 65536"),
    ({"qmin": np.array([-2**31], np.int32), "qmax": np.array([2**31 - 1], np.int32)}, [], "4294967296 levels"),
    ({"qmin": np.array([-40000], np.int64), "qmax": np.array([40000], np.int64)}, [], "80001 levels"),
]


def _fields(overrides: dict, drop: list[str]) -> dict:
    return {name: value for name, value in {**VALID, **overrides}.items() if name not in drop}


@pytest.mark.parametrize(("overrides", "drop", "message"), MALFORMED)
def test_malformed_fields_are_refused_with_a_message(overrides, drop, message) -> None:
    with pytest.raises(UserError, match=f"^QuantizeDequantizeActivation: .*{message}"):
        parse_activation_fields(_fields(overrides, drop))


def test_at_least_15_malformed_field_sets() -> None:
    assert len(MALFORMED) >= 15


@pytest.mark.parametrize("grid", [ActivationGrid(4), ActivationGrid(8), ActivationGrid(8, symmetric=False),
                                  ActivationGrid(2)], ids=lambda g: g.describe())
def test_grids_parse_from_int32_or_int64(grid) -> None:
    for dtype in (np.int32, np.int64):
        fields = parse_activation_fields({"qmax": np.array([grid.qmax], dtype), "qmin": np.array([grid.qmin], dtype)})
        assert fields == ActivationFields(grid.qmin, grid.qmax)
    assert serialization_arrays(fields) == {"qmin": [grid.qmin], "qmax": [grid.qmax]}
    assert [a.dtype for a in serialization_arrays(fields).values()] == [np.int32, np.int32]


def test_widest_grid_and_parser_attributes_are_accepted() -> None:
    assert parse_activation_fields({"qmin": np.array([0]), "qmax": np.array([65535])}).levels == 65536
    unterminated = np.frombuffer(b"lowbit", np.int8)  # the parser's node attributes are never read
    assert parse_activation_fields({**VALID, "plugin_namespace": unterminated, "plugin_version": "1"}).qmax == 7


def test_node_attributes_select_the_plugin() -> None:
    assert node_attributes(0, 255) == {"qmin": 0, "qmax": 255, "plugin_namespace": "lowbit", "plugin_version": "1"}
    with pytest.raises(UserError, match="must be smaller"):
        node_attributes(3, 3)


@pytest.mark.parametrize(("dims", "outputs", "message"), [
    ([(2, 4), (20,)], 1, "expected 3 or 4 inputs .* got 2 inputs and 1 outputs"),
    ([(2, 4), (20,), (2,), (20,), (20,)], 1, "got 5 inputs"),
    ([(2, 4), (20,), (2,)], 2, "and 2 outputs"),
    ([(), (20,), (2,)], 1, r"input 0 \(x\) needs rank >= 1"),
    ([(2, 4), (4, 5), (2,)], 1, r"input 1 \(scale\) must be one-dimensional \[T\], got rank 2"),
    ([(2, 4), (20,), (2, 1)], 1, r"input 2 \(step_index\) must be one-dimensional \[B\], got rank 2"),
    ([(2, 4), (20,), (2,), ()], 1, r"input 3 \(zero_point\) must be one-dimensional \[T\], got rank 0"),
    ([(2, 4), (0,), (2,)], 1, r"input 1 \(scale\) is empty"),
    ([(2, 4), (20,), (3,)], 1, r"input 2 \(step_index\) has 3 entries but x has a batch of 2"),
    ([(2, 4), (20,), (2,), (19,)], 1, r"input 3 \(zero_point\) has 19 entries but scale has 20"),
])
def test_input_checks(dims, outputs, message) -> None:
    with pytest.raises(UserError, match=message):
        check_activation_inputs(dims, outputs)


def test_unknown_extents_are_checked_later() -> None:
    check_activation_inputs([(-1, 4, 8), (20,), (-1,)], 1)  # dynamic batch: on_shape_change checks it per shape
    check_activation_inputs([(2, 4), (-1,), (2,), (7,)], 1)
    check_activation_inputs([(5,), (1,), (5,), (1,)], 1)


def test_input_types() -> None:
    check_activation_input_types(["FLOAT", "FLOAT", "INT64", "FLOAT"])
    with pytest.raises(UserError, match=r"input 0 \(x\) has type HALF; expected FLOAT"):
        check_activation_input_types(["HALF", "FLOAT", "INT64"])
    with pytest.raises(UserError, match=r"input 2 \(step_index\) has type INT32; expected INT64"):
        check_activation_input_types(["FLOAT", "FLOAT", "INT32"])


def _header_constants() -> dict[str, object]:
    text = (PLUGINS / "common" / "lowbitFormat.h").read_text()
    integers = {name: int(value) for name, value in re.findall(r"constexpr int32_t (k\w+) = (-?\d+);", text)}
    return {**integers, **dict(re.findall(r'constexpr char const\* (k\w+) = "([^"]*)";', text))}


def test_cpp_constants_match_the_python_plugin() -> None:
    constants = _header_constants()
    assert constants["kQUANTIZE_DEQUANTIZE_ACTIVATION_NAME"] == activation_plugin.OP_NAME
    assert constants["kQUANTIZE_DEQUANTIZE_ACTIVATION_VERSION"] == activation_plugin.PLUGIN_VERSION
    assert constants["kPLUGIN_NAMESPACE"] == activation_plugin.PLUGIN_NAMESPACE
    assert constants["kMAX_ACTIVATION_GRID_LEVELS"] == activation_plugin.MAX_GRID_LEVELS
    fields_cpp = (PLUGINS / "quantize_dequantize_activation" / "quantizeDequantizeActivationFields.cpp").read_text()
    declared = dict(re.findall(r'constexpr char const\* (k\w+) = "(\w+)";', fields_cpp))
    assert (declared["kQMIN"], declared["kQMAX"]) == FIELD_NAMES
    assert re.search(r"kNAMES\{kQMIN, kQMAX\}", fields_cpp)


@pytest.mark.skipif(not tensorrt_importable("tensorrt_rtx") and not tensorrt_importable("tensorrt"),
                    reason="neither tensorrt nor tensorrt_rtx is installed")
def test_python_creator_is_registered_with_the_unpack_creators_and_refuses_malformed_fields() -> None:
    from lowbit_deploy.engines.plugin import register_plugins
    from lowbit_deploy.engines.tensorrt_import import import_tensorrt

    trt = import_tensorrt()
    register_plugins(trt)
    creator = trt.get_plugin_registry().get_creator("QuantizeDequantizeActivation", "1", "lowbit")
    assert creator is not None and activation_plugin.register_activation_plugin(trt) is creator
    assert (creator.name, creator.plugin_namespace, creator.plugin_version) == (
        "QuantizeDequantizeActivation", "lowbit", "1")
    assert [field.name for field in creator.field_names] == list(FIELD_NAMES)
    types = {np.dtype(np.int32): trt.PluginFieldType.INT32, np.dtype(np.int64): trt.PluginFieldType.INT64,
             np.dtype(np.float32): trt.PluginFieldType.FLOAT32}

    def collection(values):  # the arrays stay alive in `values`: PluginField does not own its buffer
        return trt.PluginFieldCollection([trt.PluginField(k, v, types[v.dtype]) for k, v in values.items()])

    for overrides, drop, message in MALFORMED:
        values = _fields(overrides, drop)
        with pytest.raises(UserError, match=message):
            creator.create_plugin("bad", collection(values), trt.TensorRTPhase.BUILD)
    values = {"qmin": np.array([0], np.int64), "qmax": np.array([255], np.int64)}
    plugin = creator.create_plugin("ok", collection(values), trt.TensorRTPhase.BUILD)
    serialized = {field.name: (field.type.name, np.asarray(field.data).tolist())
                  for field in plugin.get_fields_to_serialize()}
    assert serialized == {"qmin": ("INT32", [0]), "qmax": ("INT32", [255])}
    assert plugin.clone().fields == plugin.fields == ActivationFields(0, 255)
    with pytest.raises(RuntimeError, match="before attach_to_context"):
        plugin.enqueue([], [], [0, 0, 0], [0], 0, 0)
