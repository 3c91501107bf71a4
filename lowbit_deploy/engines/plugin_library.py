"""Which lowbit creators (``UnpackDequantize`` v1/v2, ``QuantizeDequantizeActivation`` v1) a process registers: the
C++ plugin library (default) or the Python plugins (fallback).

The C++ library (plugins/, built by CMake into ``liblowbit_plugins_trt<major>.so``) is what C++ apps load too, so
engines built with it need no Python at inference. It only works with the TensorRT family whose headers it was
compiled against (shared/docs/TENSORRT.md): ``trt11`` for TensorRT 11.x and TensorRT-RTX 1.x, ``trt10`` for TensorRT
10.x. :func:`resolve_plugin_library` looks for it, in this order:

1. an explicit path: the ``path`` argument, else ``$LOWBIT_PLUGIN_LIBRARY``;
2. the installed package's copy, ``lowbit_deploy/_native/`` (a wheel built where nvcc, make and cmake exist carries
   it; setup.py);
3. the source checkout's ``plugins/build/`` (``make plugins``).

:func:`check_plugin_library` refuses, before anything is built or deserialized and naming the fix, a library that is
missing, carries no build marker (``lowbit-plugin-build-info`` in its bytes) or the marker of another header family,
is older than a source (source checkout only), or whose creators -- loaded into the TensorRT registry in a child
process (engines/plugin_probe.py; works without a GPU) -- differ in name, version, namespace or field names from
the op contracts the Python plugins declare (:func:`expected_creators`).

Both plugins have the same name, namespace, version and serialized fields, so a registry holds one of them at a
time: :func:`use_plugins` deregisters the Python creators before loading the library (the library itself cannot be
unloaded again, see there).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from ..errors import UserError
from . import native
from .tensorrt_import import TensorRTBackend

PLUGINS_DIR = native.PLUGINS_DIR
NATIVE_DIR = native.NATIVE_DIR
PLUGIN_KINDS = ("cpp", "python")
DEFAULT_PLUGIN = "cpp"
# Overrides the library path (e.g. a library built elsewhere against an installation's headers).
LIBRARY_ENV = "LOWBIT_PLUGIN_LIBRARY"
BUILD_COMMAND = "make plugins"
CMAKE_COMMAND = "cmake -S plugins -B plugins/build/cmake && cmake --build plugins/build/cmake -j"
ORIGIN_ARGUMENT, ORIGIN_ENV, ORIGIN_INSTALLED, ORIGIN_CHECKOUT = (
    "argument", f"${LIBRARY_ENV}", "installed package", "source checkout")
PROBE_SCRIPT = Path(__file__).with_name("plugin_probe.py")
PROBE_TIMEOUT_S = 120
_BUILD_INFO = re.compile(rb"lowbit-plugin-build-info: tensorrt-headers=(\d+)\.(\d+)\.(\d+);")
_SOURCE_SUFFIXES = (".cu", ".h", ".cuh", ".cpp", ".map")
# Per TensorRT module: ("cpp", path, handle) or ("python", None, creators). The registry keeps raw pointers.
_active: dict[str, tuple[str, Path | None, Any]] = {}
# Probed creators per (TensorRT module name, library path, size, mtime): a library is loaded in a child once.
_probed: dict[tuple[str, str, int, int], frozenset["PluginCreator"]] = {}


class PluginLibraryMissing(UserError):
    """No C++ plugin library where :func:`resolve_plugin_library` looks (a caller may fall back to Python)."""


class PluginCreator(NamedTuple):
    """What a registry knows a creator by, and the fields the ONNX parser hands it."""

    name: str
    version: str
    namespace: str
    field_names: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.namespace}::{self.name} v{self.version}"


@dataclass(frozen=True)
class PluginLibrary:
    """A checked C++ plugin library."""

    path: Path
    family: int  # TensorRT major version of the headers it was compiled against
    header_version: str
    origin: str = ORIGIN_CHECKOUT  # which step of the resolution order found it


def library_family(backend: TensorRTBackend) -> int:
    """TensorRT header family a runtime needs: 11 for TensorRT-RTX 1.x (it uses the 11.x layouts), else the
    TensorRT major version."""
    return 11 if backend.is_rtx else int(backend.version.split(".")[0])


def library_name(family: int) -> str:
    return f"liblowbit_plugins_trt{family}.so"


def _fix(family: int, origin: str = ORIGIN_CHECKOUT) -> str:
    if origin == ORIGIN_INSTALLED:
        build = ("reinstall lowbit-deploy where nvcc, make and cmake exist (the wheel build compiles the library; "
                 "LOWBIT_CMAKE_ARGS=-DTensorRT_INCLUDE_DIR=<dir> for your installation's headers)")
    else:
        build = (f"build it with `{BUILD_COMMAND}` in the source checkout (or `{CMAKE_COMMAND}`; pass "
                 "-DTensorRT_INCLUDE_DIR=<dir> for your installation's headers)")
    return (f"{build}, set {LIBRARY_ENV}=/path/to/{library_name(family)}, or use the Python plugin instead "
            "(--plugin python)")


def resolve_plugin_library(family: int, path: str | os.PathLike[str] | None = None,
                           plugins_dir: Path | None = None, native_dir: Path | None = None) -> tuple[Path, str]:
    """(path, origin) of the ``family`` library in the order of the module docstring (``plugins_dir`` and
    ``native_dir`` default to :data:`PLUGINS_DIR` and :data:`NATIVE_DIR`). An explicit path is returned even when
    nothing is there (the caller refuses it by name); otherwise the checkout's path is the last resort."""
    name = library_name(family)
    plugins_dir, native_dir = plugins_dir or PLUGINS_DIR, native_dir or NATIVE_DIR
    if path:
        return Path(path), ORIGIN_ARGUMENT
    if os.environ.get(LIBRARY_ENV):
        return Path(os.environ[LIBRARY_ENV]), ORIGIN_ENV
    installed = native.installed_library(name, native_dir)
    if installed is not None:
        return installed, ORIGIN_INSTALLED
    return plugins_dir / "build" / name, ORIGIN_CHECKOUT


