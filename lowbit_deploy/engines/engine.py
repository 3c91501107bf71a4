"""Build a TensorRT(-RTX) engine from an exported ONNX file whose low-bit layers become UnpackDequantize plugins.

Uses Polygraphy's loaders (the library the rest of the toolchain compares against). With TensorRT for RTX the build
runs ahead of time for the requested compute capabilities, also on machines without a GPU; full TensorRT builds for
the GPU present. The engine is written atomically: a temporary file in the target directory, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..errors import UserError
from ..io import atomic_path
from .activation_plugin import OP_NAME as ACTIVATION_OP_NAME
from .plugin import OP_NAME, PLUGIN_NAMESPACE
from .plugin_library import DEFAULT_PLUGIN, PLUGIN_KINDS, check_plugin_library, use_plugins
from .tensorrt_import import TensorRTBackend, tensorrt_backend

logger = logging.getLogger(__name__)

ShapeRange = tuple[Sequence[int], Sequence[int], Sequence[int]]
DEFAULT_COMPUTE_CAPABILITIES: tuple[tuple[int, int], ...] = ((8, 9),)


@dataclass(frozen=True)
class BuildReport:
    """What one engine build produced (json-able through :meth:`to_dict` / :meth:`to_json`)."""

    onnx_path: str
    engine_path: str
    backend: str  # "tensorrt" or "tensorrt_rtx"
    backend_version: str
    engine_bytes: int
    plugin_layers: int  # layers that run lowbit::UnpackDequantize
    total_layers: int
    compute_capabilities: list[str]  # e.g. ["8.9"]; ["current"] for full TensorRT (builds for the GPU present)
    fp16: bool
    build_seconds: float
    plugin: str = DEFAULT_PLUGIN  # which UnpackDequantize creators built it: "cpp" (the C++ library) or "python"
    plugin_library: str | None = None  # path of the C++ library, None for the Python plugin
    activation_layers: int = 0  # layers that run lowbit::QuantizeDequantizeActivation (per-step activation Q/DQ)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _polygraphy_for(backend: TensorRTBackend) -> Any:
    # Polygraphy reads this switch when it is first imported and consults polygraphy.config at use time: set both so
    # Polygraphy and we agree on the module even if something imported Polygraphy earlier.
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if backend.is_rtx else "0"
    from polygraphy import config as polygraphy_config

    polygraphy_config.USE_TENSORRT_RTX = backend.is_rtx
    from polygraphy.logger import G_LOGGER

    # Polygraphy's INFO log prints the whole builder configuration per engine; the BuildReport carries what matters.
    G_LOGGER.module_severity = G_LOGGER.WARNING
    G_LOGGER.has_colors = False
    return polygraphy_config


def _is_lowbit_plugin_layer(trt: Any, layer: Any, op_name: str = OP_NAME) -> bool:
    if layer.type != trt.LayerType.PLUGIN_V3:
        return False
    layer.__class__ = trt.IPluginV3Layer  # get_layer() returns the ILayer base; the cast exposes .plugin
    core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    return (getattr(core, "plugin_name", None) == op_name
            and getattr(core, "plugin_namespace", None) == PLUGIN_NAMESPACE)


def count_plugin_layers(network: Any, trt: Any | None = None, plugin: str = DEFAULT_PLUGIN) -> int:
    """Number of ``lowbit::UnpackDequantize`` plugin layers of any op version (v1 word formats, v2 bit stream:
    same name and namespace) in a parsed ``INetworkDefinition``, or in an ONNX file (given as a path, parsed with
    the ``plugin`` creators registered: "cpp" or "python")."""
    if isinstance(network, (str, os.PathLike)):
        backend = tensorrt_backend()
        _, parsed, _ = _parse_onnx(Path(network), backend, plugin)
        return count_plugin_layers(parsed, backend.module)
    trt = trt or tensorrt_backend().module
    return sum(_is_lowbit_plugin_layer(trt, network.get_layer(i)) for i in range(network.num_layers))


def count_activation_layers(network: Any, trt: Any) -> int:
    """Number of ``lowbit::QuantizeDequantizeActivation`` plugin layers in a parsed ``INetworkDefinition``."""
    return sum(_is_lowbit_plugin_layer(trt, network.get_layer(i), ACTIVATION_OP_NAME)
               for i in range(network.num_layers))


def _parse_onnx(onnx_path: Path, backend: TensorRTBackend, plugin: str) -> tuple[Any, Any, Any]:
    if not onnx_path.is_file():
        raise UserError(f"ONNX file {onnx_path} does not exist; run the export stage first")
    use_plugins(backend, plugin)
    _polygraphy_for(backend)
    from polygraphy.backend.trt import NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    try:
        builder, network, parser = NetworkFromOnnxPath(str(onnx_path))()
    except PolygraphyException as error:
        raise UserError(f"TensorRT could not parse {onnx_path}: {error}") from None
    if network.num_outputs == 0:
        # The parser accepts some non-ONNX bytes silently and yields an empty network.
        raise UserError(f"TensorRT could not parse {onnx_path}: the network has no outputs (is it an ONNX model?)")
    return builder, network, parser


def capability_flag(member_name: str) -> str:
    """TensorRT-RTX's enum member name ("SM89", "SM120") as the MAJOR.MINOR the flag and the recipe take."""
    digits = member_name.removeprefix("SM")
    return f"{digits[:-1]}.{digits[-1]}" if digits.isdigit() and len(digits) > 1 else member_name


