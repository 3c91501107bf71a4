"""runtime/trt.py: which lowbit creators deserialize an engine -- the C++ library by default (resolved and checked like
the build stage's), the Python creators where it is missing (with a note), a stale library refused -- and that
TrtRunner registers them before it reads the engine.

The choices run against TensorRT-RTX's real plugin registry, each in a fresh interpreter (a process keeps the C++
library once loaded). Executing an engine needs a GPU; none of these tests does (the GPU tests under tests/gpu run
TrtRunner on a device).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lowbit_deploy.engines import plugin_library
from lowbit_deploy.engines.tensorrt_import import TensorRTBackend
from lowbit_deploy.errors import UserError
from lowbit_deploy.runtime import trt as trt_runtime

BUILT_LIBRARY = plugin_library.PLUGINS_DIR / "build" / "liblowbit_plugins_trt11.so"
CPP, PYTHON = "APILanguage.CPP", "APILanguage.PYTHON"

# argv[1]: {"plugins": [choices, in order], "plugins_dir"/"native_dir": where the resolution looks, "library": path}
SCENARIO = r"""
import json, sys
from pathlib import Path
from lowbit_deploy.engines import plugin_library
from lowbit_deploy.engines.tensorrt_import import tensorrt_backend
from lowbit_deploy.errors import UserError
from lowbit_deploy.runtime.trt import register_engine_plugins

args = json.loads(sys.argv[1])
plugin_library.PLUGINS_DIR = Path(args["plugins_dir"])
plugin_library.NATIVE_DIR = Path(args["native_dir"])
backend = tensorrt_backend("tensorrt_rtx")
seen = {"choices": [], "error": None}
try:
    for plugin in args["plugins"]:
        choice = register_engine_plugins(backend, plugin, args.get("library"))
        seen["choices"].append([choice.kind, choice.library and str(choice.library), choice.note])
except UserError as error:
    seen["error"] = [type(error).__name__, str(error)]
seen["creators"] = sorted([c.name, c.plugin_version, str(c.api_language)]
                          for c in backend.module.get_plugin_registry().all_creators if c.plugin_namespace == "lowbit")
print(json.dumps(seen))
"""


def _creators(language: str) -> list[list[str]]:
    return sorted([c.name, c.version, language] for c in plugin_library.expected_creators())


@pytest.fixture()
def places(tmp_path) -> SimpleNamespace:
    """A checkout (plugins/ with one source and build/) and an installed package's _native/, both empty; the real
    library (built by `make plugins`) to copy into them."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    if not BUILT_LIBRARY.is_file():
        pytest.skip(f"{BUILT_LIBRARY} is not built (`make plugins` needs nvcc, cmake and TensorRT headers)")
    plugins_dir, native_dir = tmp_path / "plugins", tmp_path / "site" / "_native"
    (plugins_dir / "build").mkdir(parents=True)
    (plugins_dir / "source.cpp").write_text("// a source of the checkout\n")
    (plugins_dir / "Makefile").write_text("# a checkout\n")
    native_dir.mkdir(parents=True)
    return SimpleNamespace(plugins_dir=plugins_dir, native_dir=native_dir, tmp=tmp_path)


def _run(places: SimpleNamespace, plugins: list[str], library: Path | None = None, env: dict | None = None) -> dict:
    args = {"plugins": plugins, "plugins_dir": str(places.plugins_dir), "native_dir": str(places.native_dir),
            "library": str(library) if library else None}
    environment = {key: value for key, value in os.environ.items() if key != plugin_library.LIBRARY_ENV}
    result = subprocess.run([sys.executable, "-c", SCENARIO, json.dumps(args)], capture_output=True, text=True,
                            cwd=places.tmp, env={**environment, **(env or {})}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "log": result.stderr}