def read_build_info(path: Path) -> str | None:
    """The TensorRT header version ("11.1.0") a plugin library was compiled against, or None if it has no marker."""
    match = _BUILD_INFO.search(path.read_bytes())
    return ".".join(part.decode() for part in match.groups()) if match else None


def _newest_source(plugins_dir: Path) -> Path | None:
    # build/ holds outputs and tests/ the C++ test programs, which are not linked into the library: editing a test
    # must not make the library look stale (`make plugins` would not relink it, so the error could never clear).
    sources = [p for p in plugins_dir.rglob("*")
               if (p.suffix in _SOURCE_SUFFIXES or p.name == "CMakeLists.txt")
               and p.relative_to(plugins_dir).parts[0] not in ("build", "tests")]
    return max(sources, key=lambda p: p.stat().st_mtime, default=None)


def expected_creators() -> frozenset[PluginCreator]:
    """The creators the Python side declares (and registers as the Python plugins): one UnpackDequantize creator per
    entry of ``plugin.PLUGIN_VERSIONS`` and QuantizeDequantizeActivation, with their field names."""
    from . import activation_plugin, plugin
    from .plugin_common import PLUGIN_NAMESPACE

    creators = {PluginCreator(plugin.OP_NAME, version, PLUGIN_NAMESPACE, spec.field_names)
                for version, spec in plugin.PLUGIN_VERSIONS.items()}
    creators.add(PluginCreator(activation_plugin.OP_NAME, activation_plugin.PLUGIN_VERSION, PLUGIN_NAMESPACE,
                               activation_plugin.FIELD_NAMES))
    return frozenset(creators)


