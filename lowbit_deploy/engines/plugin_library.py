"""Which lowbit creators (``UnpackDequantize`` v1/v2, ``QuantizeDequantizeActivation`` v1) a process registers: the
C++ plugin library (default) or the Python plugins (fallback).

The C++ library (plugins/, built by CMake into ``plugins/build/liblowbit_plugins_trt<major>.so``) is what C++ apps
load too, so engines built with it need no Python at inference. It only works with the TensorRT family whose headers
it was compiled against (shared/docs/TENSORRT.md): ``trt11`` for TensorRT 11.x and TensorRT-RTX 1.x, ``trt10`` for
TensorRT 10.x. The library embeds the header version it was built with (``lowbit-plugin-build-info`` in its bytes);
:func:`check_plugin_library` refuses a missing, stale (older than a source) or wrong-family library before anything
is built, naming the command that fixes it.

Both plugins have the same name, namespace, version and serialized fields, so a registry holds one of them at a
time: :func:`use_plugins` deregisters the Python creators before loading the library (the library itself cannot be
unloaded again, see there).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import UserError
from .tensorrt_import import TensorRTBackend

PLUGINS_DIR = Path(__file__).resolve().parents[2] / "plugins"
PLUGIN_KINDS = ("cpp", "python")
DEFAULT_PLUGIN = "cpp"
# Overrides the library path (e.g. a library built elsewhere against an installation's headers).
LIBRARY_ENV = "LOWBIT_PLUGIN_LIBRARY"
BUILD_COMMAND = "make -C plugins tensorrt"
CMAKE_COMMAND = "cmake -S plugins -B plugins/build/cmake && cmake --build plugins/build/cmake -j"
_BUILD_INFO = re.compile(rb"lowbit-plugin-build-info: tensorrt-headers=(\d+)\.(\d+)\.(\d+);")
_SOURCE_SUFFIXES = (".cu", ".h", ".cuh", ".cpp", ".map")
# Per TensorRT module: ("cpp", path, handle) or ("python", None, creators). The registry keeps raw pointers.
_active: dict[str, tuple[str, Path | None, Any]] = {}


@dataclass(frozen=True)
class PluginLibrary:
    """A checked C++ plugin library."""

    path: Path
    family: int  # TensorRT major version of the headers it was compiled against
    header_version: str


def library_family(backend: TensorRTBackend) -> int:
    """TensorRT header family a runtime needs: 11 for TensorRT-RTX 1.x (it uses the 11.x layouts), else the
    TensorRT major version."""
    return 11 if backend.is_rtx else int(backend.version.split(".")[0])


def library_name(family: int) -> str:
    return f"liblowbit_plugins_trt{family}.so"


def _fix(family: int) -> str:
    return (f"build it with `{BUILD_COMMAND}` (or `{CMAKE_COMMAND}`; pass -DTensorRT_INCLUDE_DIR=<dir> for your "
            f"installation's headers), set {LIBRARY_ENV}=/path/to/{library_name(family)}, or build with the Python "
            "plugin instead (--plugin python)")


def read_build_info(path: Path) -> str | None:
    """The TensorRT header version ("11.1.0") a plugin library was compiled against, or None if it has no marker."""
    match = _BUILD_INFO.search(path.read_bytes())
    return ".".join(part.decode() for part in match.groups()) if match else None


def _newest_source(plugins_dir: Path) -> Path | None:
    sources = [p for p in plugins_dir.rglob("*")
               if (p.suffix in _SOURCE_SUFFIXES or p.name == "CMakeLists.txt")
               and p.relative_to(plugins_dir).parts[0] != "build"]
    return max(sources, key=lambda p: p.stat().st_mtime, default=None)


def check_plugin_library(backend: TensorRTBackend, path: str | os.PathLike[str] | None = None,
                         plugins_dir: Path = PLUGINS_DIR) -> PluginLibrary:
    """The C++ library for ``backend``'s family, checked: present, carrying the build marker of the right header
    family and, in a source checkout, not older than any source under ``plugins_dir``. Raises :class:`UserError`
    naming the fix otherwise. ``path`` (or ``$LOWBIT_PLUGIN_LIBRARY``) overrides the default location."""
    family = library_family(backend)
    explicit = path or os.environ.get(LIBRARY_ENV)
    library = Path(explicit) if explicit else plugins_dir / "build" / library_name(family)
    if not library.is_file():
        raise UserError(f"the C++ plugin library {library} is missing; {_fix(family)}")
    header_version = read_build_info(library)
    if header_version is None:
        raise UserError(f"{library} is not a lowbit plugin library (no build marker); {_fix(family)}")
    built_family = int(header_version.split(".")[0])
    if built_family != family:
        raise UserError(f"{library} was compiled against TensorRT {header_version} headers but {backend.name} "
                        f"{backend.version} needs {family}.x headers (the logger and registry layouts differ); "
                        f"{_fix(family)}")
    newest = _newest_source(plugins_dir) if not explicit and plugins_dir.is_dir() else None
    if newest is not None and newest.stat().st_mtime > library.stat().st_mtime:
        raise UserError(f"the C++ plugin library {library} is older than its source {newest}; {_fix(family)}")
    return PluginLibrary(library, family, header_version)


def use_plugins(backend: TensorRTBackend, kind: str = DEFAULT_PLUGIN,
                library_path: str | os.PathLike[str] | None = None) -> PluginLibrary | None:
    """Register the ``kind`` ("cpp" or "python") lowbit creators (UnpackDequantize v1 and v2,
    QuantizeDequantizeActivation v1) with ``backend``'s plugin registry and return the C++ library used (None for
    "python").

    Python creators are deregistered before the C++ library is loaded. The reverse is refused: TensorRT-RTX 1.7
    cannot unload a plugin library safely (``deregister_library`` leaves dangling creators: the next registry
    lookup crashes, measured here), so a process that loaded the C++ library keeps it."""
    if kind not in PLUGIN_KINDS:
        raise UserError(f"unknown plugin {kind!r}; choose one of {', '.join(PLUGIN_KINDS)}")
    trt = backend.module
    current = _active.get(trt.__name__)
    if kind == "python":
        if current is not None and current[0] == "cpp":
            raise UserError(f"this process already loaded the C++ plugin library {current[1]}, which TensorRT cannot "
                            "unload safely; build with the Python plugin in a fresh process")
        from .plugin import register_plugins

        _active[trt.__name__] = ("python", None, register_plugins(trt))
        return None
    library = check_plugin_library(backend, library_path)
    if current is not None and current[0] == "cpp":
        if current[1] != library.path:
            raise UserError(f"this process already loaded the C++ plugin library {current[1]}; load {library.path} "
                            "in a fresh process")
        return library
    _deregister_python_creators(trt)
    handle = trt.get_plugin_registry().load_library(str(library.path))
    if handle is None:
        raise UserError(f"TensorRT could not load the plugin library {library.path} (see the TensorRT log above); "
                        f"{_fix(library.family)}")
    _active[trt.__name__] = ("cpp", library.path, handle)
    return library


def _deregister_python_creators(trt: ModuleType) -> None:
    from .plugin_common import deregister_creators

    _active.pop(trt.__name__, None)
    deregister_creators(trt)
