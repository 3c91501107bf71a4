"""plugin_library: a missing, stale, unmarked or wrong-family C++ plugin library is refused before any build, with
the fix named; the harness's CPU part and the header's limits agree with the Python plugin."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# Where `make plugins` looks for TensorRT headers when none are given (shared/third_party beside the checkout).
VENDORED_HEADERS = Path(__file__).resolve().parents[4] / "shared" / "third_party" / "tensorrt-oss"

from lowbit_deploy.engines import plugin, plugin_library
from lowbit_deploy.engines.plugin_library import check_plugin_library
from lowbit_deploy.engines.tensorrt_import import TensorRTBackend
from lowbit_deploy.errors import UserError

RTX = TensorRTBackend("tensorrt_rtx", "1.7.1.116", module=None)
TRT10 = TensorRTBackend("tensorrt", "10.16.0", module=None)
FIELDS_HEADER = plugin_library.PLUGINS_DIR / "unpack_dequantize" / "unpackDequantizeFields.h"


@pytest.fixture()
def plugins_dir(tmp_path) -> Path:
    """A plugins/ tree with one source and a library carrying the 11.1 build marker, newer than the source."""
    root = tmp_path / "plugins"
    (root / "unpack_dequantize").mkdir(parents=True)
    (root / "unpack_dequantize" / "unpackDequantizePlugin.cpp").write_text("// source\n")
    (root / "build").mkdir()
    library = root / "build" / "liblowbit_plugins_trt11.so"
    library.write_bytes(b"\x7fELF...lowbit-plugin-build-info: tensorrt-headers=11.1.0; ops=UnpackDequantize:1,2;...")
    future = library.stat().st_mtime + 10
    os.utime(library, (future, future))
    return root


def test_a_fresh_library_of_the_right_family_is_accepted(plugins_dir) -> None:
    library = check_plugin_library(RTX, plugins_dir=plugins_dir)
    assert (library.path.name, library.family, library.header_version) == ("liblowbit_plugins_trt11.so", 11, "11.1.0")


def test_missing_library_names_the_build_command_and_the_fallback(plugins_dir) -> None:
    (plugins_dir / "build" / "liblowbit_plugins_trt11.so").unlink()
    with pytest.raises(UserError, match=r"is missing; build it with `make -C plugins tensorrt`.*--plugin python"):
        check_plugin_library(RTX, plugins_dir=plugins_dir)


def test_stale_library_is_refused(plugins_dir) -> None:
    source = plugins_dir / "unpack_dequantize" / "unpackDequantizePlugin.cpp"
    future = (plugins_dir / "build" / "liblowbit_plugins_trt11.so").stat().st_mtime + 10
    os.utime(source, (future, future))
    with pytest.raises(UserError, match=r"older than its source .*unpackDequantizePlugin.cpp.*make -C plugins"):
        check_plugin_library(RTX, plugins_dir=plugins_dir)


def test_library_for_other_headers_is_refused(plugins_dir) -> None:
    library = plugins_dir / "build" / "liblowbit_plugins_trt11.so"
    library.write_bytes(library.read_bytes().replace(b"headers=11.1.0", b"headers=10.16.0"))
    os.utime(library, (library.stat().st_mtime + 20,) * 2)
    with pytest.raises(UserError, match=r"compiled against TensorRT 10.16.0 headers but tensorrt_rtx 1.7.1.116 needs "
                                        r"11.x headers"):
        check_plugin_library(RTX, plugins_dir=plugins_dir)


def test_file_without_the_marker_is_refused(plugins_dir, monkeypatch) -> None:
    other = plugins_dir / "libother.so"
    other.write_bytes(b"\x7fELF nothing here")
    monkeypatch.setenv(plugin_library.LIBRARY_ENV, str(other))
    with pytest.raises(UserError, match="not a lowbit plugin library"):
        check_plugin_library(RTX, plugins_dir=plugins_dir)


def test_full_tensorrt_10_needs_the_trt10_library(plugins_dir) -> None:
    with pytest.raises(UserError, match="liblowbit_plugins_trt10.so is missing"):
        check_plugin_library(TRT10, plugins_dir=plugins_dir)


def test_header_limits_match_the_python_plugin() -> None:
    text = FIELDS_HEADER.read_text()
    assert "kMAX_RANK = nvinfer1::Dims::MAX_DIMS" in text and plugin.MAX_RANK == 8
    assert "kMAX_WEIGHT_ELEMENTS = int64_t{1} << 48" in text and plugin.MAX_WEIGHT_ELEMENTS == 2**48
    shared_fields = plugin_library.PLUGINS_DIR / "common" / "pluginFields.cpp"  # the C++ twin of plugin_common.py
    ignored = re.search(r"kIGNORED_FIELDS\[\] = \{(.*?)\};", shared_fields.read_text()).group(1)
    assert re.findall(r'"(\w+)"', ignored) == list(plugin.IGNORED_FIELDS)


@pytest.mark.parametrize("family", [11, 10])
def test_cpp_harness_cpu_part(family) -> None:
    """The C++ test program (built by CMake) loads the library with dlopen, creates plugins from PluginFields,
    round-trips the serialized fields and sees refusals logged; its GPU part needs a GPU (exit 77 = skipped)."""
    build = plugin_library.PLUGINS_DIR / "build"
    program, library = build / f"lowbit_plugin_test_trt{family}", build / f"liblowbit_plugins_trt{family}.so"
    if not program.exists():
        from lowbit_deploy.engines.kernels import find_nvcc

        if find_nvcc() is None or shutil.which("cmake") is None or not VENDORED_HEADERS.is_dir():
            pytest.skip("the C++ plugin test program is not built (no nvcc, cmake or TensorRT headers)")
        pytest.fail(f"{program} is missing although nvcc and cmake exist: run `make -C plugins tensorrt`")
    result = subprocess.run([str(program), str(library)], capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 77), result.stdout + result.stderr
    assert "CPU: creators, fields round trip and refusals checked (0 failures)" in result.stdout
