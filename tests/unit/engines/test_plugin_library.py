"""plugin_library: the library is found in the documented order (explicit path, installed package, source checkout);
a missing, stale, unmarked, wrong-family or wrong-creator C++ plugin library is refused before any build, with the
file and the fix named; the check loads the library in a child process only; the harness's CPU part and the header's
limits agree with the Python plugin."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Where `make plugins` looks for TensorRT headers when none are given (shared/third_party beside the checkout).
VENDORED_HEADERS = Path(__file__).resolve().parents[4] / "shared" / "third_party" / "tensorrt-oss"

from lowbit_deploy.engines import plugin, plugin_library
from lowbit_deploy.engines.plugin_library import (
    PluginCreator,
    PluginLibraryMissing,
    check_plugin_library,
    creator_mismatches,
    expected_creators,
    resolve_plugin_library,
)
from lowbit_deploy.engines.tensorrt_import import TensorRTBackend
from lowbit_deploy.errors import UserError

RTX = TensorRTBackend("tensorrt_rtx", "1.7.1.116", module=None)
TRT10 = TensorRTBackend("tensorrt", "10.16.0", module=None)
FIELDS_HEADER = plugin_library.PLUGINS_DIR / "unpack_dequantize" / "unpackDequantizeFields.h"
BUILT_LIBRARY = plugin_library.PLUGINS_DIR / "build" / "liblowbit_plugins_trt11.so"

# A library with the 11.1 build marker whose one creator is UnpackDequantize v1 with CREATOR_FIELDS: what a library
# built before v2 and the activation op existed (or with other field names) looks like to the registry.
STALE_LIBRARY_SOURCE = r"""
#include <NvInferRuntime.h>
#include <cstdint>
namespace
{
[[gnu::used]] char const kBUILD_INFO[] = "lowbit-plugin-build-info: tensorrt-headers=11.1.0; ops=UnpackDequantize:1;";
nvinfer1::PluginField gFields[] = {CREATOR_FIELDS};
class StaleCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    nvinfer1::IPluginV3* createPlugin(char const*, nvinfer1::PluginFieldCollection const*,
        nvinfer1::TensorRTPhase) noexcept override { return nullptr; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override
    {
        static nvinfer1::PluginFieldCollection collection{sizeof(gFields) / sizeof(gFields[0]), gFields};
        return &collection;
    }
    char const* getPluginName() const noexcept override { return "UnpackDequantize"; }
    char const* getPluginVersion() const noexcept override { return "1"; }
    char const* getPluginNamespace() const noexcept override { return "lowbit"; }
};
} // namespace
extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder*) {}
extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& n)
{
    static StaleCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    n = 1;
    return creators;
}
"""


def _tensorrt_rtx_or_skip() -> TensorRTBackend:
    from lowbit_deploy.engines.tensorrt_import import tensorrt_backend

    try:
        return tensorrt_backend("tensorrt_rtx")
    except UserError as error:
        pytest.skip(f"TensorRT-RTX is not installed: {error}")


def _built_library_or_skip() -> Path:
    if not BUILT_LIBRARY.is_file():
        from lowbit_deploy.engines.kernels import find_nvcc

        if find_nvcc() is None or shutil.which("cmake") is None or not VENDORED_HEADERS.is_dir():
            pytest.skip("the C++ plugin library is not built (no nvcc, cmake or TensorRT headers)")
        pytest.fail(f"{BUILT_LIBRARY} is missing although nvcc and cmake exist: run `make plugins`")
    return BUILT_LIBRARY


@pytest.fixture()
def plugins_dir(tmp_path) -> Path:
    """A plugins/ tree with one source and a library carrying the 11.1 build marker, newer than the source."""
    root = tmp_path / "plugins"
    (root / "unpack_dequantize").mkdir(parents=True)
    (root / "Makefile").write_text("# a checkout\n")
    (root / "unpack_dequantize" / "unpackDequantizePlugin.cpp").write_text("// source\n")
    (root / "build").mkdir()
    library = root / "build" / "liblowbit_plugins_trt11.so"
    library.write_bytes(b"\x7fELF...lowbit-plugin-build-info: tensorrt-headers=11.1.0; ops=UnpackDequantize:1,2;...")
    future = library.stat().st_mtime + 10
    os.utime(library, (future, future))
    return root


@pytest.fixture(autouse=True)
def no_library_override(monkeypatch) -> None:
    monkeypatch.delenv(plugin_library.LIBRARY_ENV, raising=False)


def test_a_fresh_library_of_the_right_family_is_accepted(plugins_dir, tmp_path) -> None:
    backend = _tensorrt_rtx_or_skip()
    built = _built_library_or_skip()
    library_path = plugins_dir / "build" / built.name
    shutil.copy(built, library_path)
    os.utime(library_path, (library_path.stat().st_mtime + 10,) * 2)
    library = check_plugin_library(backend, plugins_dir=plugins_dir, native_dir=tmp_path / "no-native")
    assert (library.path, library.family, library.header_version, library.origin) == (
        library_path, 11, "11.1.0", "source checkout")


def test_the_checkout_library_is_current(tmp_path) -> None:
    """The library `make plugins` built here holds exactly the creators the Python side declares."""
    backend = _tensorrt_rtx_or_skip()
    built = _built_library_or_skip()
    library = check_plugin_library(backend, native_dir=tmp_path / "no-native")
    assert library.path == built and library.origin == "source checkout"


def test_missing_library_names_both_places_the_build_command_and_the_fallback(plugins_dir, tmp_path) -> None:
    (plugins_dir / "build" / "liblowbit_plugins_trt11.so").unlink()
    with pytest.raises(PluginLibraryMissing, match=r"build/liblowbit_plugins_trt11.so is missing \(and the installed "
                       r"package carries none in .*no-native\); build it with `make plugins`.*--plugin python"):
        check_plugin_library(RTX, plugins_dir=plugins_dir, native_dir=tmp_path / "no-native")


def test_an_installed_package_without_a_library_says_how_to_get_one(tmp_path) -> None:
    """No checkout beside the package (no plugins/Makefile) and nothing in _native/: the wheel lacked the tools."""
    native_dir = tmp_path / "site" / "lowbit_deploy" / "_native"
    with pytest.raises(PluginLibraryMissing, match=re.escape(
            f"the installed lowbit-deploy carries no C++ plugin library ({native_dir / 'liblowbit_plugins_trt11.so'} "
            "is missing: its wheel was built without nvcc, make, cmake or TensorRT headers); reinstall lowbit-deploy "
            "where nvcc, make and cmake exist")):
        check_plugin_library(RTX, plugins_dir=tmp_path / "site" / "plugins", native_dir=native_dir)


@pytest.mark.parametrize("origin", ["argument", "$LOWBIT_PLUGIN_LIBRARY"])
def test_a_missing_explicit_library_is_named(origin, plugins_dir, tmp_path, monkeypatch) -> None:
    missing = tmp_path / "elsewhere" / "liblowbit_plugins_trt11.so"
    if origin == "argument":
        call = lambda: check_plugin_library(RTX, missing, plugins_dir=plugins_dir)  # noqa: E731
    else:
        monkeypatch.setenv(plugin_library.LIBRARY_ENV, str(missing))
        call = lambda: check_plugin_library(RTX, plugins_dir=plugins_dir)  # noqa: E731
    with pytest.raises(PluginLibraryMissing, match=re.escape(f"{missing} ({origin}) is missing")):
        call()


@pytest.mark.parametrize("present, expected", [
    (("argument", "env", "installed", "checkout"), "argument"),
    (("env", "installed", "checkout"), "env"),
    (("installed", "checkout"), "installed"),
    (("checkout",), "checkout"),
    ((), "checkout"),  # nothing anywhere: the checkout path, which the check then reports missing
])
def test_resolution_order(present, expected, tmp_path, monkeypatch) -> None:
    name = "liblowbit_plugins_trt11.so"
    places = {"argument": tmp_path / "arg" / name, "env": tmp_path / "env" / name,
              "installed": tmp_path / "site" / "lowbit_deploy" / "_native" / name,
              "checkout": tmp_path / "plugins" / "build" / name}
    for place in present:
        places[place].parent.mkdir(parents=True, exist_ok=True)
        places[place].write_bytes(b"library")
    if "env" in present:
        monkeypatch.setenv(plugin_library.LIBRARY_ENV, str(places["env"]))
    path, origin = resolve_plugin_library(11, places["argument"] if "argument" in present else None,
                                          plugins_dir=tmp_path / "plugins", native_dir=places["installed"].parent)
    assert path == places[expected]
    assert origin == {"argument": "argument", "env": "$LOWBIT_PLUGIN_LIBRARY", "installed": "installed package",
                      "checkout": "source checkout"}[expected]


def test_an_installed_copy_is_not_checked_against_checkout_sources(plugins_dir, tmp_path, monkeypatch) -> None:
    """The installed package has no sources: a newer file under a plugins/ dir beside it does not make it stale."""
    native_dir = tmp_path / "site" / "_native"
    native_dir.mkdir(parents=True)
    installed = native_dir / "liblowbit_plugins_trt11.so"
    shutil.copy(plugins_dir / "build" / "liblowbit_plugins_trt11.so", installed)
    os.utime(installed, (1, 1))  # older than every source
    monkeypatch.setattr(plugin_library, "library_creators", lambda backend, library, fix: expected_creators())
    assert check_plugin_library(RTX, plugins_dir=plugins_dir, native_dir=native_dir).origin == "installed package"


def test_stale_library_is_refused(plugins_dir) -> None:
    source = plugins_dir / "unpack_dequantize" / "unpackDequantizePlugin.cpp"
    future = (plugins_dir / "build" / "liblowbit_plugins_trt11.so").stat().st_mtime + 10
    os.utime(source, (future, future))
    with pytest.raises(UserError, match=r"older than its source .*unpackDequantizePlugin.cpp.*make plugins"):
        check_plugin_library(RTX, plugins_dir=plugins_dir)


@pytest.mark.parametrize("folder, stale", [("unpack_dequantize", True), ("common", True), ("tests", False)])
def test_only_library_sources_count_for_staleness(plugins_dir, folder, stale) -> None:
    """The C++ test programs under plugins/tests/ are not linked into the library: a newer one must not make it look
    stale (`make plugins` would not relink it, so the refusal could never clear)."""
    source = plugins_dir / folder / "newer.cpp"
    source.parent.mkdir(exist_ok=True)
    source.write_text("// newer than the library\n")
    future = (plugins_dir / "build" / "liblowbit_plugins_trt11.so").stat().st_mtime + 10
    os.utime(source, (future, future))
    assert (plugin_library._newest_source(plugins_dir) == source) is stale


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


def test_full_tensorrt_10_needs_the_trt10_library(plugins_dir, tmp_path) -> None:
    with pytest.raises(PluginLibraryMissing, match="liblowbit_plugins_trt10.so is missing"):
        check_plugin_library(TRT10, plugins_dir=plugins_dir, native_dir=tmp_path / "no-native")


def test_a_file_tensorrt_cannot_load_is_refused_with_its_log(plugins_dir) -> None:
    """The marker alone does not pass: the library is loaded into the registry (in a child process)."""
    backend = _tensorrt_rtx_or_skip()
    with pytest.raises(UserError, match=r"tensorrt_rtx could not load the C\+\+ plugin library .*liblowbit_plugins_"
                                        r"trt11.so into its plugin registry .*make plugins"):
        check_plugin_library(backend, plugins_dir=plugins_dir)


@pytest.fixture(scope="module")
def stale_libraries(tmp_path_factory) -> dict[str, Path]:
    """Two real IPluginCreatorV3One libraries (compiled here with g++ against the vendored 11.1 headers) holding only
    UnpackDequantize v1: one with v1's fields (a library from before v2), one declaring a field less."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    include = VENDORED_HEADERS / "11.1" / "include"
    if compiler is None or not include.is_dir():
        pytest.skip("no C++ compiler or no vendored TensorRT 11.1 headers to compile a stand-in library")
    folder = tmp_path_factory.mktemp("stale")
    (folder / "stale.cpp").write_text(STALE_LIBRARY_SOURCE)
    field = "{{\"{}\", nullptr, nvinfer1::PluginFieldType::kINT32, 0}}"
    variants = {"before v2": ",".join(field.format(name) for name in plugin.FIELD_NAMES),
                "field missing": ",".join(field.format(name) for name in plugin.FIELD_NAMES[:-1])}
    libraries = {}
    for index, (variant, fields) in enumerate(variants.items()):
        libraries[variant] = folder / f"liblowbit_plugins_trt11_{index}.so"
        cuda_include = [f"-I{root}/include" for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if root]
        subprocess.run([compiler, "-std=c++17", "-shared", "-fPIC", "-w", f"-DCREATOR_FIELDS={fields}",
                        f"-I{include}", *cuda_include, str(folder / "stale.cpp"), "-o", str(libraries[variant])],
                       check=True, capture_output=True, text=True)
    return libraries