@contextlib.contextmanager
def captured_errors() -> Iterator[list[str]]:
    """Collect the ERROR lines Polygraphy and TensorRT log while the body runs; they still print, but on stderr.

    TensorRT states the real cause (e.g. a profile dimension that does not fit the network) only in its log; the
    exception Polygraphy raises afterwards just says "Invalid Engine". Polygraphy prints every severity below
    CRITICAL on stdout, which belongs to the command's own result (the closing line, ``--json``): the body runs
    with stdout sent to stderr."""
    import contextlib
    import sys

    from polygraphy.logger import G_LOGGER

    errors: list[str] = []
    original = G_LOGGER.log

    def log(message, severity, *args, **kwargs):
        if severity >= G_LOGGER.ERROR:
            errors.append(str(message() if callable(message) else message).strip())
        return original(message, severity, *args, **kwargs)

    G_LOGGER.log = log
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield errors
    finally:
        del G_LOGGER.log  # the class's method again


def build_failure_message(onnx_path: Path, errors: Sequence[str], detail: str = "") -> str:
    """A build failure quoting TensorRT's own error lines (the last few, deduplicated), with the usual fixes."""
    quoted = list(dict.fromkeys(line for line in errors if line))[-3:]
    cause = "; ".join(line.replace("\n", " ")[:300] for line in quoted) or detail or "no error was logged"
    return (f"building an engine from {onnx_path} failed: TensorRT: {cause}. Re-export this run's model "
            f"(`lowbit-deploy export RUN_DIR`) if model.onnx came from elsewhere; otherwise check the "
            f"build section of the recipe (batch sizes, compute capabilities) against the GPU and TensorRT version")


def _capability_enum(trt: Any, major: int, minor: int) -> Any:
    member = getattr(trt.ComputeCapability, f"SM{major}{minor}", None)
    if member is None:
        available = [capability_flag(name) for name in trt.ComputeCapability.__members__ if name.startswith("SM")]
        raise UserError(f"compute capability {major}.{minor} is not a TensorRT-RTX target; pass one of "
                        f"{', '.join(available)} to --compute-capability (or build.compute_capabilities)")
    return member


def _profiles(input_shapes: Mapping[str, ShapeRange] | None) -> list[Any] | None:
    """One optimization profile covering ``name -> (min, opt, max)`` shapes (needed for dynamic dimensions)."""
    if not input_shapes:
        return None
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for name, (minimum, optimum, maximum) in input_shapes.items():
        profile.add(name, min=tuple(minimum), opt=tuple(optimum), max=tuple(maximum))
    return [profile]


