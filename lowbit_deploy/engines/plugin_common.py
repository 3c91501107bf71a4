"""What every lowbit Python TensorRT plugin shares: fields looked up by name and read as integers, the IPluginV3 glue
that does not depend on the op, the V3One creator, and the registration of creators with a registry.

The C++ twins are plugins/common/pluginFields.{h,cpp} (same checks and messages, so both plugins refuse a malformed
field collection alike). The classes subclass the binding classes of one TensorRT module, and ``tensorrt`` and
``tensorrt_rtx`` are different modules, so they are made per module by :func:`plugin_base` / :func:`creator_class`.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..errors import UserError

PLUGIN_NAMESPACE = "lowbit"
# Node attributes the ONNX parser may pass along; they select the plugin and are never read.
IGNORED_FIELDS = ("plugin_namespace", "plugin_version")
INT32_RANGE = (-2**31, 2**31 - 1)
_INTEGER_FIELD_TYPES = ("INT32", "INT64")
# Creators registered per (TensorRT module, op name, version): the registry holds a raw pointer, so Python keeps them.
_registered: dict[tuple[str, str, str], Any] = {}


def fields_by_name(field_collection: Iterable[Any], op_name: str) -> dict[str, np.ndarray]:
    """Field arrays by name, refusing repeated names and non-integer field types (the binding hands a CHAR field as
    an int8 array, which would otherwise pass for an integer)."""
    by_name: dict[str, np.ndarray] = {}
    for field in field_collection:
        if field.name in IGNORED_FIELDS:
            continue
        if field.name in by_name:
            raise UserError(f"{op_name}: field {field.name!r} is given more than once")
        if field.type.name not in _INTEGER_FIELD_TYPES:
            raise UserError(f"{op_name}: field {field.name!r} has type {field.type.name}; expected INT32 or INT64 "
                            "integers")
        by_name[field.name] = np.array(field.data, copy=True)
    return by_name


def check_field_names(fields: Mapping[str, Any], names: tuple[str, ...], op_name: str) -> None:
    """Every name of ``names`` present, nothing unknown (the parser's node attributes are ignored)."""
    missing = [name for name in names if name not in fields]
    if missing:
        raise UserError(f"{op_name}: missing required field(s) {missing}; expected {list(names)}")
    unknown = sorted(set(fields) - set(names) - set(IGNORED_FIELDS))
    if unknown:
        raise UserError(f"{op_name}: unknown field(s) {unknown}; expected {list(names)}")


def int32_scalar(fields: Mapping[str, Any], name: str, op_name: str) -> int:
    """The one integer of field ``name``, which must fit int32."""
    values = np.asarray(fields[name]).reshape(-1)
    if values.size != 1 or not np.issubdtype(values.dtype, np.integer):
        raise UserError(f"{op_name}: field {name!r} must be one integer, got {values!r}")
    value = int(values[0])
    if not INT32_RANGE[0] <= value <= INT32_RANGE[1]:
        raise UserError(f"{op_name}: field {name!r}={value} does not fit a 32-bit integer")
    return value


def field_collection(trt: ModuleType, arrays: Mapping[str, np.ndarray]) -> Any:
    """PluginFields point into ``arrays`` without owning them: the caller must keep ``arrays`` alive."""
    types = {np.dtype(np.int32): trt.PluginFieldType.INT32, np.dtype(np.int64): trt.PluginFieldType.INT64}
    return trt.PluginFieldCollection([trt.PluginField(name, array, types[array.dtype])
                                      for name, array in arrays.items()])


@lru_cache(maxsize=None)
def plugin_base(trt: ModuleType) -> type:
    """The op-independent IPluginV3 (OneCore + OneBuild + OneRuntime) glue bound to ``trt``. A subclass is built from
    its validated fields alone (``cls(fields)``) and defines ``serialization_arrays()`` plus the shape, type and
    enqueue methods of its op."""

    class LowbitPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, op_name: str, version: str, fields: Any) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.fields = fields
            self.plugin_name = op_name
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = version
            self.num_outputs = 1
            # Every instance with the same I/O shapes times the same: one cache entry for all of them.
            self.timing_cache_id = ""

        def get_capability_interface(self, capability_type: Any) -> Any:
            return self

        def clone(self) -> Any:
            return type(self)(self.fields)

        def get_workspace_size(self, inputs: Any, outputs: Any) -> int:
            return 0

        def get_valid_tactics(self) -> list[int]:
            return []

        def set_tactic(self, tactic: int) -> None:
            pass

        def attach_to_context(self, context: Any) -> Any:
            # The CUDA library is found (and, from a source checkout, built) here, when an execution context is
            # created -- never inside enqueue, which runs per layer per inference.
            from .kernels import load_kernel_library  # lazy: only an engine run needs the CUDA library

            attached = self.clone()
            attached.library = load_kernel_library()
            return attached

        def get_fields_to_serialize(self) -> Any:
            # The binding keeps raw pointers into the numpy buffers: they must outlive this call, so they live on self.
            self._serialized_arrays = self.serialization_arrays()
            return field_collection(trt, self._serialized_arrays)

        def attached_library(self) -> Any:
            library = getattr(self, "library", None)
            if library is None:
                raise RuntimeError(f"{PLUGIN_NAMESPACE}::{self.plugin_name} enqueued before attach_to_context loaded "
                                   "its CUDA library")
            return library

    return LowbitPlugin


def creator_class(trt: ModuleType, op_name: str, version: str, field_names: tuple[str, ...],
                  make_plugin: Callable[[dict[str, np.ndarray]], Any]) -> type:
    """An IPluginCreatorV3One for ``op_name`` ``version``: declares ``field_names`` (INT32, no data: the ONNX parser
    passes these attributes) and builds plugins with ``make_plugin(fields by name)``."""

    class LowbitCreator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = op_name
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = version
            # Empty arrays kept on self: PluginField stores a pointer to them, not a reference.
            self._field_arrays = {name: np.array([], dtype=np.int32) for name in field_names}
            self.field_names = field_collection(trt, self._field_arrays)

        def create_plugin(self, name: str, collection: Any, phase: Any) -> Any:
            return make_plugin(fields_by_name(collection, op_name))

    LowbitCreator.__name__ = LowbitCreator.__qualname__ = f"{op_name}Creator"
    return LowbitCreator


def register_creator(trt: ModuleType, op_name: str, version: str, make_creator: Callable[[], Any]) -> Any:
    """Register ``make_creator()`` as ``lowbit::op_name`` ``version`` with ``trt``'s registry once per module (a
    creator already in the registry is kept) and return the registered creator."""
    key = (trt.__name__, op_name, version)
    if key not in _registered:
        registry = trt.get_plugin_registry()
        existing = registry.get_creator(op_name, version, PLUGIN_NAMESPACE)
        creator = make_creator() if existing is None else existing
        if existing is None and not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise RuntimeError(f"registering the {PLUGIN_NAMESPACE}::{op_name} v{version} creator failed")
        _registered[key] = creator
    return _registered[key]


def deregister_creators(trt: ModuleType) -> None:
    """Deregister every Python creator this process registered with ``trt``'s registry (before loading the C++
    library, whose creators have the same names and versions)."""
    registry = trt.get_plugin_registry()
    for key in [key for key in _registered if key[0] == trt.__name__]:
        creator = _registered.pop(key)
        if not registry.deregister_creator(creator):
            raise UserError(f"could not deregister the Python {key[1]} v{key[2]} creator before loading the C++ "
                            "plugin library; use a fresh process")
