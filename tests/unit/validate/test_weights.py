"""Exact weight parity: equal bytes pass, any difference, a missing initializer or a wrong type fails by name."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lowbit_deploy.validate.weights import _differs, weight_parity


@pytest.fixture(scope="module")
def deployed(tiny_run):
    from lowbit_deploy.validate.parity import prepare_validation

    return prepare_validation(tiny_run).deployed


def test_clean_export_matches_every_initializer(tiny_run, deployed):
    result = weight_parity(tiny_run / "model.onnx", deployed, chunk_layers=4)
    assert result.passed, result.failures
    assert result.initializers_unmatched == 0
    assert result.initializers_checked == len(onnx.load(str(tiny_run / "model.onnx")).graph.initializer)
    assert result.decoded_layers_checked == len(deployed.packed_layers())


def test_missing_scale_is_named(tiny_run, deployed, tmp_path):
    model = onnx.load(str(tiny_run / "model.onnx"))
    victim = next(t for t in model.graph.initializer if t.name.endswith(".scale"))
    model.graph.initializer.remove(victim)
    model.graph.input.append(onnx.helper.make_tensor_value_info(victim.name, victim.data_type, list(victim.dims)))
    onnx.save(model, str(tmp_path / "model.onnx"))
    result = weight_parity(tmp_path / "model.onnx", deployed)
    assert not result.passed
    assert f"initializer {victim.name} is missing" in result.failures
    assert any("ONNX Runtime cannot decode" in failure for failure in result.failures)


@pytest.mark.parametrize("stored, reference, expected", [
    (np.array([1, 2], np.int8), np.array([1, 2], np.int8), None),
    (np.array([1, 2], np.int8), np.array([1, 3], np.int8), "1 of 2 values differ"),
    (np.array([1.0], np.float16), np.array([1.0], np.float32), "float16[1] instead of float32[1]"),
    (np.array([0.0], np.float32), np.array([-0.0], np.float32), "1 of 1 values differ"),  # bytes, not ==
    (np.array([np.nan], np.float32), np.array([np.nan], np.float32), None),
])
def test_differs_compares_bytes(stored, reference, expected):
    problem = _differs(stored, reference)
    assert problem is None if expected is None else expected in problem


def test_changed_float_parameter_is_named(tiny_run, deployed, tmp_path):
    model = onnx.load(str(tiny_run / "model.onnx"))
    victim = next(t for t in model.graph.initializer if "norm" in t.name)
    values = numpy_helper.to_array(victim).copy()
    values.reshape(-1)[0] = -values.reshape(-1)[0] if values.reshape(-1)[0] != 0 else 1
    victim.CopyFrom(numpy_helper.from_array(values, victim.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    result = weight_parity(tmp_path / "model.onnx", deployed)
    assert not result.passed and victim.name in result.failures[0]
