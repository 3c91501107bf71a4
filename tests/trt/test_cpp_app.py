"""examples/cpp_app compiled against the vendored TensorRT 11.1 headers and the tensorrt-rtx wheel's library, then
run: bad arguments and input files are clean errors (exit 2), a machine without a GPU stops after loading the plugin
library (exit 3), and where a GPU runs the engine its output matches ONNX Runtime."""

from __future__ import annotations

import copy
import ctypes.util
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tinymodels import TINY_RECIPE

from lowbit_deploy.engines.tensorrt_import import tensorrt_importable
from lowbit_deploy.runtime.trt import gpu_available

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(not tensorrt_importable("tensorrt_rtx"),
                       reason="tensorrt_rtx is not installed (pip install 'lowbit-deploy[tensorrt-rtx]')"),
]

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "examples" / "cpp_app"
HEADERS = REPO.parent / "shared" / "third_party" / "tensorrt-oss" / "11.1" / "include"
EXIT_BAD_INPUT, EXIT_NO_GPU = 2, 3
sys.path.insert(0, str(APP_DIR))

from tensor_dir import write_tensors  # noqa: E402


def _wheel_library() -> Path | None:
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "libtensorrt_rtx.so.1").is_file():
            return Path(folder) / "libtensorrt_rtx.so.1"
    return None


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Path:
    """The app, compiled fresh into a temporary build folder (~10 s). Skips, with the reason, only where a
    prerequisite is missing; a failing compile with everything present is a failure."""
    from lowbit_deploy.engines.kernels import find_nvcc

    library = _wheel_library()
    missing = [what for what, present in (
        ("cmake", shutil.which("cmake")), ("a C++ compiler (c++)", shutil.which("c++") or shutil.which("g++")),
        ("the CUDA toolkit (nvcc)", find_nvcc()), (f"TensorRT headers ({HEADERS})", HEADERS.is_dir()),
        ("libtensorrt_rtx.so.1 of the tensorrt-rtx wheel", library)) if not present]
    if missing:
        pytest.skip(f"cannot compile examples/cpp_app: no {', no '.join(missing)}")
    build = tmp_path_factory.mktemp("cpp_app_build")
    nvcc_root = Path(find_nvcc()).resolve().parents[1]
    for command in (["cmake", "-S", str(APP_DIR), "-B", str(build), f"-DTensorRT_INCLUDE_DIR={HEADERS}",
                     f"-DTensorRT_LIBRARY={library}", f"-DCUDAToolkit_ROOT={nvcc_root}"],
                    ["cmake", "--build", str(build), "-j", "2"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    program = build / "lowbit_cpp_app"
    assert program.is_file()
    return program


def _run(program: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture
def demo_like_inputs(tmp_path) -> Path:
    """Inputs with runs/demo's signature, written directly (no run needed for argument checks)."""
    return write_tensors(tmp_path / "inputs", {
        "sample": np.zeros((2, 1, 16, 16), np.float32), "step_index": np.array([0, 3], np.int64),
        "encoder_hidden_states": np.zeros((2, 8, 64), np.float32)})


@pytest.fixture
def stand_in_engine(tmp_path) -> Path:
    """The app checks everything up to the GPU without parsing the engine, so argument checks need only a file."""
    path = tmp_path / "model.engine"
    path.write_bytes(b"not parsed before the GPU check")
    return path


def _assert_clean_failure(result: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "internal error" not in output and "terminate called" not in output, output
    for phrase in phrases:
        assert phrase in result.stderr, output
    assert result.stdout.strip().splitlines()[-1].startswith("FAILED | lowbit_cpp_app"), output


def test_usage_without_arguments(app) -> None:
    result = _run(app)
    assert result.returncode == EXIT_BAD_INPUT and "usage:" in result.stderr and "PLUGIN_LIBRARY" in result.stderr


def test_missing_engine_is_a_clean_error(app, cpp_plugin_library, demo_like_inputs, tmp_path) -> None:
    result = _run(app, tmp_path / "missing.engine", cpp_plugin_library.path, demo_like_inputs, tmp_path / "out")
    _assert_clean_failure(result, EXIT_BAD_INPUT, "no engine file at", "lowbit-deploy build")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing file", "not a shared library", "not a plugin library"])
def test_wrong_plugin_library_is_a_clean_error(app, stand_in_engine, demo_like_inputs, tmp_path, case) -> None:
    if case == "missing file":
        library, phrases = tmp_path / "missing.so", ("cannot load the plugin library", "No such file")
    elif case == "not a shared library":
        library = tmp_path / "text.so"
        library.write_text("not ELF")
        phrases = ("cannot load the plugin library",)
    else:
        library = ctypes.util.find_library("m")
        if library is None:
            pytest.skip("no libm found to stand in for a shared library without plugin creators")
        phrases = ("exports neither getCreators nor getPluginCreators",)
    result = _run(app, stand_in_engine, library, demo_like_inputs, tmp_path / "out")
    _assert_clean_failure(result, EXIT_BAD_INPUT, *phrases, "liblowbit_plugins_trt11.so")


def test_a_plugin_library_of_the_10x_family_is_refused(app, cpp_plugin_library, stand_in_engine, demo_like_inputs,
                                                        tmp_path) -> None:
    trt10 = cpp_plugin_library.path.parent / "liblowbit_plugins_trt10.so"
    if not trt10.is_file():
        pytest.skip(f"{trt10} is not built (make plugins builds it beside the 11.x library)")
    result = _run(app, stand_in_engine, trt10, demo_like_inputs, tmp_path / "out")
    _assert_clean_failure(result, EXIT_BAD_INPUT, "compiled against TensorRT 10.x headers", "_trt11.so")


@pytest.mark.parametrize("defect", ["no manifest", "short file", "unknown dtype", "bad shape", "name listed twice"])
def test_bad_input_directory_is_a_clean_error(app, cpp_plugin_library, stand_in_engine, demo_like_inputs, tmp_path,
                                              defect) -> None:
    manifest = demo_like_inputs / "tensors.txt"
    phrase = {"no manifest": "cannot read", "short file": "holds 8 bytes", "unknown dtype": "unknown dtype 'float64'",
              "bad shape": "not a comma-separated list", "name listed twice": "listed twice"}[defect]
    if defect == "no manifest":
        manifest.unlink()
    elif defect == "short file":
        (demo_like_inputs / "step_index.bin").write_bytes(b"\0" * 8)
    else:
        edit = {"unknown dtype": ("sample float32", "sample float64"), "bad shape": ("2,1,16,16", "2;1;16;16"),
                "name listed twice": ("step_index int64 2", "step_index int64 2\nstep_index int64 2")}[defect]
        manifest.write_text(manifest.read_text().replace(*edit))
    result = _run(app, stand_in_engine, cpp_plugin_library.path, demo_like_inputs, tmp_path / "out")
    _assert_clean_failure(result, EXIT_BAD_INPUT, phrase)


@pytest.fixture(scope="module")
def built_run(tmp_path_factory, cpp_plugin_library) -> tuple[Path, str | None]:
    """(run directory, why its engine is unusable here or None): the embedded default model quantized (0 QAT steps),
    exported with cached time features (runs/demo's signature) and built with the C++ plugin library for this GPU's
    compute capability (8.9 ahead of time without a GPU)."""
    from lowbit_deploy.export.onnx_export import export_run
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe
    from lowbit_deploy.runtime.trt import device_compute_capability

    data = copy.deepcopy(TINY_RECIPE)
    data["name"] = "cpp-app"
    data["quantize"]["scale_init_iterations"] = 1
    data["quantize"]["layers"][2:4] = [{"pattern": "time_embedding.*", "cache": True},
                                       {"pattern": "*.time_emb_proj", "cache": True}]
    data["schedule"] = {"num_steps": 3}
    data["train"] = {"steps": 0, "batch_size": 2, "checkpoint_every": 1, "data": "gaussian"}
    data["export"] = {"export_fp16_reference": False}
    data["validate"]["sampling"].pop("num_steps")
    run = tmp_path_factory.mktemp("cpp-app") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(parse_recipe(data), run, progress=False)
        export_run(run)
    finally:
        torch.set_num_threads(threads)
    capability = device_compute_capability() if gpu_available() else "8.9"
    # A fresh process: a process keeps the C++ plugin library once it has loaded it.
    result = subprocess.run([sys.executable, "-m", "lowbit_deploy", "build", str(run), "--compute-capability",
                             capability, "--plugin", "cpp", "--no-fp16-reference", "-q"],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    problem = None if result.returncode == 0 else f"no engine for SM {capability}: {result.stdout[-500:]}"
    return run, problem


def _make_inputs(run: Path, out: Path) -> Path:
    result = subprocess.run([sys.executable, str(APP_DIR / "make_inputs.py"), str(run), str(out), "--batch", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.skipif(gpu_available(), reason="a CUDA GPU is present: the app runs the engine instead")
def test_without_a_gpu_the_app_stops_cleanly_after_loading_the_plugin_library(app, cpp_plugin_library, built_run,
                                                                              tmp_path) -> None:
    run, problem = built_run
    assert problem is None, problem
    inputs = _make_inputs(run, tmp_path / "inputs")
    result = _run(app, run / "model.engine", cpp_plugin_library.path, inputs, tmp_path / "out")
    _assert_clean_failure(result, EXIT_NO_GPU, "no usable CUDA GPU", "compute capability")
    # UnpackDequantize v1 and v2, QuantizeDequantizeActivation v1.
    assert "plugin library: " in result.stdout and "(3 plugin creators registered)" in result.stdout
    assert "TensorRT library 1." in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU: executing the engine needs one (TensorRT-RTX, SM75-SM121)")
def test_the_app_runs_the_engine_and_matches_onnx_runtime(app, cpp_plugin_library, built_run, tmp_path) -> None:
    run, problem = built_run
    if problem is not None:
        pytest.skip(f"TensorRT-RTX cannot build for this GPU ({problem})")
    inputs = _make_inputs(run, tmp_path / "inputs")
    result = _run(app, run / "model.engine", cpp_plugin_library.path, inputs, tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("PASSED | lowbit_cpp_app")
    compared = subprocess.run([sys.executable, str(APP_DIR / "compare.py"), str(run), str(inputs),
                               str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert compared.stdout.strip().splitlines()[-1].startswith("PASSED | cpp_app vs onnxruntime")