def _install(places: SimpleNamespace, home: str) -> Path:
    """Copy the real library into the installed package ("installed") or the checkout's build/ ("checkout")."""
    copy = (places.native_dir if home == "installed" else places.plugins_dir / "build") / BUILT_LIBRARY.name
    shutil.copy2(BUILT_LIBRARY, copy)
    source = places.plugins_dir / "source.cpp"
    os.utime(copy, (source.stat().st_mtime + 100,) * 2)  # newer than the stand-in checkout's source
    return copy


@pytest.mark.parametrize("home", ["installed", "checkout"])
def test_by_default_the_cpp_library_deserializes(places, home) -> None:
    library = _install(places, home)
    seen = _run(places, ["auto"])
    assert seen["error"] is None and seen["choices"] == [["cpp", str(library), None]]
    assert seen["creators"] == _creators(CPP)


def test_without_a_library_the_python_creators_stand_in_with_a_note(places) -> None:
    seen = _run(places, ["auto"])
    ((kind, library, note),) = seen["choices"]
    assert (kind, library) == ("python", None)
    assert "the Python lowbit plugin runs this engine's plugin layers" in note and "is missing" in note
    assert note in seen["log"]  # logged as a warning, not only returned
    assert seen["creators"] == _creators(PYTHON)


@pytest.mark.parametrize("plugin", ["auto", "cpp"])
def test_a_stale_library_is_refused_not_replaced(places, plugin) -> None:
    library = _install(places, "checkout")
    source = places.plugins_dir / "source.cpp"
    os.utime(source, (library.stat().st_mtime + 10,) * 2)
    seen = _run(places, [plugin])
    assert seen["error"][0] == "UserError" and "older than its source" in seen["error"][1]
    assert seen["creators"] == []  # refused before anything was registered


@pytest.mark.parametrize("plugin, how", [("cpp", "default places"), ("auto", "argument"),
                                         ("auto", "$LOWBIT_PLUGIN_LIBRARY")])
def test_a_missing_library_that_was_asked_for_is_refused(places, plugin, how) -> None:
    asked = places.tmp / "elsewhere" / BUILT_LIBRARY.name
    seen = _run(places, [plugin], library=asked if how == "argument" else None,
                env={plugin_library.LIBRARY_ENV: str(asked)} if how.startswith("$") else None)
    assert seen["error"][0] == "PluginLibraryMissing" and "is missing" in seen["error"][1]
    assert "make plugins" in seen["error"][1] and seen["choices"] == [] and seen["creators"] == []


def test_the_python_plugin_can_be_chosen(places) -> None:
    _install(places, "installed")  # present, but not asked for
    seen = _run(places, ["python"])
    assert seen["choices"] == [["python", None, None]] and seen["creators"] == _creators(PYTHON)


def test_after_the_cpp_library_the_python_plugin_is_refused(places) -> None:
    library = _install(places, "installed")
    seen = _run(places, ["auto", "python"])
    assert seen["choices"] == [["cpp", str(library), None]]
    assert seen["error"] == ["UserError", f"this process already loaded the C++ plugin library {library}, which "
                             "TensorRT cannot unload safely; use the Python plugin in a fresh process"]
    assert seen["creators"] == _creators(CPP)


def test_an_unknown_choice_is_refused() -> None:
    with pytest.raises(UserError, match=r"unknown runtime plugin 'rust'; choose one of auto, cpp, python"):
        trt_runtime.register_engine_plugins(TensorRTBackend("tensorrt_rtx", "1.7.1.116", module=None), "rust")


class _Engine:
    num_io_tensors = 2

    def get_tensor_name(self, index: int) -> str:
        return ("x", "y")[index]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name == "x" else "output"

    def create_execution_context(self) -> object:
        return object()


def _fake_tensorrt(events: list[str]) -> SimpleNamespace:
    """The few TensorRT names TrtRunner.__init__ touches, recording when the engine is read."""

    class Runtime:
        def __init__(self, logger: object) -> None:
            events.append("runtime")

        def deserialize_cuda_engine(self, payload: bytes) -> _Engine:
            events.append(f"deserialize {payload!r}")
            return _Engine()

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    return SimpleNamespace(__name__="fake_tensorrt", Logger=Logger, Runtime=Runtime,
                           TensorIOMode=SimpleNamespace(INPUT="input"))


