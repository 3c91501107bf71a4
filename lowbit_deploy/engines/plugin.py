"""TensorRT plugin for ``lowbit::UnpackDequantize`` v1 (docs/ops/UnpackDequantize_v1.md, word formats) and v2
(docs/ops/UnpackDequantize_v2.md, bit stream), written in Python.

TensorRT-RTX accepts only ``IPluginCreatorV3One`` creators (no quick plugins, shared/docs/TENSORRT.md), so this is a
classic IPluginV3 (OneCore + OneBuild + OneRuntime). The glue is thin: fields are parsed and validated by name in
:func:`parse_fields` / :func:`parse_fields_v2` (pure Python, testable without TensorRT), and ``enqueue`` calls the
version's CUDA launcher of ``liblowbit_kernels.so`` through ctypes with TensorRT's device pointers and stream.
Everything that differs between versions lives in the validated fields class (packed input type, launcher), and
:data:`PLUGIN_VERSIONS` maps a version to its fields parser; one creator per version is registered.

The plugin classes subclass the binding classes of one TensorRT module, and ``tensorrt`` and ``tensorrt_rtx`` are
different modules, so the classes are made per module (and version) by :func:`plugin_classes`; the glue that does
not depend on the op (field lookup, creator, registration) is in engines/plugin_common.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from ..errors import UserError
from ..quant import packing
from .plugin_common import (
    IGNORED_FIELDS,
    PLUGIN_NAMESPACE,
    check_field_names,
    creator_class,
    field_collection,
    fields_by_name,
    int32_scalar,
    plugin_base,
    register_creator,
)

OP_NAME = "UnpackDequantize"
PLUGIN_VERSION = "1"
PLUGIN_VERSION_V2 = "2"
FIELD_NAMES = ("levels", "qmin", "word_bits", "codes_per_word", "shape")
FIELD_NAMES_V2 = ("levels", "qmin", "group_size", "group_bits", "shape")
# TensorRT tensors have at most 8 dimensions (Dims::MAX_DIMS).
MAX_RANK = 8
# Keeps every count derived from prod(shape) far from int64 overflow (2^48 float32 outputs = 1 PiB: no real weight).
# Mirrored by kMAX_WEIGHT_ELEMENTS in plugins/unpack_dequantize/unpackDequantizeFields.h.
MAX_WEIGHT_ELEMENTS = 2**48
_INT32_MAX = 2**31 - 1
_WORD_BITS = (8, 32)


@dataclass(frozen=True)
class UnpackDequantizeFields:
    """Validated v1 plugin state: exactly the fields the engine serializes."""

    levels: int
    qmin: int
    word_bits: int
    codes_per_word: int
    shape: tuple[int, ...]

    field_names = FIELD_NAMES

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def num_words(self) -> int:
        return -(-self.numel // self.codes_per_word)

    @property
    def packed_type(self) -> str:
        """Name of the TensorRT DataType of the packed input."""
        return "INT8" if self.word_bits == 8 else "INT32"

    def launch(self, library: Any, packed: int, scale: int, out: int, stream: int, out_fp16: bool = False) -> None:
        library.unpack_dequantize_launch(packed, self.word_bits, scale, out, self.numel, self.shape[0], self.levels,
                                         self.qmin, self.codes_per_word, stream, out_fp16=out_fp16)


@dataclass(frozen=True)
class UnpackDequantizeBitstreamFields:
    """Validated v2 plugin state (bit stream): exactly the fields the engine serializes."""

    levels: int
    qmin: int
    group_size: int
    group_bits: int
    shape: tuple[int, ...]

    field_names = FIELD_NAMES_V2

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def num_bytes(self) -> int:
        """Length of the INT8 stream: ceil(ceil(numel / g) * B / 8)."""
        return packing.PackedLayout(self.levels, packing.PackingFormat.BITSTREAM, self.numel).num_words

    @property
    def packed_type(self) -> str:
        return "INT8"

    def launch(self, library: Any, packed: int, scale: int, out: int, stream: int, out_fp16: bool = False) -> None:
        library.unpack_dequantize_bitstream_launch(packed, self.num_bytes, scale, out, self.numel, self.shape[0],
                                                   self.levels, self.qmin, self.group_size, self.group_bits, stream,
                                                   out_fp16=out_fp16)


def _parse_common(fields: Mapping[str, Any], names: tuple[str, ...]) -> tuple[dict[str, int], tuple[int, ...]]:
    """Checks shared by every version, in the order of the C++ plugin (unpackDequantizeFields.cpp): presence, no
    unknown names, one 32-bit integer per scalar, an integer shape, levels range, qmin + levels - 1 in int32."""
    check_field_names(fields, names, OP_NAME)
    scalars = {name: int32_scalar(fields, name, OP_NAME) for name in names if name != "shape"}
    shape_values = np.asarray(fields["shape"]).reshape(-1)
    if shape_values.size and not np.issubdtype(shape_values.dtype, np.integer):
        raise UserError(f"{OP_NAME}: field 'shape' must hold integers, got {shape_values!r}")
    shape = tuple(int(d) for d in shape_values)
    levels = scalars["levels"]
    if not packing.MIN_LEVELS <= levels <= packing.MAX_LEVELS:
        raise UserError(f"{OP_NAME}: levels={levels} is out of range [{packing.MIN_LEVELS}, {packing.MAX_LEVELS}]")
    if scalars["qmin"] + levels - 1 > _INT32_MAX:
        raise UserError(f"{OP_NAME}: qmin={scalars['qmin']} with {levels} levels overflows a 32-bit integer")
    return scalars, shape


def _check_shape(shape: tuple[int, ...]) -> None:
    if not shape or len(shape) > MAX_RANK:
        raise UserError(f"{OP_NAME}: shape must be non-empty with at most {MAX_RANK} dimensions, got {shape}")
    if any(d < 1 for d in shape):
        raise UserError(f"{OP_NAME}: shape must be non-empty with positive dimensions, got {shape}")
    if math.prod(shape) > MAX_WEIGHT_ELEMENTS:
        raise UserError(f"{OP_NAME}: shape {shape} has more than 2^48 elements")


def parse_fields(fields: Mapping[str, Any]) -> UnpackDequantizeFields:
    """Validate raw v1 field values (numpy arrays or Python numbers) by name; raises UserError saying what is
    wrong."""
    scalars, shape = _parse_common(fields, FIELD_NAMES)
    levels, word_bits = scalars["levels"], scalars["word_bits"]
    if word_bits not in _WORD_BITS:
        raise UserError(f"{OP_NAME}: word_bits={word_bits} is not supported; use 8 (INT8 words) or 32 (INT32 words)")
    expected = packing.codes_per_word(levels, word_bits)
    if expected < 1:
        raise UserError(f"{OP_NAME}: {levels} levels do not fit one {word_bits}-bit word; use word_bits=32")
    if scalars["codes_per_word"] != expected:
        raise UserError(f"{OP_NAME}: codes_per_word={scalars['codes_per_word']} but {levels} levels in "
                        f"{word_bits}-bit words pack {expected} codes per word")
    _check_shape(shape)
    return UnpackDequantizeFields(shape=shape, **scalars)


def parse_fields_v2(fields: Mapping[str, Any]) -> UnpackDequantizeBitstreamFields:
    """Validate raw v2 (bit stream) field values by name; ``group_size``/``group_bits`` must be the group that
    ``packing.bitstream_group(levels)`` chooses."""
    scalars, shape = _parse_common(fields, FIELD_NAMES_V2)
    levels = scalars["levels"]
    expected = packing.bitstream_group(levels)
    if (scalars["group_size"], scalars["group_bits"]) != expected:
        raise UserError(f"{OP_NAME} v2: group_size={scalars['group_size']}, group_bits={scalars['group_bits']} but "
                        f"{levels} levels use the bit-stream group (group_size, group_bits) = {expected}")
    _check_shape(shape)
    return UnpackDequantizeBitstreamFields(shape=shape, **scalars)


def check_input_lengths(fields: Any, packed_length: int, scale_length: int) -> None:
    """Build-time check of the input lengths against the fields (twin of lowbit::plugin::checkInputLengths): a short
    packed or scale input would be an out-of-bounds read at run time."""
    expected = fields.num_words if fields.field_names == FIELD_NAMES else fields.num_bytes
    unit = "words" if fields.field_names == FIELD_NAMES else "stream bytes"
    if packed_length != expected:
        raise UserError(f"{OP_NAME}: the packed input has {packed_length} elements but {fields.numel} codes need "
                        f"{expected} {unit}")
    if scale_length != fields.shape[0]:
        raise UserError(f"{OP_NAME}: the scale input has {scale_length} elements but shape[0] is {fields.shape[0]} "
                        "(one scale per output channel)")


def _check_io(fields: Any, input_dims: list[tuple[int, ...]], num_outputs: int) -> None:
    if len(input_dims) != 2 or num_outputs != 1:
        raise UserError(f"{OP_NAME}: expected 2 inputs (packed, scale) and 1 output, got {len(input_dims)} inputs and "
                        f"{num_outputs} outputs")
    for index, dims in enumerate(input_dims):
        if len(dims) != 1:
            raise UserError(f"{OP_NAME}: input {index} must be one-dimensional, got {len(dims)} dimensions")
    check_input_lengths(fields, input_dims[0][0], input_dims[1][0])


class PluginVersion(NamedTuple):
    field_names: tuple[str, ...]
    parse: Callable[[Mapping[str, Any]], Any]


# Plugin version -> its fields and parser; the parsed fields carry everything else that is version-specific.
PLUGIN_VERSIONS: dict[str, PluginVersion] = {
    PLUGIN_VERSION: PluginVersion(FIELD_NAMES, parse_fields),
    PLUGIN_VERSION_V2: PluginVersion(FIELD_NAMES_V2, parse_fields_v2),
}


def _serialization_arrays(fields: Any) -> dict[str, np.ndarray]:
    # Shapes are serialized as INT64: the op allows any extent, and the parser may hand either width back.
    arrays = {name: np.array([getattr(fields, name)], dtype=np.int32) for name in fields.field_names
              if name != "shape"}
    arrays["shape"] = np.array(fields.shape, dtype=np.int64)
    return arrays


@lru_cache(maxsize=None)
def plugin_classes(trt: ModuleType, version: str = PLUGIN_VERSION) -> tuple[type, type]:
    """(plugin class, creator class) of plugin ``version`` bound to the TensorRT module ``trt``."""
    field_names, parse = PLUGIN_VERSIONS[version]

    class UnpackDequantizePlugin(plugin_base(trt)):
        def __init__(self, fields: Any) -> None:
            super().__init__(OP_NAME, version, fields)

        def serialization_arrays(self) -> dict[str, np.ndarray]:
            return _serialization_arrays(self.fields)

        def get_output_data_types(self, input_types: Any) -> list[Any]:
            # The op's output type. HALF is offered through supports_format_combination: a network that is not
            # strongly typed may pick it; a strongly typed one (every TensorRT-RTX network) keeps this type.
            return [trt.DataType.FLOAT]

        def get_output_shapes(self, inputs: Any, shape_inputs: Any, expr_builder: Any) -> list[Any]:
            # The packed weight and its scales are initializers, so their lengths are build-time constants: a
            # mismatch with the fields (an out-of-bounds read at run time) is refused before the engine exists.
            lengths = [tuple(d.get_constant_value() for d in dims) for dims in inputs
                       if all(d.is_constant() for d in dims)]
            if len(lengths) == len(inputs):
                _check_io(self.fields, lengths, 1)
            dims = trt.DimsExprs(len(self.fields.shape))
            for axis, extent in enumerate(self.fields.shape):
                dims[axis] = expr_builder.constant(extent)
            return [dims]

        def supports_format_combination(self, pos: int, in_out: Any, num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            # Output: float32, or float16 (the float32 value rounded to nearest even) for networks in half precision.
            wanted = ((getattr(trt.DataType, self.fields.packed_type),), (trt.DataType.HALF,),
                      (trt.DataType.FLOAT, trt.DataType.HALF))
            return pos < len(wanted) and desc.type in wanted[pos]

        def configure_plugin(self, inputs: Any, outputs: Any) -> None:
            _check_io(self.fields, [tuple(i.desc.dims) for i in inputs], len(outputs))
            if outputs[0].desc.type not in (trt.DataType.FLOAT, trt.DataType.HALF):
                raise UserError(f"{OP_NAME}: the output must be FLOAT or HALF, got {outputs[0].desc.type}")

        def on_shape_change(self, inputs: Any, outputs: Any) -> None:
            _check_io(self.fields, [tuple(i.dims) for i in inputs], len(outputs))

        def enqueue(self, input_desc: Any, output_desc: Any, inputs: Any, outputs: Any, workspace: int,
                    stream: int) -> None:
            self.fields.launch(self.attached_library(), int(inputs[0]), int(inputs[1]), int(outputs[0]), int(stream),
                               out_fp16=output_desc[0].type == trt.DataType.HALF)

    creator = creator_class(trt, OP_NAME, version, field_names, lambda fields: UnpackDequantizePlugin(parse(fields)))
    return UnpackDequantizePlugin, creator


def register_plugins(trt: ModuleType | None = None) -> dict[str, Any]:
    """Register every lowbit Python creator with ``trt``'s plugin registry (once per module): one UnpackDequantize
    creator per plugin version, and QuantizeDequantizeActivation v1 (engines/activation_plugin.py). Returns the
    UnpackDequantize creators by version; the creators are kept referenced so the registry's pointers stay valid."""
    if trt is None:
        from .tensorrt_import import import_tensorrt

        trt = import_tensorrt()
    from .activation_plugin import register_activation_plugin

    creators = {version: register_creator(trt, OP_NAME, version, plugin_classes(trt, version)[1])
                for version in PLUGIN_VERSIONS}
    register_activation_plugin(trt)
    return creators