def _create_config(backend: TensorRTBackend, compute_capabilities: Sequence[tuple[int, int]], fp16: bool,
                   workspace_bytes: int | None, input_shapes: Mapping[str, ShapeRange] | None = None) -> Any:
    if backend.is_rtx:
        if fp16:
            raise UserError("fp16=True is a builder flag of full TensorRT; TensorRT-RTX is strongly typed: export "
                            "the ONNX model in float16 instead and build with fp16=False")
        for major, minor in compute_capabilities:
            _capability_enum(backend.module, major, minor)
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        pool = {backend.module.MemoryPoolType.WORKSPACE: workspace_bytes} if workspace_bytes else None
        return CreateConfigRTX(compute_capabilities=list(compute_capabilities), memory_pool_limits=pool,
                               profiles=_profiles(input_shapes))
    from polygraphy.backend.trt import CreateConfig

    pool = {backend.module.MemoryPoolType.WORKSPACE: workspace_bytes} if workspace_bytes else None
    return CreateConfig(fp16=fp16, memory_pool_limits=pool, profiles=_profiles(input_shapes))


def build_engine(onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str], *,
                 compute_capabilities: Sequence[tuple[int, int]] = DEFAULT_COMPUTE_CAPABILITIES, fp16: bool = False,
                 workspace_bytes: int | None = None, backend: str | None = None,
                 input_shapes: Mapping[str, ShapeRange] | None = None, plugin: str = DEFAULT_PLUGIN) -> BuildReport:
    """Parse ``onnx_path`` with the lowbit plugins registered, build and write the serialized engine.

    ``plugin`` picks the lowbit creators (UnpackDequantize, QuantizeDequantizeActivation): "cpp" (default: the C++ library that C++ apps load too; a
    missing, stale or wrong-family library is a UserError naming the fix, raised before anything is parsed) or
    "python" (the Python IPluginV3: engines are byte-identical, but running them needs lowbit_deploy).
    ``compute_capabilities`` are the ahead-of-time targets of TensorRT-RTX (ignored by full TensorRT, which builds
    for the GPU present). ``backend`` forces "tensorrt" or "tensorrt_rtx" (default: full TensorRT when installed).
    ``input_shapes`` maps each input with dynamic dimensions to its (min, opt, max) shapes (one profile).
    Raises :class:`UserError` for a missing or unparsable ONNX file and for unsupported options.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    chosen = tensorrt_backend(backend)
    if chosen.is_rtx and not compute_capabilities:
        raise UserError("TensorRT-RTX needs at least one compute capability to build for, e.g. ((8, 9),)")
    if plugin not in PLUGIN_KINDS:
        raise UserError(f"unknown plugin {plugin!r}; choose one of {', '.join(PLUGIN_KINDS)}")
    library = check_plugin_library(chosen) if plugin == "cpp" else None
    start = time.perf_counter()
    builder, network, parser = _parse_onnx(onnx_path, chosen, plugin)
    plugin_layers = count_plugin_layers(network, chosen.module)
    activation_layers = count_activation_layers(network, chosen.module)
    config = _create_config(chosen, compute_capabilities, fp16, workspace_bytes, input_shapes)
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException

    with captured_errors() as errors:
        try:
            serialized = EngineBytesFromNetwork((builder, network, parser), config=config)()
        except PolygraphyException as error:
            raise UserError(build_failure_message(onnx_path, errors, str(error))) from None
    payload = bytes(memoryview(serialized)) if serialized is not None else b""
    if not payload:
        raise UserError(build_failure_message(onnx_path, errors, "TensorRT produced no engine"))
    seconds = time.perf_counter() - start
    _write_atomically(engine_path, payload)
    warnings = [] if plugin_layers else [f"no {PLUGIN_NAMESPACE}::{OP_NAME} layers: weights are not kept packed"]
    report = BuildReport(
        onnx_path=str(onnx_path), engine_path=str(engine_path), backend=chosen.name, backend_version=chosen.version,
        engine_bytes=len(payload), plugin_layers=plugin_layers, total_layers=network.num_layers,
        compute_capabilities=[f"{major}.{minor}" for major, minor in compute_capabilities] if chosen.is_rtx
        else ["current"], fp16=fp16, build_seconds=round(seconds, 3), plugin=plugin,
        plugin_library=str(library.path) if library else None, activation_layers=activation_layers,
        warnings=warnings)
    logger.info("built %s: %d bytes, %d plugin layers (%s plugin) in %.2fs", engine_path, report.engine_bytes,
                plugin_layers, plugin, seconds)
    return report


def _write_atomically(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_bytes(payload)