@pytest.mark.parametrize("variant, message", [
    ("before v2", r"no lowbit::QuantizeDequantizeActivation v1 creator; no lowbit::UnpackDequantize v2 creator \(it "
                  r"holds version\(s\) 1\)"),
    ("field missing", r"lowbit::UnpackDequantize v1 declares fields \['levels', 'qmin', 'word_bits', "
                      r"'codes_per_word'\], expected \['levels', 'qmin', 'word_bits', 'codes_per_word', 'shape'\]"),
])
def test_a_library_with_other_creators_is_stale(stale_libraries, variant, message) -> None:
    backend = _tensorrt_rtx_or_skip()
    library = stale_libraries[variant]
    with pytest.raises(UserError, match=rf"{re.escape(str(library))} is stale or from another lowbit-deploy version: "
                                        rf".*{message}.*make plugins"):
        check_plugin_library(backend, library)


V1 = PluginCreator("UnpackDequantize", "1", "lowbit", plugin.FIELD_NAMES)


@pytest.mark.parametrize("found, problems", [
    (expected_creators(), []),
    (expected_creators() | {PluginCreator("Other", "1", "nvidia", ())}, []),  # another namespace: not ours
    (expected_creators() - {V1}, ["no lowbit::UnpackDequantize v1 creator (it holds version(s) 2)"]),
    (expected_creators() | {V1._replace(version="3")}, ["an undeclared lowbit::UnpackDequantize v3 creator"]),
    ((expected_creators() - {V1}) | {V1._replace(namespace="lowbit2")},
     ["no lowbit::UnpackDequantize v1 creator (it holds version(s) 2)"]),
])
def test_creator_mismatches(found, problems) -> None:
    assert creator_mismatches(frozenset(found), expected_creators()) == problems


