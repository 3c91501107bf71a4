"""Run a serialized TensorRT(-RTX) engine on a CUDA GPU with torch tensors.

The engine stores only the plugin's name, namespace, version and fields, so the lowbit creators are registered before
deserializing (:func:`register_engine_plugins`): by default the C++ plugin library, found and checked like the build
stage's (engines/plugin_library.py: explicit path, installed package, source checkout; a stale library is refused
before the engine is read), with the Python creators standing in, and a logged note, where no library exists.
Nothing here pretends on a machine without a GPU: :func:`gpu_available` says so, and constructing a
:class:`TrtRunner` there raises :class:`GpuUnavailableError` whose message callers report ("not run: no GPU").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserError

logger = logging.getLogger(__name__)

NO_GPU_REASON = "not run: no GPU"
# Which lowbit creators deserialize an engine: "auto" = the C++ library, the Python creators where it is missing.
RUNTIME_PLUGINS = ("auto", "cpp", "python")
DEFAULT_RUNTIME_PLUGIN = "auto"


class GpuUnavailableError(RuntimeError):
    """Raised instead of running an engine where there is no CUDA GPU."""


def gpu_available() -> bool:
    """True when torch sees a CUDA device (torch is imported lazily; a CPU-only torch answers False)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)


def device_compute_capability() -> str:
    """``MAJOR.MINOR`` of the current CUDA device (call only where :func:`gpu_available`)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def unavailable_reason(built_for: list[str] | None = None, plugin: str = "auto") -> str | None:
    """Why an engine (built ahead of time for ``built_for`` compute capabilities, or ``["current"]``) cannot run
    here with ``plugin`` (:data:`RUNTIME_PLUGINS`) -- no GPU, no TensorRT, neither plugin's native code, another GPU
    architecture -- or None. The C++ plugin library carries its own kernels: lowbit_deploy's CUDA kernel library is
    needed only where the Python plugin runs (``plugin`` "python", or "auto" without a C++ library)."""
    if not gpu_available():
        return "no GPU"
    from ..engines import backend_unavailable_reason

    reason = backend_unavailable_reason()
    if reason:
        return reason
    if plugin == "python" or not _cpp_library_found():
        from ..engines.kernels import ensure_kernel_library

        try:
            ensure_kernel_library()
        except UserError as error:
            return f"the plugin's CUDA kernel library is unavailable ({error})"
    device = device_compute_capability()
    if built_for and "current" not in built_for and device not in built_for:
        return (f"engine built for compute capabilities {', '.join(built_for)}, this GPU is {device}; rebuild with "
                f"--compute-capability {device} if your TensorRT targets it")
    return None


def _cpp_library_found() -> bool:
    """Whether the C++ plugin library for the installed TensorRT exists where the runtime looks for it (its creators
    are checked when it is loaded: register_engine_plugins)."""
    from ..engines.plugin_library import library_family, resolve_plugin_library
    from ..engines.tensorrt_import import tensorrt_backend

    path, _ = resolve_plugin_library(library_family(tensorrt_backend()))
    return path.is_file()


def _torch_dtype(trt: Any, data_type: Any) -> Any:
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool, trt.DataType.INT64: torch.int64,
             trt.DataType.BF16: torch.bfloat16, trt.DataType.UINT8: torch.uint8}
    if data_type not in table:
        raise UserError(f"engine I/O type {data_type} has no torch equivalent")
    return table[data_type]


@dataclass(frozen=True)
class PluginChoice:
    """Which lowbit creators a process registered to deserialize engines."""

    kind: str  # "cpp" or "python"
    library: Path | None  # the C++ library loaded (None for the Python creators)
    note: str | None = None  # why the Python creators stand in for the C++ library, when they do


def register_engine_plugins(backend: Any, plugin: str = DEFAULT_RUNTIME_PLUGIN,
                            library_path: str | os.PathLike[str] | None = None) -> PluginChoice:
    """Register the lowbit creators with ``backend``'s plugin registry before an engine is deserialized.

    ``plugin``: "cpp" loads the C++ library (``library_path``, else the resolution order of
    engines/plugin_library.py); "python" registers the Python creators (they need lowbit_deploy's CUDA kernel
    library at run time); "auto" (default) is "cpp", falling back to "python" with a logged note only where no library
    exists and none was asked for by path or ``$LOWBIT_PLUGIN_LIBRARY``. A library that exists but is stale, unmarked
    or of another TensorRT family is a :class:`UserError` in every mode: silently running the other plugin would hide
    it. A process that loaded the C++ library keeps it (use_plugins), so "python" after "cpp" is refused."""
    from ..engines.plugin_library import LIBRARY_ENV, PluginLibraryMissing, use_plugins

    if plugin not in RUNTIME_PLUGINS:
        raise UserError(f"unknown runtime plugin {plugin!r}; choose one of {', '.join(RUNTIME_PLUGINS)}")
    if plugin == "python":
        use_plugins(backend, "python")
        return PluginChoice("python", None)
    try:
        library = use_plugins(backend, "cpp", library_path)
    except PluginLibraryMissing as missing:
        if plugin == "cpp" or library_path or os.environ.get(LIBRARY_ENV):
            raise
        note = f"the Python lowbit plugin runs this engine's plugin layers: {missing}"
        logger.warning(note)
        use_plugins(backend, "python")
        return PluginChoice("python", None, note)
    return PluginChoice("cpp", library.path)


class TrtRunner:
    """Deserialize ``engine_path`` (with the lowbit plugins registered, see :func:`register_engine_plugins` for
    ``plugin`` and ``plugin_library``) and run it on the current CUDA device."""

    def __init__(self, engine_path: str | os.PathLike[str], backend: str | None = None,
                 plugin: str = DEFAULT_RUNTIME_PLUGIN, plugin_library: str | os.PathLike[str] | None = None) -> None:
        if not gpu_available():
            raise GpuUnavailableError(NO_GPU_REASON)
        from ..engines.tensorrt_import import tensorrt_backend

        path = Path(engine_path)
        if not path.is_file():
            raise UserError(f"engine {path} does not exist; run the build stage first")
        self.backend = tensorrt_backend(backend)
        trt = self.backend.module
        # Before the engine is read: a missing or stale library is refused (or replaced, see above) first.
        self.plugins = register_engine_plugins(self.backend, plugin, plugin_library)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{self.backend.name} could not deserialize {path}: built by another TensorRT version or "
                            "for another GPU architecture? Rebuild it here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run once: ``feeds`` maps every input name to a CUDA tensor; returns fresh CUDA tensors per output."""
        import torch

        trt = self.backend.module
        missing = sorted(set(self.input_names) - set(feeds))
        if missing:
            raise UserError(f"missing engine input(s) {missing}; the engine expects {self.input_names}")
        keep_alive = []
        for name in self.input_names:
            expected = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            tensor = torch.as_tensor(feeds[name], device="cuda").to(expected).contiguous()
            keep_alive.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name)),
                                        device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log")
        stream.synchronize()
        return outputs
