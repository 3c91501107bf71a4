"""ONNX emission of ``lowbit::UnpackDequantize`` v1: the node, its packed initializers, and the model-local
function that is the portable reference in standard ops (docs/ops/UnpackDequantize_v1.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..quant.packing import PackedLayout, PackingFormat, pack_codes, unpack_codes

OP_DOMAIN = "lowbit"
OP_TYPE = "UnpackDequantize"
OP_VERSION = 1
PLUGIN_NAMESPACE = "lowbit"
PLUGIN_VERSION = "1"

_ONNX_WORD_TYPES = {PackingFormat.INT8_WORDS: TensorProto.INT8, PackingFormat.INT32_WORDS: TensorProto.INT32}


@dataclass(frozen=True)
class PackedWeight:
    """A weight ready for emission: packed words, float16 scales and the layout that decodes them."""

    name: str
    packed_words: np.ndarray
    scale_fp16: np.ndarray
    shape: tuple[int, ...]
    levels: int
    qmin: int
    layout: PackedLayout

    @classmethod
    def from_integers(cls, name: str, q: np.ndarray, qmin: int, levels: int, scale_fp16: np.ndarray,
                      fmt: PackingFormat) -> "PackedWeight":
        codes = q.astype(np.int64) - qmin
        layout = PackedLayout(levels, fmt, codes.size)
        return cls(name, pack_codes(codes, levels, fmt), scale_fp16.astype(np.float16), tuple(q.shape), levels,
                   qmin, layout)

    @property
    def nbytes(self) -> int:
        return self.packed_words.nbytes + self.scale_fp16.nbytes

    def dequantized(self) -> np.ndarray:
        """The numpy reference of the op's semantics: ``float32(code + qmin) * float32(scale)`` per channel."""
        codes = unpack_codes(self.packed_words, self.levels, self.layout.fmt, self.layout.numel)
        q = (codes + self.qmin).astype(np.float32).reshape(self.shape[0], -1)
        return (q * self.scale_fp16.astype(np.float32)[:, None]).reshape(self.shape)


def _ref_attr(name: str, attr_type: int) -> onnx.AttributeProto:
    attribute = onnx.AttributeProto()
    attribute.name = "value_ints" if attr_type == onnx.AttributeProto.INTS else "value_int"
    attribute.ref_attr_name = name
    attribute.type = attr_type
    return attribute


def _constant_from_attribute(output: str, attribute: str, attr_type: int = onnx.AttributeProto.INT) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [output])
    node.attribute.append(_ref_attr(attribute, attr_type))
    return node


def make_function(opset: int) -> onnx.FunctionProto:
    """The portable reference: decodes the packed words with standard ONNX ops (int64 arithmetic)."""
    int_const = lambda out, value: helper.make_node(  # noqa: E731 - tiny local constructor keeps the body readable
        "Constant", [], [out], value=numpy_helper.from_array(np.array(value, dtype=np.int64)))
    nodes = [
        _constant_from_attribute("levels", "levels"),
        _constant_from_attribute("qmin", "qmin"),
        _constant_from_attribute("word_bits", "word_bits"),
        _constant_from_attribute("codes_per_word", "codes_per_word"),
        _constant_from_attribute("shape", "shape", onnx.AttributeProto.INTS),
        int_const("zero", 0), int_const("one", 1), int_const("two", 2),
        int_const("flat_shape", [-1]), int_const("axis1", [1]), int_const("start0", [0]), int_const("end1", [1]),
        # Reinterpret the signed storage word as unsigned: Mod with a positive divisor (fmod=0) is non-negative.
        helper.make_node("Pow", ["two", "word_bits"], ["word_modulus"]),
        helper.make_node("Cast", ["packed"], ["packed_i64"], to=TensorProto.INT64),
        helper.make_node("Mod", ["packed_i64", "word_modulus"], ["words_unsigned"], fmod=0),
        # Digit j of every word: (word // L**j) % L, least significant first.
        helper.make_node("Range", ["zero", "codes_per_word", "one"], ["digit_index"]),
        helper.make_node("Pow", ["levels", "digit_index"], ["digit_weight"]),
        helper.make_node("Unsqueeze", ["words_unsigned", "axis1"], ["words_column"]),
        helper.make_node("Div", ["words_column", "digit_weight"], ["shifted"]),
        helper.make_node("Mod", ["shifted", "levels"], ["digits"], fmod=0),
        helper.make_node("Reshape", ["digits", "flat_shape"], ["codes_padded"]),
        helper.make_node("ReduceProd", ["shape"], ["numel"], keepdims=1),
        helper.make_node("Slice", ["codes_padded", "start0", "numel"], ["codes"]),
        helper.make_node("Add", ["codes", "qmin"], ["q"]),
        helper.make_node("Cast", ["q"], ["q_float"], to=TensorProto.FLOAT),
        # One float32 multiply per weight, broadcasting the per-output-channel scale: bit-identical to torch.
        helper.make_node("Slice", ["shape", "start0", "end1"], ["channels"]),
        helper.make_node("Concat", ["channels", "flat_shape"], ["rows_shape"], axis=0),
        helper.make_node("Reshape", ["q_float", "rows_shape"], ["q_rows"]),
        helper.make_node("Cast", ["scale"], ["scale_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["scale_float", "axis1"], ["scale_column"]),
        helper.make_node("Mul", ["q_rows", "scale_column"], ["weight_rows"]),
        helper.make_node("Reshape", ["weight_rows", "shape"], ["weight"]),
    ]
    return helper.make_function(
        OP_DOMAIN, OP_TYPE, inputs=["packed", "scale"], outputs=["weight"], nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["levels", "qmin", "word_bits", "codes_per_word", "shape"],
    )


def make_initializers(weight: PackedWeight) -> tuple[onnx.TensorProto, onnx.TensorProto]:
    packed = numpy_helper.from_array(weight.packed_words, f"{weight.name}.packed")
    assert packed.data_type == _ONNX_WORD_TYPES[weight.layout.fmt]
    scale = numpy_helper.from_array(weight.scale_fp16, f"{weight.name}.scale")
    return packed, scale


def make_node(weight: PackedWeight, output_name: str) -> onnx.NodeProto:
    return helper.make_node(
        OP_TYPE, [f"{weight.name}.packed", f"{weight.name}.scale"], [output_name], name=f"{weight.name}.unpack",
        domain=OP_DOMAIN, levels=weight.levels, qmin=weight.qmin, word_bits=weight.layout.fmt.word_bits,
        codes_per_word=weight.layout.codes_per_word, shape=list(weight.shape),
        plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
    )


def attach_function(model: onnx.ModelProto, opset: int) -> None:
    """Declare the ``lowbit`` domain and add the local function once."""
    if not any(imp.domain == OP_DOMAIN for imp in model.opset_import):
        model.opset_import.append(helper.make_opsetid(OP_DOMAIN, OP_VERSION))
    if not any(fn.domain == OP_DOMAIN and fn.name == OP_TYPE for fn in model.functions):
        model.functions.append(make_function(opset))


def standalone_model(weight: PackedWeight, opset: int = 17) -> onnx.ModelProto:
    """A model holding one packed weight whose only output is the dequantized weight (for tests and tools)."""
    packed, scale = make_initializers(weight)
    output = helper.make_tensor_value_info("weight", TensorProto.FLOAT, list(weight.shape))
    graph = helper.make_graph([make_node(weight, "weight")], "unpack", [], [output], initializer=[packed, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    attach_function(model, opset)
    model.ir_version = 10
    return model
