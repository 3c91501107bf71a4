"""TensorRT plugin for ``lowbit::UnpackDequantize`` v1 (docs/ops/UnpackDequantize_v1.md), written in Python.

TensorRT-RTX accepts only ``IPluginCreatorV3One`` creators (no quick plugins, shared/docs/TENSORRT.md), so this is a
classic IPluginV3 (OneCore + OneBuild + OneRuntime). The glue is thin: fields are parsed and validated by name in
:func:`parse_fields` (pure Python, testable without TensorRT), and ``enqueue`` calls the CUDA launcher of
``liblowbit_kernels.so`` through ctypes with TensorRT's device pointers and stream.

The plugin classes subclass the binding classes of one TensorRT module, and ``tensorrt`` and ``tensorrt_rtx`` are
different modules, so the classes are made per module by :func:`plugin_classes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import UserError
from ..quant import packing

OP_NAME = "UnpackDequantize"
PLUGIN_NAMESPACE = "lowbit"
PLUGIN_VERSION = "1"
FIELD_NAMES = ("levels", "qmin", "word_bits", "codes_per_word", "shape")
_SCALAR_FIELDS = ("levels", "qmin", "word_bits", "codes_per_word")
_WORD_BITS = (8, 32)
# Creators registered per TensorRT module: the registry holds a raw pointer, so Python must keep them alive.
_registered: dict[str, Any] = {}


@dataclass(frozen=True)
class UnpackDequantizeFields:
    """Validated plugin state: exactly the fields the engine serializes."""

    levels: int
    qmin: int
    word_bits: int
    codes_per_word: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def num_words(self) -> int:
        return -(-self.numel // self.codes_per_word)


def parse_fields(fields: Mapping[str, Any]) -> UnpackDequantizeFields:
    """Validate raw field values (numpy arrays or Python numbers) by name; raises UserError saying what is wrong."""
    missing = [name for name in FIELD_NAMES if name not in fields]
    if missing:
        raise UserError(f"{OP_NAME}: missing required field(s) {missing}; expected {list(FIELD_NAMES)}")
    unknown = sorted(set(fields) - set(FIELD_NAMES) - {"plugin_namespace", "plugin_version"})
    if unknown:
        raise UserError(f"{OP_NAME}: unknown field(s) {unknown}; expected {list(FIELD_NAMES)}")
    scalars = {}
    for name in _SCALAR_FIELDS:
        values = np.asarray(fields[name]).reshape(-1)
        if values.size != 1 or not np.issubdtype(values.dtype, np.integer):
            raise UserError(f"{OP_NAME}: field {name!r} must be one integer, got {values!r}")
        scalars[name] = int(values[0])
    shape = tuple(int(d) for d in np.asarray(fields["shape"]).reshape(-1))
    levels, word_bits = scalars["levels"], scalars["word_bits"]
    if not packing.MIN_LEVELS <= levels <= packing.MAX_LEVELS:
        raise UserError(f"{OP_NAME}: levels={levels} is out of range [{packing.MIN_LEVELS}, {packing.MAX_LEVELS}]")
    if word_bits not in _WORD_BITS:
        raise UserError(f"{OP_NAME}: word_bits={word_bits} is not supported; use 8 (INT8 words) or 32 (INT32 words)")
    expected = packing.codes_per_word(levels, word_bits)
    if expected < 1:
        raise UserError(f"{OP_NAME}: {levels} levels do not fit one {word_bits}-bit word; use word_bits=32")
    if scalars["codes_per_word"] != expected:
        raise UserError(f"{OP_NAME}: codes_per_word={scalars['codes_per_word']} but {levels} levels in "
                        f"{word_bits}-bit words pack {expected} codes per word")
    if not shape or any(d < 1 for d in shape):
        raise UserError(f"{OP_NAME}: shape must be non-empty with positive dimensions, got {shape}")
    return UnpackDequantizeFields(shape=shape, **scalars)


def _fields_by_name(field_collection: Iterable[Any]) -> dict[str, np.ndarray]:
    return {field.name: np.array(field.data, copy=True) for field in field_collection}


def _serialization_arrays(fields: UnpackDequantizeFields) -> dict[str, np.ndarray]:
    # Shapes are serialized as INT64: the op allows any extent, and the parser may hand either width back.
    arrays = {name: np.array([getattr(fields, name)], dtype=np.int32) for name in _SCALAR_FIELDS}
    arrays["shape"] = np.array(fields.shape, dtype=np.int64)
    return arrays


def _field_collection(trt: ModuleType, arrays: Mapping[str, np.ndarray]) -> Any:
    """PluginFields point into ``arrays`` without owning them: the caller must keep ``arrays`` alive."""
    types = {np.dtype(np.int32): trt.PluginFieldType.INT32, np.dtype(np.int64): trt.PluginFieldType.INT64}
    return trt.PluginFieldCollection([trt.PluginField(name, array, types[array.dtype])
                                      for name, array in arrays.items()])


@lru_cache(maxsize=None)
def plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """(plugin class, creator class) bound to the TensorRT module ``trt``."""

    class UnpackDequantizePlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                                 trt.IPluginV3OneRuntime):
        def __init__(self, fields: UnpackDequantizeFields) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.fields = fields
            self.plugin_name = OP_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.num_outputs = 1
            # Every instance with the same I/O shapes times the same: one cache entry for all of them.
            self.timing_cache_id = ""

        def get_capability_interface(self, capability_type: Any) -> Any:
            return self

        def clone(self) -> "UnpackDequantizePlugin":
            return UnpackDequantizePlugin(self.fields)

        def get_output_data_types(self, input_types: Any) -> list[Any]:
            return [trt.DataType.FLOAT]

        def get_output_shapes(self, inputs: Any, shape_inputs: Any, expr_builder: Any) -> list[Any]:
            dims = trt.DimsExprs(len(self.fields.shape))
            for axis, extent in enumerate(self.fields.shape):
                dims[axis] = expr_builder.constant(extent)
            return [dims]

        def supports_format_combination(self, pos: int, in_out: Any, num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            word_type = trt.DataType.INT8 if self.fields.word_bits == 8 else trt.DataType.INT32
            wanted = (word_type, trt.DataType.HALF, trt.DataType.FLOAT)
            return pos < len(wanted) and desc.type == wanted[pos]

        def configure_plugin(self, inputs: Any, outputs: Any) -> None:
            pass

        def on_shape_change(self, inputs: Any, outputs: Any) -> None:
            pass

        def get_workspace_size(self, inputs: Any, outputs: Any) -> int:
            return 0

        def get_valid_tactics(self) -> list[int]:
            return []

        def set_tactic(self, tactic: int) -> None:
            pass

        def attach_to_context(self, context: Any) -> "UnpackDequantizePlugin":
            return self.clone()

        def get_fields_to_serialize(self) -> Any:
            # The binding keeps raw pointers into the numpy buffers: they must outlive this call, so they live on self.
            self._serialized_arrays = _serialization_arrays(self.fields)
            return _field_collection(trt, self._serialized_arrays)

        def enqueue(self, input_desc: Any, output_desc: Any, inputs: Any, outputs: Any, workspace: int,
                    stream: int) -> None:
            from .kernels import load_kernel_library  # lazy: only an engine run needs the CUDA library

            fields = self.fields
            load_kernel_library().unpack_dequantize_launch(
                int(inputs[0]), fields.word_bits, int(inputs[1]), int(outputs[0]), fields.numel, fields.shape[0],
                fields.levels, fields.qmin, fields.codes_per_word, int(stream))

    class UnpackDequantizeCreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = OP_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            # Empty arrays kept on self: PluginField stores a pointer to them, not a reference.
            self._field_arrays = {name: np.array([], dtype=np.int32) for name in FIELD_NAMES}
            self.field_names = _field_collection(trt, self._field_arrays)

        def create_plugin(self, name: str, field_collection: Any, phase: Any) -> UnpackDequantizePlugin:
            return UnpackDequantizePlugin(parse_fields(_fields_by_name(field_collection)))

    return UnpackDequantizePlugin, UnpackDequantizeCreator


def register_plugins(trt: ModuleType | None = None) -> Any:
    """Register the creator with ``trt``'s plugin registry (once per module) and return it; the module keeps a
    reference so the registry's pointer stays valid."""
    if trt is None:
        from .tensorrt_import import import_tensorrt

        trt = import_tensorrt()
    key = trt.__name__
    if key not in _registered:
        _, creator_class = plugin_classes(trt)
        creator = creator_class()
        registry = trt.get_plugin_registry()
        existing = registry.get_creator(OP_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
        if existing is None and not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise RuntimeError(f"registering the {PLUGIN_NAMESPACE}::{OP_NAME} v{PLUGIN_VERSION} creator failed")
        _registered[key] = creator if existing is None else existing
    return _registered[key]
