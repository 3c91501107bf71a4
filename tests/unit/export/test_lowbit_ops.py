"""lowbit::UnpackDequantize emission: v1 and v2 nodes, the version-agnostic API, and the model-local functions run
by ONNX Runtime bit-identically to the numpy reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lowbit_deploy.export.lowbit_ops import (
    OP_DOMAIN,
    OP_TYPE,
    PackedWeight,
    attach_function,
    make_initializers,
    make_node,
    model_op_version,
    node_spec,
    op_version,
    standalone_model,
)
from lowbit_deploy.quant.packing import PackedLayout, PackingFormat, bitstream_group

ort = pytest.importorskip("onnxruntime")

SHAPES = [(1,), (3, 5), (7, 3, 3, 3), (64, 29), (2, 3, 1, 1)]


def _weight(levels: int, fmt: PackingFormat, shape: tuple[int, ...], seed: int = 0, name: str = "w") -> PackedWeight:
    rng = np.random.default_rng(seed)
    qmin = -(levels // 2)
    q = rng.integers(0, levels, size=shape) + qmin
    q.reshape(-1)[0] = qmin + levels - 1  # both ends of the grid in every case
    q.reshape(-1)[-1] = qmin
    scale = rng.normal(0.0, 0.05, size=shape[0]).astype(np.float16)
    return PackedWeight.from_integers(name, q, qmin, levels, scale, fmt)


def _run(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


def _assert_bit_identical(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("levels", range(2, 18))
def test_v2_function_in_onnxruntime_equals_numpy_reference(levels, shape):
    weight = _weight(levels, PackingFormat.BITSTREAM, shape, seed=levels)
    model = standalone_model(weight)
    onnx.checker.check_model(model, full_check=True)
    _assert_bit_identical(_run(model), weight.dequantized())


@pytest.mark.parametrize("levels", [255, 256, 257, 1000, 40_000, 65_536])
def test_v2_function_for_wide_grids(levels):
    weight = _weight(levels, PackingFormat.BITSTREAM, (5, 37), seed=levels)
    _assert_bit_identical(_run(standalone_model(weight)), weight.dequantized())


@pytest.mark.parametrize("levels", range(2, 18))
def test_v2_function_decodes_the_largest_group_values(levels):
    # All codes L-1: the loads with the most bits set (where an int64 overflow or a rounded sum would show).
    size = bitstream_group(levels)[0]
    shape = (3, 8 * size + 1)
    q = np.full(shape, levels - 1)
    weight = PackedWeight.from_integers("w", q, 0, levels, np.ones(3, np.float16), PackingFormat.BITSTREAM)
    np.testing.assert_array_equal(_run(standalone_model(weight)), q.astype(np.float32))


@pytest.mark.parametrize("fmt", [PackingFormat.INT8_WORDS, PackingFormat.INT32_WORDS], ids=lambda f: f.value)
@pytest.mark.parametrize("levels", [2, 3, 5, 9, 16, 17])
def test_v1_function_still_equals_numpy_reference(levels, fmt):
    weight = _weight(levels, fmt, (7, 3, 3, 3), seed=levels)
    model = standalone_model(weight)
    assert [(imp.domain, imp.version) for imp in model.opset_import if imp.domain == OP_DOMAIN] == [(OP_DOMAIN, 1)]
    _assert_bit_identical(_run(model), weight.dequantized())


@pytest.mark.parametrize(("fmt", "version"), [(PackingFormat.INT8_WORDS, 1), (PackingFormat.INT32_WORDS, 1),
                                              (PackingFormat.BITSTREAM, 2)])
def test_op_version_of_each_format(fmt, version):
    assert op_version(fmt) == version
    assert op_version(fmt.value) == version


def test_node_spec_v1():
    weight = _weight(3, PackingFormat.INT8_WORDS, (4, 2, 3, 3))
    assert node_spec(weight) == (OP_DOMAIN, OP_TYPE, {
        "levels": 3, "qmin": -1, "word_bits": 8, "codes_per_word": 5, "shape": [4, 2, 3, 3],
        "plugin_namespace": "lowbit", "plugin_version": "1"})


def test_node_spec_v2():
    weight = _weight(5, PackingFormat.BITSTREAM, (4, 2, 3, 3))
    assert node_spec(weight) == (OP_DOMAIN, OP_TYPE, {
        "levels": 5, "qmin": -2, "group_size": 3, "group_bits": 7, "shape": [4, 2, 3, 3],
        "plugin_namespace": "lowbit", "plugin_version": "2"})


def test_make_node_and_initializers_v2():
    weight = _weight(3, PackingFormat.BITSTREAM, (4, 2, 3, 3))
    node = make_node(weight, "w.weight")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (node.domain, node.op_type, list(node.input), list(node.output)) == (
        OP_DOMAIN, OP_TYPE, ["w.packed", "w.scale"], ["w.weight"])
    assert attributes == {"levels": 3, "qmin": -1, "group_size": 29, "group_bits": 46, "shape": [4, 2, 3, 3],
                          "plugin_namespace": b"lowbit", "plugin_version": b"2"}
    packed, scale = make_initializers(weight)
    assert packed.data_type == onnx.TensorProto.INT8 and scale.data_type == onnx.TensorProto.FLOAT16
    assert list(packed.dims) == [PackedLayout(3, PackingFormat.BITSTREAM, 72).num_words] == [18]  # 3 groups of 46 bits


def _two_node_model(formats: list[PackingFormat]) -> onnx.ModelProto:
    weights = [_weight(3, fmt, (2, 3), seed=i, name=f"w{i}") for i, fmt in enumerate(formats)]
    nodes = [make_node(w, f"{w.name}.weight") for w in weights]
    nodes.append(onnx.helper.make_node("Add", [n.output[0] for n in nodes], ["y"]))
    graph = onnx.helper.make_graph(
        nodes, "two", [], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        initializer=[init for w in weights for init in make_initializers(w)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize(("fmt", "version"), [(PackingFormat.INT8_WORDS, 1), (PackingFormat.BITSTREAM, 2)])
def test_attach_function_declares_the_version_of_the_nodes(fmt, version):
    model = _two_node_model([fmt, fmt])
    attach_function(model, 17)
    attach_function(model, 17)  # idempotent
    assert [(imp.domain, imp.version) for imp in model.opset_import if imp.domain == OP_DOMAIN] == [
        (OP_DOMAIN, version)]
    assert [(fn.domain, fn.name) for fn in model.functions] == [(OP_DOMAIN, OP_TYPE)]
    node_attributes = set(node_spec(_weight(3, fmt, (2, 3)))[2]) - {"plugin_namespace", "plugin_version"}
    assert set(model.functions[0].attribute) == node_attributes
    assert model_op_version(model) == version
    onnx.checker.check_model(model, full_check=True)
    expected = sum(_weight(3, fmt, (2, 3), seed=i).dequantized() for i in range(2))
    np.testing.assert_array_equal(_run(model), expected)


def test_attach_function_rejects_mixed_versions():
    model = _two_node_model([PackingFormat.INT8_WORDS, PackingFormat.BITSTREAM])
    with pytest.raises(ValueError, match=r"mixes lowbit::UnpackDequantize versions \[1, 2\]"):
        attach_function(model, 17)
    assert not model.functions


def test_attach_function_rejects_a_conflicting_declaration():
    model = _two_node_model([PackingFormat.BITSTREAM, PackingFormat.BITSTREAM])
    model.opset_import.append(onnx.helper.make_opsetid(OP_DOMAIN, 1))
    with pytest.raises(ValueError, match="declares lowbit opset"):
        attach_function(model, 17)


def test_attach_function_rejects_an_unknown_plugin_version():
    model = _two_node_model([PackingFormat.BITSTREAM, PackingFormat.BITSTREAM])
    next(a for a in model.graph.node[0].attribute if a.name == "plugin_version").s = b"7"
    with pytest.raises(ValueError, match="plugin_version=b'7'"):
        attach_function(model, 17)


def test_attach_function_leaves_a_model_without_lowbit_nodes_alone():
    model = _two_node_model([PackingFormat.BITSTREAM])
    del model.graph.node[0]
    attach_function(model, 17)
    assert not model.functions and all(imp.domain != OP_DOMAIN for imp in model.opset_import)