@pytest.fixture()
def fake_gpu_runner(monkeypatch, tmp_path):
    """TrtRunner with a GPU reported and a stand-in TensorRT: what it does before and with the engine bytes."""
    from lowbit_deploy.engines import tensorrt_import

    events: list[str] = []
    backend = TensorRTBackend("tensorrt_rtx", "1.7.1.116", module=_fake_tensorrt(events))
    monkeypatch.setattr(trt_runtime, "gpu_available", lambda: True)
    monkeypatch.setattr(tensorrt_import, "tensorrt_backend", lambda name=None: backend)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine")
    return SimpleNamespace(events=events, engine=engine, backend=backend)


def test_the_runner_registers_the_plugins_before_it_reads_the_engine(fake_gpu_runner, monkeypatch) -> None:
    choice = trt_runtime.PluginChoice("python", None, "no library")

    def register(backend, plugin, library_path):
        fake_gpu_runner.events.append(f"register {plugin} {library_path}")
        return choice

    monkeypatch.setattr(trt_runtime, "register_engine_plugins", register)
    runner = trt_runtime.TrtRunner(fake_gpu_runner.engine, plugin="auto", plugin_library="/lib.so")
    assert fake_gpu_runner.events == ["register auto /lib.so", "runtime", "deserialize b'engine'"]
    assert runner.plugins is choice and (runner.input_names, runner.output_names) == (["x"], ["y"])


def test_a_refused_library_stops_the_runner_before_the_engine_is_read(fake_gpu_runner, monkeypatch) -> None:
    def refuse(backend, plugin, library_path):
        raise UserError("the C++ plugin library x.so is stale; make plugins")

    monkeypatch.setattr(trt_runtime, "register_engine_plugins", refuse)
    with pytest.raises(UserError, match="is stale; make plugins"):
        trt_runtime.TrtRunner(fake_gpu_runner.engine)
    assert fake_gpu_runner.events == []


def test_without_a_gpu_the_runner_stops_first(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(trt_runtime, "gpu_available", lambda: False)
    monkeypatch.setattr(trt_runtime, "register_engine_plugins", lambda *a: pytest.fail("plugins registered"))
    with pytest.raises(trt_runtime.GpuUnavailableError, match="not run: no GPU"):
        trt_runtime.TrtRunner(tmp_path / "model.engine")


@pytest.mark.parametrize(("plugin", "cpp_library", "needs_kernels"), [
    ("auto", True, False),    # the C++ library carries its own kernels
    ("cpp", True, False),
    ("auto", False, True),    # no C++ library: the Python plugin runs, on lowbit_deploy's kernel library
    ("python", True, True),
])
def test_the_kernel_library_is_required_only_where_the_python_plugin_runs(monkeypatch, plugin, cpp_library,
                                                                          needs_kernels):
    """The decision on a GPU machine, emulated: every other requirement met, the kernel library missing."""
    from lowbit_deploy.engines import kernels
    from lowbit_deploy.errors import UserError
    from lowbit_deploy.runtime import trt

    monkeypatch.setattr(trt, "gpu_available", lambda: True)
    monkeypatch.setattr("lowbit_deploy.engines.backend_unavailable_reason", lambda: None)
    monkeypatch.setattr(trt, "device_compute_capability", lambda: "9.0")
    monkeypatch.setattr(trt, "_cpp_library_found", lambda: cpp_library)

    def missing():
        raise UserError("liblowbit_kernels.so is not built")

    monkeypatch.setattr(kernels, "ensure_kernel_library", missing)
    reason = trt.unavailable_reason(["9.0"], plugin)
    assert (reason == "the plugin's CUDA kernel library is unavailable (liblowbit_kernels.so is not built)") == \
        needs_kernels
    assert needs_kernels or reason is None
    assert trt.unavailable_reason(["8.9"], plugin) is not None  # another architecture stays refused
