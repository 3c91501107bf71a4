"""The wheel carries the native libraries: setup.py's build hook compiles them with the plugins/ Makefile targets and
ships them in lowbit_deploy/_native/, where an interpreter that imports the unpacked wheel (not the checkout) finds,
checks and loads them; without the tools the wheel is pure Python and the build says why."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from lowbit_deploy.engines.native import NATIVE_DIR, PACKAGE_DIR

ROOT = PACKAGE_DIR.parent
NATIVE_IN_WHEEL = NATIVE_DIR.relative_to(ROOT).as_posix()
PLATFORM_TAG = sysconfig.get_platform().replace("-", "_").replace(".", "_")
LIBRARIES = ("liblowbit_kernels.so", "liblowbit_plugins_trt10.so", "liblowbit_plugins_trt11.so")

# Run in a fresh interpreter with the unpacked wheel first on sys.path and the working directory outside the checkout.
INSTALLED_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import lowbit_deploy
from lowbit_deploy.engines import kernels, plugin_library
from lowbit_deploy.engines.tensorrt_import import tensorrt_backend

backend = tensorrt_backend("tensorrt_rtx")
checked = plugin_library.check_plugin_library(backend)
loaded = plugin_library.use_plugins(backend, "cpp")
registry = backend.module.get_plugin_registry()
kernel_library = kernels.load_kernel_library()
print(json.dumps({
    "package": lowbit_deploy.__file__, "checked": str(checked.path), "origin": checked.origin,
    "loaded": str(loaded.path), "kernel_library": str(kernel_library.path),
    "kernel_op_name": kernel_library.format_constants()["op_name"],
    "creators": sorted([c.name, c.plugin_version, list(f.name for f in c.field_names)]
                       for c in registry.all_creators if c.plugin_namespace == "lowbit")}))
"""


