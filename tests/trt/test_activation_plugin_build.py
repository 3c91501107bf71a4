"""lowbit::QuantizeDequantizeActivation in TensorRT-RTX (ahead of time, no GPU): a toy model's node is parsed into
the plugin, the C++ library and the Python plugin build byte-identical engines, malformed fields are refused by both
creators alike, and malformed inputs are refused at build time. Every build runs in a fresh process (a process keeps
the C++ library once loaded)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from fresh_process import build_in_fresh_process, creator_verdicts
from onnx import TensorProto, helper, numpy_helper

from lowbit_deploy.engines.tensorrt_import import tensorrt_importable
from lowbit_deploy.quant.activation_grid import ActivationGrid

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(not tensorrt_importable("tensorrt_rtx"),
                       reason="tensorrt_rtx is not installed (pip install 'lowbit-deploy[tensorrt-rtx]')"),
]

KINDS = ("cpp", "python")
# (grid, zero point, steps, x shape, dynamic batch): symmetric 4/8-bit without and asymmetric 8-bit with a zero
# point, T = 1 and 20, ranks 2 to 5, static and dynamic batch.
CASES = {
    "A4sym-T20-rank4": (ActivationGrid(4), False, 20, (2, 4, 8, 8), False),
    "A8sym-T1-rank2": (ActivationGrid(8), False, 1, (3, 16), False),
    "A8asym-zp-T20-rank3": (ActivationGrid(8, symmetric=False), True, 20, (2, 6, 10), False),
    "A8asym-zp-T1-rank5": (ActivationGrid(8, symmetric=False), True, 1, (2, 2, 3, 4, 4), False),
    "A8asym-zp-T20-rank4-dynamic": (ActivationGrid(8, symmetric=False), True, 20, (2, 4, 8, 8), True),
}


def _model(case: str) -> onnx.ModelProto:
    from lowbit_deploy.engines.toy_models import activation_model

    grid, with_zero_point, steps, shape, dynamic = CASES[case]
    return activation_model(shape, steps, grid.qmin, grid.qmax, with_zero_point, np.random.default_rng(0),
                            dynamic_batch=dynamic)


def _shapes(case: str) -> dict | None:
    _, _, _, shape, dynamic = CASES[case]
    if not dynamic:
        return None
    return {"x": [[1, *shape[1:]], list(shape), [4, *shape[1:]]], "step_index": [[1], [shape[0]], [4]]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_engines_built_with_either_plugin_are_byte_identical(cpp_plugin_library, case, tmp_path) -> None:
    model = _model(case)
    node = next(n for n in model.graph.node if n.domain == "lowbit")
    assert node.op_type == "QuantizeDequantizeActivation" and len(node.input) == (4 if CASES[case][1] else 3)
    onnx.save(model, tmp_path / "act.onnx")
    results = {kind: build_in_fresh_process(kind, tmp_path / "act.onnx", tmp_path / f"{kind}.engine", _shapes(case))
               for kind in KINDS}
    assert all(result["ok"] for result in results.values()), {k: (r.get("error"), r["log"][-2000:])
                                                              for k, r in results.items()}
    for kind, result in results.items():
        assert result["report"]["plugin"] == kind and result["report"]["activation_layers"] == 1
    cpp_bytes, python_bytes = ((tmp_path / f"{kind}.engine").read_bytes() for kind in KINDS)
    assert cpp_bytes == python_bytes
    assert b"QuantizeDequantizeActivation" in cpp_bytes and b"qmax" in cpp_bytes  # fields serialized by name


def test_python_plugin_offers_float_and_half_output() -> None:
    """Output FLOAT (declared by get_output_data_types) or HALF, LINEAR; the inputs keep their one type each. (The C++
    plugin's answers: plugins/tests/activationPluginTest.cpp, CPU part.)"""
    from lowbit_deploy.engines.activation_plugin import activation_plugin_classes, parse_activation_fields
    from lowbit_deploy.engines.tensorrt_import import tensorrt_backend

    trt = tensorrt_backend("tensorrt_rtx").module
    plugin = activation_plugin_classes(trt)[0](parse_activation_fields({"qmin": -128, "qmax": 127}))
    assert plugin.get_output_data_types([trt.DataType.FLOAT, trt.DataType.FLOAT, trt.DataType.INT64]) == [
        trt.DataType.FLOAT]

    def accepts(pos: int, dtype, fmt=trt.TensorFormat.LINEAR) -> bool:
        in_out = [trt.DynamicPluginTensorDesc() for _ in range(4)]
        in_out[pos].desc.type, in_out[pos].desc.format = dtype, fmt
        return plugin.supports_format_combination(pos, in_out, 3)

    assert accepts(3, trt.DataType.FLOAT) and accepts(3, trt.DataType.HALF)
    assert not accepts(3, trt.DataType.INT8) and not accepts(3, trt.DataType.HALF, trt.TensorFormat.CHW2)
    assert accepts(0, trt.DataType.FLOAT) and not accepts(0, trt.DataType.HALF)
    assert accepts(2, trt.DataType.INT64) and not accepts(2, trt.DataType.INT32)


def _node(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.domain == "lowbit")


def _replace_initializer(model: onnx.ModelProto, name: str, values: np.ndarray) -> None:
    initializer = next(i for i in model.graph.initializer if i.name == name)
    initializer.CopyFrom(numpy_helper.from_array(values, name))


def _two_inputs(model):
    del _node(model).input[2:]


def _five_inputs(model):
    _node(model).input.append("act.zero_point")


def _short_zero_point(model):
    _replace_initializer(model, "act.zero_point", np.zeros(19, np.float32))


def _scale_2d(model):
    _replace_initializer(model, "act.scale", np.full((4, 5), 0.1, np.float32))


def _step_index_too_long(model):
    model.graph.input[1].CopyFrom(helper.make_tensor_value_info("step_index", TensorProto.INT64, [3]))


def _step_index_int32(model):
    model.graph.input[1].CopyFrom(helper.make_tensor_value_info("step_index", TensorProto.INT32, [2]))


def _grid_reversed(model):
    for attribute in _node(model).attribute:
        if attribute.name == "qmin":
            attribute.i = 300


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("mutate", "message"), [
    (_two_inputs, r"expected 3 or 4 inputs \(x, scale, step_index\[, zero_point\]\) and 1 output, got 2 inputs"),
    (_five_inputs, "got 5 inputs"),
    (_short_zero_point, r"input 3 \(zero_point\) has 19 entries but scale has 20"),
    (_scale_2d, r"input 1 \(scale\) must be one-dimensional \[T\], got rank 2"),
    (_step_index_too_long, r"input 2 \(step_index\) has 3 entries but x has a batch of 2"),
    (_step_index_int32, r"input 2 \(step_index\) has type INT32; expected INT64"),
    (_grid_reversed, "qmin=300 must be smaller than qmax=255"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_malformed_inputs_are_refused_at_build_time(cpp_plugin_library, kind, mutate, message, tmp_path) -> None:
    from lowbit_deploy.engines.toy_models import activation_model

    model = activation_model((2, 4, 8, 8), 20, 0, 255, True, np.random.default_rng(0))  # valid until mutated
    mutate(model)
    onnx.save(model, tmp_path / "bad.onnx")
    result = build_in_fresh_process(kind, tmp_path / "bad.onnx", tmp_path / "bad.engine")
    assert not result["ok"] and not (tmp_path / "bad.engine").exists()
    assert re.search(message, result["error"] + result["log"]), (result["error"] + result["log"])[-3000:]


def test_malformed_fields_are_refused_by_both_creators(cpp_plugin_library) -> None:
    """At least 15 malformed field collections through each registry creator's create_plugin: every one refused
    (C++: None plus an error through TensorRT's logger; Python: UserError), the process survives, and both creators
    agree on every case, controls included."""
    from activation_fuzz_cases import CASES as FUZZ_CASES

    verdicts = creator_verdicts("activation_fuzz_cases.py", FUZZ_CASES)
    malformed = [case for case in FUZZ_CASES if not case.startswith("valid:")]
    assert len(malformed) >= 15
    assert all("lowbit::QuantizeDequantizeActivation: createPlugin: " in verdicts["cpp"][c]["message"]
               for c in malformed)
    # Same check first, same words: the C++ message is the Python one behind the entry point's name (the count
    # errors aside, where Python shows the array).
    for case in malformed:
        cpp = verdicts["cpp"][case]["message"].split("createPlugin: ", 1)[1]
        python = verdicts["python"][case]["message"].removeprefix("QuantizeDequantizeActivation: ")
        assert cpp == python or cpp.split(", got")[0] == python.split(", got")[0], case
