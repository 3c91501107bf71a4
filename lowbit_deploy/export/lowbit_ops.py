"""ONNX emission of ``lowbit::UnpackDequantize``: the node, its packed initializers, and the model-local function
that is the portable reference in standard ops.

Two op versions exist (docs/ops/UnpackDequantize_v1.md, UnpackDequantize_v2.md): v1 decodes the word formats,
v2 the bit stream. The version of a custom domain is declared once per model (``opset_import``), so every lowbit
node of one model has the same version; :func:`attach_function` enforces that. The emission API is
version-agnostic: :func:`node_spec` / :func:`make_node` / :func:`make_initializers` / :func:`attach_function` pick
the version from the weight's :class:`~lowbit_deploy.quant.packing.PackingFormat` (:func:`op_version`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..quant.packing import PackedLayout, PackingFormat, pack_codes, unpack_codes

OP_DOMAIN = "lowbit"
OP_TYPE = "UnpackDequantize"
OP_VERSION = 1  # version of the word formats; see op_version() for a given format
PLUGIN_NAMESPACE = "lowbit"
PLUGIN_VERSION = "1"

_ONNX_WORD_TYPES = {PackingFormat.INT8_WORDS: TensorProto.INT8, PackingFormat.INT32_WORDS: TensorProto.INT32,
                    PackingFormat.BITSTREAM: TensorProto.INT8}
_OP_VERSIONS = {PackingFormat.INT8_WORDS: 1, PackingFormat.INT32_WORDS: 1, PackingFormat.BITSTREAM: 2}


def op_version(fmt: PackingFormat) -> int:
    """Version of ``lowbit::UnpackDequantize`` that decodes ``fmt``: 1 for the word formats, 2 for BITSTREAM."""
    return _OP_VERSIONS[PackingFormat(fmt)]


@dataclass(frozen=True)
class PackedWeight:
    """A weight ready for emission: packed words (or bit stream), float16 scales and the layout that decodes them."""

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
    def op_version(self) -> int:
        return op_version(self.layout.fmt)

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


def _int_const(output: str, value: Any) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value=numpy_helper.from_array(np.array(value, dtype=np.int64)))


def _digits_and_dequantize(groups: str) -> list[onnx.NodeProto]:
    """Shared tail of both versions: base-L digits of the unsigned group values ``groups`` (``[G]`` int64), least
    significant first, then ``float32(code + qmin) * float32(scale[channel])``. Needs ``levels``, ``qmin``,
    ``group_size``, ``shape`` and the small constants of :func:`_common_constants`."""
    return [
        # Digit j of every group: (value // L**j) % L.
        helper.make_node("Range", ["zero", "group_size", "one"], ["digit_index"]),
        helper.make_node("Pow", ["levels", "digit_index"], ["digit_weight"]),
        helper.make_node("Unsqueeze", [groups, "axis1"], ["groups_column"]),
        helper.make_node("Div", ["groups_column", "digit_weight"], ["shifted_digits"]),
        helper.make_node("Mod", ["shifted_digits", "levels"], ["digits"], fmod=0),
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


def _common_constants() -> list[onnx.NodeProto]:
    return [
        _constant_from_attribute("levels", "levels"),
        _constant_from_attribute("qmin", "qmin"),
        _constant_from_attribute("shape", "shape", onnx.AttributeProto.INTS),
        _int_const("zero", 0), _int_const("one", 1), _int_const("two", 2),
        _int_const("flat_shape", [-1]), _int_const("axis1", [1]), _int_const("start0", [0]), _int_const("end1", [1]),
    ]


def make_function(opset: int) -> onnx.FunctionProto:
    """v1 portable reference: decodes the packed words with standard ONNX ops (int64 arithmetic)."""
    nodes = [
        *_common_constants(),
        _constant_from_attribute("word_bits", "word_bits"),
        _constant_from_attribute("group_size", "codes_per_word"),
        # Reinterpret the signed storage word as unsigned: Mod with a positive divisor (fmod=0) is non-negative.
        helper.make_node("Pow", ["two", "word_bits"], ["word_modulus"]),
        helper.make_node("Cast", ["packed"], ["packed_i64"], to=TensorProto.INT64),
        helper.make_node("Mod", ["packed_i64", "word_modulus"], ["words_unsigned"], fmod=0),
        *_digits_and_dequantize("words_unsigned"),
    ]
    return helper.make_function(
        OP_DOMAIN, OP_TYPE, inputs=["packed", "scale"], outputs=["weight"], nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["levels", "qmin", "word_bits", "codes_per_word", "shape"],
    )


_LOAD_BYTES = 8


def _little_endian_load(first_byte: str, output: str) -> list[onnx.NodeProto]:
    """``output[i] = sum_j stream[first_byte[i] + j] * 256**j`` over 8 bytes, by Horner from the top byte, with
    bit 63 (the top bit of byte 7) cleared: a group plus its bit offset spans at most 63 bits, so it never needs
    that bit, and without it the load is a non-negative int64."""
    nodes = [_int_const("top_byte_modulus", 128)]
    partial = ""
    for byte in reversed(range(_LOAD_BYTES)):
        index, value = f"byte_index{byte}", f"byte{byte}"
        nodes += [_int_const(f"byte_offset{byte}", byte),
                  helper.make_node("Add", [first_byte, f"byte_offset{byte}"], [index]),
                  helper.make_node("Gather", ["stream", index], [value], axis=0)]
        if byte == _LOAD_BYTES - 1:
            nodes.append(helper.make_node("Mod", [value, "top_byte_modulus"], ["partial7"], fmod=0))
        else:
            nodes += [helper.make_node("Mul", [partial, "byte_base"], [f"{partial}_shifted"]),
                      helper.make_node("Add", [f"{partial}_shifted", value], [f"partial{byte}"])]
        partial = f"partial{byte}"
    nodes.append(helper.make_node("Identity", [partial], [output]))
    return nodes


def make_function_v2(opset: int) -> onnx.FunctionProto:
    """v2 portable reference: decodes the bit stream with standard ONNX ops, in int64 without overflow.

    Group ``i`` starts at stream bit ``i*B``; the 8 bytes from ``i*B // 8`` hold it (B <= 56) and are combined
    into one little-endian int64 (:func:`_little_endian_load`), then ``// 2**(i*B % 8)`` and ``% 2**B`` cut the group
    out. Every value stays below 2**63 and every op used is exact on int64 in ONNX Runtime (ReduceSum is not: it
    rounds large int64 sums, so the bytes are combined with Mul/Add).
    """
    nodes = [
        *_common_constants(),
        _constant_from_attribute("group_size", "group_size"),
        _constant_from_attribute("group_bits", "group_bits"),
        _int_const("eight", 8), _int_const("byte_base", 256), _int_const("stream_slack", [0] * _LOAD_BYTES),
        # Signed bytes -> unsigned; 8 zero bytes appended so every window stays inside the tensor.
        helper.make_node("Cast", ["packed"], ["packed_i64"], to=TensorProto.INT64),
        helper.make_node("Mod", ["packed_i64", "byte_base"], ["bytes_unsigned"], fmod=0),
        helper.make_node("Concat", ["bytes_unsigned", "stream_slack"], ["stream"], axis=0),
        # G = ceil(numel / g) groups; group i starts at bit i*B.
        helper.make_node("ReduceProd", ["shape"], ["numel_scalar"], keepdims=0),
        helper.make_node("Sub", ["group_size", "one"], ["group_size_minus_one"]),
        helper.make_node("Add", ["numel_scalar", "group_size_minus_one"], ["numel_rounded"]),
        helper.make_node("Div", ["numel_rounded", "group_size"], ["num_groups"]),
        helper.make_node("Range", ["zero", "num_groups", "one"], ["group_index"]),
        helper.make_node("Mul", ["group_index", "group_bits"], ["bit_start"]),
        helper.make_node("Div", ["bit_start", "eight"], ["first_byte"]),
        helper.make_node("Mod", ["bit_start", "eight"], ["bit_offset"], fmod=0),
        *_little_endian_load("first_byte", "load"),
        helper.make_node("Pow", ["two", "bit_offset"], ["offset_divisor"]),
        helper.make_node("Div", ["load", "offset_divisor"], ["load_shifted"]),
        helper.make_node("Pow", ["two", "group_bits"], ["group_modulus"]),
        helper.make_node("Mod", ["load_shifted", "group_modulus"], ["group_values"], fmod=0),
        *_digits_and_dequantize("group_values"),
    ]
    return helper.make_function(
        OP_DOMAIN, OP_TYPE, inputs=["packed", "scale"], outputs=["weight"], nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["levels", "qmin", "group_size", "group_bits", "shape"],
    )


def _v1_attributes(weight: PackedWeight) -> dict[str, Any]:
    return {"word_bits": weight.layout.fmt.word_bits, "codes_per_word": weight.layout.codes_per_word}


def _v2_attributes(weight: PackedWeight) -> dict[str, Any]:
    return {"group_size": weight.layout.group_size, "group_bits": weight.layout.group_bits}


# Per op version: the layout attributes of a node and the local function that implements it.
_LAYOUT_ATTRIBUTES: dict[int, Callable[[PackedWeight], dict[str, Any]]] = {1: _v1_attributes, 2: _v2_attributes}
_FUNCTIONS: dict[int, Callable[[int], onnx.FunctionProto]] = {1: make_function, 2: make_function_v2}


def node_spec(weight: PackedWeight) -> tuple[str, str, dict[str, Any]]:
    """``(domain, op_type, attributes)`` of the node that decodes ``weight``, for its op version."""
    version = weight.op_version
    attributes = {"levels": weight.levels, "qmin": weight.qmin, **_LAYOUT_ATTRIBUTES[version](weight),
                  "shape": list(weight.shape), "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": str(version)}
    return OP_DOMAIN, OP_TYPE, attributes


def make_initializers(weight: PackedWeight) -> tuple[onnx.TensorProto, onnx.TensorProto]:
    packed = numpy_helper.from_array(weight.packed_words, f"{weight.name}.packed")
    if packed.data_type != _ONNX_WORD_TYPES[weight.layout.fmt]:
        raise ValueError(f"{weight.name}: packed words of {weight.layout.fmt.name} must be "
                         f"{TensorProto.DataType.Name(_ONNX_WORD_TYPES[weight.layout.fmt])}")
    scale = numpy_helper.from_array(weight.scale_fp16, f"{weight.name}.scale")
    return packed, scale


def make_node(weight: PackedWeight, output_name: str) -> onnx.NodeProto:
    domain, op_type, attributes = node_spec(weight)
    return helper.make_node(op_type, [f"{weight.name}.packed", f"{weight.name}.scale"], [output_name],
                            name=f"{weight.name}.unpack", domain=domain, **attributes)


def _node_version(node: onnx.NodeProto) -> int:
    value = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "plugin_version"), None)
    versions = {str(v).encode(): v for v in _FUNCTIONS}
    if value not in versions:
        raise ValueError(f"{OP_DOMAIN}::{OP_TYPE} node {node.name!r} has plugin_version={value!r}; expected one of "
                         f"{sorted(_FUNCTIONS)} (emit nodes with make_node)")
    return versions[value]


def model_op_version(model: onnx.ModelProto) -> int | None:
    """The one op version the model's ``lowbit::UnpackDequantize`` nodes use (None without such nodes). Raises
    ValueError when nodes of several versions are mixed."""
    versions = {_node_version(n) for n in model.graph.node if n.domain == OP_DOMAIN and n.op_type == OP_TYPE}
    if len(versions) > 1:
        raise ValueError(f"the model mixes {OP_DOMAIN}::{OP_TYPE} versions {sorted(versions)}, but a custom "
                         "domain has one version per model (opset_import); pack every weight with the word formats "
                         "(v1) or every weight with BITSTREAM (v2)")
    return versions.pop() if versions else None


def attach_function(model: onnx.ModelProto, opset: int) -> None:
    """Declare the ``lowbit`` domain at the version the model's nodes use and add that version's local function
    once. Call it after adding the nodes; a model without lowbit nodes is left unchanged."""
    version = model_op_version(model)
    if version is None:
        return
    declared = [imp.version for imp in model.opset_import if imp.domain == OP_DOMAIN]
    if declared and declared != [version]:
        raise ValueError(f"the model declares {OP_DOMAIN} opset {declared} but its nodes are version {version}")
    if not declared:
        model.opset_import.append(helper.make_opsetid(OP_DOMAIN, version))
    if not any(fn.domain == OP_DOMAIN and fn.name == OP_TYPE for fn in model.functions):
        model.functions.append(_FUNCTIONS[version](opset))


def standalone_model(weight: PackedWeight, opset: int = 17) -> onnx.ModelProto:
    """A model holding one packed weight whose only output is the dequantized weight (for tests and tools)."""
    packed, scale = make_initializers(weight)
    output = helper.make_tensor_value_info("weight", TensorProto.FLOAT, list(weight.shape))
    graph = helper.make_graph([make_node(weight, "weight")], "unpack", [], [output], initializer=[packed, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    attach_function(model, opset)
    model.ir_version = 10
    return model
