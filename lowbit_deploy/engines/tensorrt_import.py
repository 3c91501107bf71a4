"""One place that imports TensorRT: full ``tensorrt`` when installed, else TensorRT for RTX (``tensorrt_rtx``).

Also hides the TensorRT-RTX packaging pitfall (shared/docs/TENSORRT.md): once a plugin is created, the RTX ONNX parser
``dlopen()``s the unversioned ``libtensorrt_rtx.so`` but the wheel ships only ``libtensorrt_rtx.so.1``, and the
process dies with "terminate called without an active exception". LD_LIBRARY_PATH cannot be changed for a running
process, so we preload (RTLD_GLOBAL) a tiny empty shared library whose SONAME is ``libtensorrt_rtx.so`` and which links
the real library: the dynamic loader then answers the parser's ``dlopen`` with that already-loaded object. The shim is
compiled once with the C compiler (``$CC`` or ``cc``/``gcc``) into a per-user cache directory keyed by the real
library's path and mtime.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

from ..errors import UserError

logger = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "tensorrt_rtx")
_UNVERSIONED_RTX = "libtensorrt_rtx.so"
# Keeps the preloaded shim's handle alive for the life of the process (dlclose would defeat the purpose).
_preloaded: list[ctypes.CDLL] = []


@dataclass(frozen=True)
class TensorRTBackend:
    """Which TensorRT a process uses."""

    name: str  # "tensorrt" or "tensorrt_rtx"
    version: str
    module: ModuleType

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"


def import_tensorrt(prefer: str | None = None) -> ModuleType:
    """The TensorRT module to use: ``prefer`` if given (or ``$LOWBIT_TENSORRT``), else ``tensorrt`` when importable,
    else ``tensorrt_rtx``. Raises :class:`UserError` naming the install command when neither is installed."""
    return tensorrt_backend(prefer).module


@lru_cache(maxsize=None)
def _backend_cached(prefer: str | None) -> TensorRTBackend:
    candidates = (prefer,) if prefer else BACKENDS
    for name in candidates:
        if name not in BACKENDS:
            raise UserError(f"unknown TensorRT backend {name!r}; choose one of {', '.join(BACKENDS)}")
        if importlib.util.find_spec(name) is None:
            continue
        if name == "tensorrt_rtx":
            _preload_unversioned_rtx_library()
        module = importlib.import_module(name)
        logger.info("using %s %s", name, module.__version__)
        return TensorRTBackend(name, module.__version__, module)
    wanted = prefer or "tensorrt or tensorrt_rtx"
    raise UserError(f"{wanted} is not installed; run `pip install 'lowbit-deploy[tensorrt-rtx]'` (TensorRT for RTX, "
                    "builds engines also without a GPU) or install full TensorRT from NVIDIA's index")


def tensorrt_backend(prefer: str | None = None) -> TensorRTBackend:
    """Like :func:`import_tensorrt` but also says which backend and version were chosen."""
    return _backend_cached(prefer or os.environ.get("LOWBIT_TENSORRT") or None)


def tensorrt_importable(name: str) -> bool:
    """True when ``name`` (``tensorrt`` or ``tensorrt_rtx``) is installed; imports nothing."""
    return importlib.util.find_spec(name) is not None


def _rtx_library_path() -> Path | None:
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    for directory in spec.submodule_search_locations:
        found = sorted(Path(directory).glob(f"{_UNVERSIONED_RTX}.*"))
        if found:
            return found[0]
    return None


def _cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "lowbit_deploy"


def _preload_unversioned_rtx_library() -> None:
    if _preloaded:
        return
    real_library = _rtx_library_path()
    if real_library is None:
        return  # not the pip wheel layout (e.g. a tarball install on LD_LIBRARY_PATH): nothing to fix
    try:
        _preloaded.append(ctypes.CDLL(_UNVERSIONED_RTX, mode=ctypes.RTLD_GLOBAL))
        return  # already resolvable (user symlink / LD_LIBRARY_PATH)
    except OSError:
        pass
    shim = _build_rtx_shim(real_library)
    # Load the real library first from its own path so the shim's DT_NEEDED resolves to that very object.
    _preloaded.append(ctypes.CDLL(str(real_library), mode=ctypes.RTLD_GLOBAL))
    _preloaded.append(ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL))
    logger.debug("preloaded %s as %s", shim, _UNVERSIONED_RTX)


def _build_rtx_shim(real_library: Path) -> Path:
    stat = real_library.stat()
    key = hashlib.sha256(f"{real_library.resolve()}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:16]
    shim = _cache_dir() / "rtx_shim" / key / _UNVERSIONED_RTX
    if shim.exists():
        return shim
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise UserError(_no_compiler_message(real_library))
    shim.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name then rename: concurrent processes never load a half-written file.
    with tempfile.TemporaryDirectory(dir=shim.parent) as scratch:
        source = Path(scratch) / "shim.c"
        source.write_text("/* intentionally empty: only the SONAME and DT_NEEDED matter */\n")
        built = Path(scratch) / _UNVERSIONED_RTX
        command = [compiler, "-shared", "-fPIC", str(source), "-o", str(built), f"-Wl,-soname,{_UNVERSIONED_RTX}",
                   "-Wl,--no-as-needed", str(real_library), f"-Wl,-rpath,{real_library.parent}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"building the {_UNVERSIONED_RTX} shim failed ({' '.join(command)}):\n{result.stderr}\n"
                            + _no_compiler_message(real_library))
        os.replace(built, shim)
    return shim


def _no_compiler_message(real_library: Path) -> str:
    return (f"TensorRT-RTX needs {_UNVERSIONED_RTX} to be loadable but the wheel ships only {real_library.name}, and no "
            "C compiler was found to build the shim that fixes this. Install gcc, or before starting Python run: "
            f"mkdir -p ~/.cache/lowbit_deploy/rtxlib && ln -sf {real_library} "
            f"~/.cache/lowbit_deploy/rtxlib/{_UNVERSIONED_RTX} && "
            "export LD_LIBRARY_PATH=~/.cache/lowbit_deploy/rtxlib:$LD_LIBRARY_PATH")