def test_expected_creators_are_what_the_python_plugins_register() -> None:
    """One source of truth: the contract the library is checked against is what register_plugins() registers."""
    _tensorrt_rtx_or_skip()
    code = ("import json, tensorrt_rtx as trt\n"
            "from lowbit_deploy.engines.plugin import register_plugins\n"
            "register_plugins(trt)\n"
            "print(json.dumps([[c.name, c.plugin_version, c.plugin_namespace, [f.name for f in c.field_names]]\n"
            "                  for c in trt.get_plugin_registry().all_creators if c.plugin_namespace == 'lowbit']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    registered = {PluginCreator(n, v, ns, tuple(f)) for n, v, ns, f in json.loads(result.stdout.splitlines()[-1])}
    assert registered == expected_creators()


def test_the_check_leaves_the_caller_free_to_use_the_python_plugin(tmp_path) -> None:
    """The check loads the library in a child: afterwards the caller's registry holds no lowbit creator and the
    Python plugin can still be chosen (it could not once the library was loaded in-process)."""
    _tensorrt_rtx_or_skip()
    library = _built_library_or_skip()
    code = ("from lowbit_deploy.engines.plugin_library import check_plugin_library, use_plugins\n"
            "from lowbit_deploy.engines.tensorrt_import import tensorrt_backend\n"
            "backend = tensorrt_backend('tensorrt_rtx')\n"
            f"check_plugin_library(backend, {str(library)!r})\n"
            "registry = backend.module.get_plugin_registry()\n"
            "print('lowbit creators after the check:', sorted(c.name for c in registry.all_creators\n"
            "                                                 if c.plugin_namespace == 'lowbit'))\n"
            "use_plugins(backend, 'python')\n"
            "print('python plugin registered')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lowbit creators after the check: []" in result.stdout and "python plugin registered" in result.stdout


def test_a_library_is_probed_once_per_file_version(tmp_path, monkeypatch) -> None:
    backend = _tensorrt_rtx_or_skip()
    built = _built_library_or_skip()
    copy = tmp_path / built.name
    shutil.copy2(built, copy)
    assert plugin_library.library_creators(backend, copy, "fix") == expected_creators()
    monkeypatch.setattr(plugin_library.subprocess, "run", lambda *a, **k: pytest.fail("probed again"))
    assert plugin_library.library_creators(backend, copy, "fix") == expected_creators()
    os.utime(copy, (copy.stat().st_mtime + 5,) * 2)  # a rebuilt library is probed again
    with pytest.raises(pytest.fail.Exception, match="probed again"):
        plugin_library.library_creators(backend, copy, "fix")


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
        pytest.fail(f"{program} is missing although nvcc and cmake exist: run `make plugins`")
    result = subprocess.run([str(program), str(library)], capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 77), result.stdout + result.stderr
    assert "CPU: creators, fields round trip and refusals checked (0 failures)" in result.stdout