def _setup_module():
    """setup.py as a module (its setup() call runs only as __main__, which is how setuptools runs it)."""
    spec = importlib.util.spec_from_file_location("lowbit_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _native_tools_missing() -> str | None:
    from lowbit_deploy.engines.kernels import find_nvcc

    setup_module = _setup_module()
    missing = [name for name, found in (("nvcc", find_nvcc()), ("make", shutil.which("make")),
                                        ("cmake", shutil.which("cmake"))) if not found]
    if not setup_module.VENDORED_HEADERS.is_dir():
        missing.append(f"TensorRT headers ({setup_module.VENDORED_HEADERS})")
    return ", ".join(missing) or None


def _build_wheel(out: Path, mode: str) -> tuple[Path, str]:
    """pip wheel of the checkout (in-tree, so make reuses plugins/build) with LOWBIT_NATIVE=mode; (wheel, log)."""
    env = {key: value for key, value in os.environ.items() if key != "LOWBIT_PLUGIN_LIBRARY"}
    env["LOWBIT_NATIVE"] = mode
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                             "-v", "-w", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    (wheel,) = out.glob("*.whl")
    return wheel, log


@pytest.fixture(scope="module")
def native_wheel(tmp_path_factory) -> Path:
    missing = _native_tools_missing()
    if missing:
        pytest.skip(f"no {missing}: the wheel cannot carry the native libraries here")
    # require: a compile failure fails the build with the compiler's output instead of shipping a pure wheel.
    return _build_wheel(tmp_path_factory.mktemp("wheel"), "require")[0]


def test_the_wheel_carries_the_native_libraries(native_wheel) -> None:
    assert native_wheel.name == f"lowbit_deploy-0.1.0-py3-none-{PLATFORM_TAG}.whl"
    with zipfile.ZipFile(native_wheel) as archive:
        names = set(archive.namelist())
        wheel_metadata = archive.read("lowbit_deploy-0.1.0.dist-info/WHEEL").decode()
    assert {f"{NATIVE_IN_WHEEL}/{name}" for name in LIBRARIES} <= names
    assert "Root-Is-Purelib: false" in wheel_metadata and f"Tag: py3-none-{PLATFORM_TAG}" in wheel_metadata
    assert not [name for name in names if name.startswith("plugins/")]  # the C++ sources stay in the sdist


def test_the_unpacked_wheel_finds_checks_and_loads_its_own_libraries(native_wheel, tmp_path) -> None:
    """Not the checkout's plugins/build: the plugin library resolves to the installed copy, passes the creator check
    (loaded in TensorRT-RTX's registry in a child), loads into this interpreter's registry; the kernel library too."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    site = tmp_path / "site"
    with zipfile.ZipFile(native_wheel) as archive:
        archive.extractall(site)
    for name in LIBRARIES:  # zipfile drops the mode bits; an installer keeps them
        (site / NATIVE_IN_WHEEL / name).chmod(0o755)
    env = {key: value for key, value in os.environ.items()
           if key not in ("LOWBIT_PLUGIN_LIBRARY", "PYTHONPATH")}
    result = subprocess.run([sys.executable, "-c", INSTALLED_CHECK, str(site)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    native = site / NATIVE_IN_WHEEL
    assert seen["package"] == str(site / "lowbit_deploy" / "__init__.py")
    assert seen["checked"] == seen["loaded"] == str(native / "liblowbit_plugins_trt11.so")
    assert seen["origin"] == "installed package"
    assert seen["kernel_library"] == str(native / "liblowbit_kernels.so")
    assert seen["kernel_op_name"] == "UnpackDequantize"
    from lowbit_deploy.engines.plugin_library import expected_creators

    assert seen["creators"] == sorted([c.name, c.version, list(c.field_names)] for c in expected_creators())


def test_the_wheel_ships_each_family_with_its_own_headers(native_wheel, tmp_path) -> None:
    from lowbit_deploy.engines.plugin_library import read_build_info

    with zipfile.ZipFile(native_wheel) as archive:
        archive.extractall(tmp_path, [f"{NATIVE_IN_WHEEL}/{name}" for name in LIBRARIES[1:]])
    for family in (10, 11):
        version = read_build_info(tmp_path / NATIVE_IN_WHEEL / f"liblowbit_plugins_trt{family}.so")
        assert version is not None and version.startswith(f"{family}.")


def test_without_native_libraries_the_wheel_is_pure_and_says_so(tmp_path) -> None:
    wheel, log = _build_wheel(tmp_path, "skip")
    assert wheel.name == "lowbit_deploy-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        assert not [name for name in archive.namelist() if name.startswith(NATIVE_IN_WHEEL)]
    assert "lowbit-deploy: note: LOWBIT_NATIVE=skip: the wheel carries no native libraries" in log


@pytest.fixture()
def recorded_make(monkeypatch):
    """setup.py with make recorded instead of run, and every tool present."""
    setup_module = _setup_module()
    calls: list[list[str]] = []
    monkeypatch.setattr(setup_module, "_make", lambda arguments, what: calls.append(arguments))
    monkeypatch.setattr(setup_module, "_find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(setup_module.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.delenv("LOWBIT_NATIVE_BUILD_DIR", raising=False)
    monkeypatch.delenv("LOWBIT_CMAKE_ARGS", raising=False)
    return setup_module, calls


def test_the_hook_runs_the_makefile_targets_into_a_chosen_folder(recorded_make, tmp_path, monkeypatch) -> None:
    setup_module, calls = recorded_make
    monkeypatch.setattr(setup_module, "VENDORED_HEADERS", tmp_path)  # present
    monkeypatch.setenv("LOWBIT_NATIVE_BUILD_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("LOWBIT_CMAKE_ARGS", "-DTensorRT_ROOT=/opt/trt")
    (tmp_path / "out").mkdir()
    future = max(p.stat().st_mtime for p in setup_module.PLUGINS_DIR.rglob("*") if p.is_file()) + 10
    for name in LIBRARIES:
        (tmp_path / "out" / name).write_bytes(b"library")
        os.utime(tmp_path / "out" / name, (future, future))
    libraries, notes = setup_module.build_native_libraries()
    assert calls == [["NVCC=/opt/cuda/bin/nvcc", f"BUILD_DIR={tmp_path / 'out'}"],
                     ["NVCC=/opt/cuda/bin/nvcc", f"BUILD_DIR={tmp_path / 'out'}", "tensorrt",
                      f"CMAKE_ARGS=-DTensorRT_ROOT=/opt/trt -DLOWBIT_OUTPUT_DIR={tmp_path / 'out'} "
                      "-DLOWBIT_BUILD_TESTS=OFF"]]
    assert [path.name for path in libraries] == list(LIBRARIES) and notes == []


@pytest.mark.parametrize("absent, shipped, note", [
    ("nvcc", [], r"no nvcc: the wheel carries neither the CUDA kernel library nor the C\+\+ plugin libraries"),
    ("make", [], "no make: the wheel carries neither"),
    ("cmake", ["liblowbit_kernels.so"], r"cmake not found: the wheel carries the CUDA kernel library but no C\+\+"),
    ("headers", ["liblowbit_kernels.so"], r"no TensorRT headers \(.* is absent; set LOWBIT_CMAKE_ARGS=-DTensorRT_"),
    ("plugin compile", ["liblowbit_kernels.so"], r"building the C\+\+ TensorRT plugin libraries failed"),
    ("kernel compile", [], "building the CUDA kernel library failed"),
])
def test_a_missing_tool_or_failed_compile_is_a_note_never_a_failed_install(recorded_make, absent, shipped, note,
                                                                          tmp_path, monkeypatch) -> None:
    setup_module, calls = recorded_make
    if absent == "nvcc":
        monkeypatch.setattr(setup_module, "_find_nvcc", lambda: None)
    elif absent in ("make", "cmake"):
        monkeypatch.setattr(setup_module.shutil, "which", lambda tool: None if tool == absent else f"/usr/bin/{tool}")
    elif absent == "headers":
        monkeypatch.setattr(setup_module, "VENDORED_HEADERS", tmp_path / "absent")
    else:
        what = "C++ TensorRT plugin libraries" if absent == "plugin compile" else "CUDA kernel library"

        def make(arguments, built):
            if built == what:
                raise setup_module.NativeBuildError(f"building the {what} failed (make ...):\nerror: boom")

        monkeypatch.setattr(setup_module, "_make", make)
    libraries, notes = setup_module.build_native_libraries()
    assert [path.name for path in libraries] == shipped
    assert len(notes) == 1 and re.search(note, notes[0]), notes


def test_the_sdist_carries_the_native_sources_but_no_build_outputs(tmp_path) -> None:
    """A wheel built from the sdist (pip install lowbit-deploy-*.tar.gz, python -m build) can compile the libraries."""
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with tarfile.open(tmp_path / result.stdout.strip().splitlines()[-1]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"setup.py", "plugins/Makefile", "plugins/CMakeLists.txt", "plugins/api/lowbitPlugins.cpp",
            "plugins/api/exports.map"} <= names
    assert not [name for name in names if name.startswith("plugins/build")]