def library_creators(backend: TensorRTBackend, library: Path, fix: str) -> frozenset[PluginCreator]:
    """The creators ``library`` adds to ``backend``'s plugin registry, loaded in a child process (plugin_probe.py);
    a library TensorRT cannot load is a :class:`UserError` carrying the child's log and ``fix``."""
    stat = library.stat()
    key = (backend.name, str(library.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _probed:
        try:
            result = subprocess.run([sys.executable, str(PROBE_SCRIPT), backend.name, str(library)],
                                    capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise UserError(f"loading the C++ plugin library {library} into {backend.name}'s plugin registry did not "
                            f"finish in {PROBE_TIMEOUT_S} s; {fix}") from None
        lines = [line for line in result.stdout.splitlines() if line.startswith("lowbit-plugin-probe: ")]
        report = json.loads(lines[-1].split(": ", 1)[1]) if result.returncode == 0 and lines else None
        if report is None or not report["loaded"]:
            log = (result.stderr + result.stdout).strip()[-2000:] or f"exit status {result.returncode}"
            raise UserError(f"{backend.name} could not load the C++ plugin library {library} into its plugin registry "
                            f"({log}); {fix}")
        _probed[key] = frozenset(PluginCreator(name, version, namespace, tuple(fields))
                                 for name, version, namespace, fields in report["creators"])
    return _probed[key]


def creator_mismatches(found: frozenset[PluginCreator], expected: frozenset[PluginCreator]) -> list[str]:
    """What differs between a library's lowbit creators and the declared ones (empty when they agree)."""
    namespaces = {creator.namespace for creator in expected}
    found = frozenset(c for c in found if c.namespace in namespaces)
    by_key = {(c.name, c.version, c.namespace): c for c in found}
    problems = []
    for creator in sorted(expected):
        held = by_key.get((creator.name, creator.version, creator.namespace))
        if held is None:
            versions = sorted(c.version for c in found if (c.name, c.namespace) == (creator.name, creator.namespace))
            problems.append(f"no {creator} creator" + (f" (it holds version(s) {', '.join(versions)})"
                                                        if versions else ""))
        elif held.field_names != creator.field_names:
            problems.append(f"{creator} declares fields {list(held.field_names)}, expected {list(creator.field_names)}")
    known = {(c.name, c.version, c.namespace) for c in expected}
    problems += [f"an undeclared {c} creator" for c in sorted(found) if (c.name, c.version, c.namespace) not in known]
    return problems


def check_plugin_library(backend: TensorRTBackend, path: str | os.PathLike[str] | None = None,
                         plugins_dir: Path | None = None, native_dir: Path | None = None) -> PluginLibrary:
    """The C++ library for ``backend``'s family (found by :func:`resolve_plugin_library`), checked as the module
    docstring says; raises :class:`PluginLibraryMissing` or :class:`UserError` naming the file and the fix."""
    family = library_family(backend)
    plugins_dir, native_dir = plugins_dir or PLUGINS_DIR, native_dir or NATIVE_DIR
    library, origin = resolve_plugin_library(family, path, plugins_dir, native_dir)
    fix = _fix(family, origin)
    if not library.is_file():
        if origin != ORIGIN_CHECKOUT:
            raise PluginLibraryMissing(f"the C++ plugin library {library} ({origin}) is missing; {fix}")
        if not (plugins_dir / "Makefile").is_file():  # an installed package, no checkout beside it
            raise PluginLibraryMissing(
                f"the installed lowbit-deploy carries no C++ plugin library ({native_dir / library.name} is missing: "
                f"its wheel was built without nvcc, make, cmake or TensorRT headers); {_fix(family, ORIGIN_INSTALLED)}")
        raise PluginLibraryMissing(f"the C++ plugin library {library} is missing (and the installed package "
                                   f"carries none in {native_dir}); {fix}")
    header_version = read_build_info(library)
    if header_version is None:
        raise UserError(f"{library} is not a lowbit plugin library (no build marker); {fix}")
    built_family = int(header_version.split(".")[0])
    if built_family != family:
        raise UserError(f"{library} was compiled against TensorRT {header_version} headers but {backend.name} "
                        f"{backend.version} needs {family}.x headers (the logger and registry layouts differ); {fix}")
    newest = _newest_source(plugins_dir) if origin == ORIGIN_CHECKOUT and plugins_dir.is_dir() else None
    if newest is not None and newest.stat().st_mtime > library.stat().st_mtime:
        raise UserError(f"the C++ plugin library {library} is older than its source {newest}; {fix}")
    problems = creator_mismatches(library_creators(backend, library, fix), expected_creators())
    if problems:
        raise UserError(f"the C++ plugin library {library} is stale or from another lowbit-deploy version: "
                        f"{'; '.join(problems)}; {fix}")
    return PluginLibrary(library, family, header_version, origin)


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
                            "unload safely; use the Python plugin in a fresh process")
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
                        f"{_fix(library.family, library.origin)}")
    _active[trt.__name__] = ("cpp", library.path, handle)
    return library


def _deregister_python_creators(trt: ModuleType) -> None:
    from .plugin_common import deregister_creators

    _active.pop(trt.__name__, None)
    deregister_creators(trt)
