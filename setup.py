"""Wheel build hook: the native libraries travel inside the package.

Everything else is declared in pyproject.toml. A non-editable build (``pip install .``, ``pip wheel .``,
``python -m build``) compiles the CUDA kernel library and the C++ TensorRT plugin libraries with the plugins/
Makefile targets (``make -C plugins`` and ``make -C plugins tensorrt``, the ones ``make kernels`` / ``make plugins``
run) and copies them into ``lowbit_deploy/_native/``, where lowbit_deploy/engines/native.py finds them. Without nvcc,
make, cmake or TensorRT headers the wheel is built without them and the build prints a note: a pure-Python install
never fails for want of a compiler (engine builds then need ``--plugin python`` or ``$LOWBIT_PLUGIN_LIBRARY``).

Environment:
  LOWBIT_NATIVE            auto (default: build what the tools allow), skip (pure Python), require (fail without)
  LOWBIT_NATIVE_BUILD_DIR  where make builds (default plugins/build: incremental, shared with `make plugins`)
  LOWBIT_CMAKE_ARGS        extra CMake arguments, e.g. -DTensorRT_INCLUDE_DIR=/usr/include/x86_64-linux-gnu
                           (needed where the vendored headers ../shared/third_party/tensorrt-oss are absent)
  NVCC                     the nvcc to use (default: nvcc on PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PLUGINS_DIR = ROOT / "plugins"
# Must match NATIVE_DIR in lowbit_deploy/engines/native.py.
NATIVE_PACKAGE_DIR = Path("lowbit_deploy") / "_native"
KERNEL_LIBRARY = "liblowbit_kernels.so"
PLUGIN_LIBRARY_PATTERN = "liblowbit_plugins_trt*.so"
# Where plugins/CMakeLists.txt looks for TensorRT headers when no TensorRT_INCLUDE_DIR/TensorRT_ROOT is given.
VENDORED_HEADERS = ROOT.parent / "shared" / "third_party" / "tensorrt-oss"
NATIVE_MODES = ("auto", "skip", "require")
SOURCE_SUFFIXES = (".cu", ".h", ".cuh", ".cpp", ".map")


class NativeBuildError(RuntimeError):
    """A native library could not be built (fatal only with LOWBIT_NATIVE=require)."""


def _note(message: str) -> None:
    print(f"lowbit-deploy: note: {message}", file=sys.stderr, flush=True)


def _find_nvcc() -> str | None:
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    candidates += [str(Path(root) / "bin" / "nvcc") for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda")
                   if root]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _make(arguments: list[str], what: str) -> None:
    command = ["make", "--no-print-directory", "-C", str(PLUGINS_DIR), *arguments]
    print(f"lowbit-deploy: building the {what}: {shlex.join(command)}", file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise NativeBuildError(f"building the {what} failed ({shlex.join(command)}):\n"
                               f"{result.stdout[-3000:]}{result.stderr[-3000:]}")


def build_native_libraries(mode: str = "auto") -> tuple[list[Path], list[str]]:
    """(libraries built with the plugins/ Makefile targets, notes saying what was left out and why)."""
    if mode not in NATIVE_MODES:
        raise NativeBuildError(f"LOWBIT_NATIVE={mode!r}; choose one of {', '.join(NATIVE_MODES)}")
    if mode == "skip":
        return [], ["LOWBIT_NATIVE=skip: the wheel carries no native libraries"]
    nvcc = _find_nvcc()
    missing = [tool for tool, found in (("nvcc", nvcc), ("make", shutil.which("make"))) if not found]
    if not (PLUGINS_DIR / "Makefile").is_file():
        missing.append(f"plugins/ sources ({PLUGINS_DIR})")
    if missing:
        return [], [f"no {', '.join(missing)}: the wheel carries neither the CUDA kernel library nor the C++ plugin "
                    "libraries"]
    custom_dir = os.environ.get("LOWBIT_NATIVE_BUILD_DIR")
    build_dir = Path(custom_dir).resolve() if custom_dir else PLUGINS_DIR / "build"
    common = [f"NVCC={nvcc}"] + ([f"BUILD_DIR={build_dir}"] if custom_dir else [])
    try:
        _make(common, "CUDA kernel library")
    except NativeBuildError as error:
        return [], [str(error)]
    built = [build_dir / KERNEL_LIBRARY]
    cmake_args = os.environ.get("LOWBIT_CMAKE_ARGS", "")
    if shutil.which("cmake") is None:
        return built, ["cmake not found: the wheel carries the CUDA kernel library but no C++ plugin library"]
    if "TensorRT_" not in cmake_args and not VENDORED_HEADERS.is_dir():
        return built, [f"no TensorRT headers ({VENDORED_HEADERS} is absent; set LOWBIT_CMAKE_ARGS=-DTensorRT_INCLUDE_"
                       "DIR=<dir with NvInferRuntime.h>): the wheel carries the CUDA kernel library but no C++ plugin "
                       "library"]
    if custom_dir:
        # A build folder of its own: the C++ test programs (which `make test` runs from plugins/build) are not needed.
        cmake_args += f" -DLOWBIT_OUTPUT_DIR={build_dir} -DLOWBIT_BUILD_TESTS=OFF"
    try:
        _make([*common, "tensorrt", f"CMAKE_ARGS={cmake_args.strip()}"], "C++ TensorRT plugin libraries")
    except NativeBuildError as error:
        return built, [str(error)]
    # A library of a family this configuration does not build (left from an earlier one) is shipped only when it is
    # not older than any source; lowbit_deploy checks every library it loads again (engines/plugin_library.py).
    newest_source = max(path.stat().st_mtime for path in PLUGINS_DIR.rglob("*")
                        if path.is_file() and path.suffix in SOURCE_SUFFIXES
                        and path.relative_to(PLUGINS_DIR).parts[0] != "build")
    plugins = sorted(path for path in build_dir.glob(PLUGIN_LIBRARY_PATTERN) if path.stat().st_mtime >= newest_source)
    if not plugins:
        return built, [f"`make -C plugins tensorrt` left no up-to-date {PLUGIN_LIBRARY_PATTERN} in {build_dir}"]
    return built + plugins, []


class NativeDistribution(Distribution):
    """Counts as having extension modules once native libraries are in the build tree, so they install into
    platlib (a wheel with binaries is not "Root-Is-Purelib")."""

    native_libraries: list[str] = []

    def has_ext_modules(self) -> bool:
        return bool(self.native_libraries) or super().has_ext_modules()


class BuildPyWithNative(build_py):
    """build_py that also puts the native libraries into ``lowbit_deploy/_native/`` of the build tree."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install uses the checkout's plugins/build (make kernels / make plugins)
        mode = os.environ.get("LOWBIT_NATIVE", "auto")
        libraries, notes = build_native_libraries(mode)
        if notes and mode == "require":
            raise NativeBuildError("LOWBIT_NATIVE=require: " + "; ".join(notes))
        for note in notes:
            _note(note)
        target = Path(self.build_lib) / NATIVE_PACKAGE_DIR
        shutil.rmtree(target, ignore_errors=True)  # the build tree is reused: never ship an earlier build's copies
        if libraries:
            target.mkdir(parents=True, exist_ok=True)
        for library in libraries:
            shutil.copy2(library, target / library.name)
        self.distribution.native_libraries = [library.name for library in libraries]
        if libraries:
            print(f"lowbit-deploy: the package carries {', '.join(self.distribution.native_libraries)}",
                  file=sys.stderr)


class NativeWheel(bdist_wheel):
    """A wheel with native libraries is platform-specific (but not tied to a Python version or ABI: the libraries
    have no Python API); one without them stays pure."""

    def run(self) -> None:
        if not self.skip_build:
            self.run_command("build")
        self.root_is_pure = not self.distribution.has_ext_modules()
        super().run()

    def get_tag(self) -> tuple[str, str, str]:
        python, abi, platform = super().get_tag()
        return (python, abi, platform) if self.root_is_pure else ("py3", "none", platform)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for build_native_libraries
    setup(distclass=NativeDistribution, cmdclass={"build_py": BuildPyWithNative, "bdist_wheel": NativeWheel})
