"""One runner interface: the backend registry, ONNX Runtime vs the PyTorch reference, and the engine runner's checks
(with a stand-in for TensorRT on CPU; the real engine only where a GPU can run it)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.runtime import BACKENDS, BackendUnavailableError, EngineRunner, OrtRunner, Runner, open_runner
from lowbit_deploy.runtime import trt as trt_runtime
from lowbit_deploy.runtime.runners import TorchRunner, register_backend

MIN_OUTPUT_SQNR_DB = 100.0  # measured ~131 dB ORT vs torch (float32 reordering); a wrong weight or time row: < 40


def _sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    noise = float(((reference.double() - candidate.double()) ** 2).mean())
    return math.inf if noise == 0 else 10 * math.log10(float((reference.double() ** 2).mean()) / noise)


def test_importing_the_runtime_package_loads_nothing_heavy():
    heavy = ("torch", "onnxruntime", "onnx", "diffusers", "tensorrt", "tensorrt_rtx")
    code = f"import sys, lowbit_deploy.runtime; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_registry_maps_suffixes_to_backends():
    assert {name: backend.suffixes for name, backend in BACKENDS.items()} == {
        "onnxruntime": (".onnx",), "torch": (".safetensors",), "tensorrt": (".engine", ".plan")}
    with pytest.raises(ValueError, match="already registered"):
        register_backend("other", (".onnx",), "a second runtime for .onnx")(lambda path, options: None)


@pytest.mark.parametrize("kind", ["cached_run", "timestep_run"])
def test_onnxruntime_matches_the_pytorch_reference(request, kind):
    run = request.getfixturevalue(kind)
    ort = open_runner(run / "model.onnx", threads=1)
    reference = open_runner(run / "checkpoint" / "quantized_unet.safetensors")
    assert isinstance(ort, OrtRunner) and isinstance(reference, TorchRunner)
    assert isinstance(ort, Runner) and isinstance(reference, Runner)
    assert (ort.name, reference.name) == ("onnxruntime", "torch")
    assert ort.signature == reference.signature
    states = torch.randn(4, ort.signature.seq_len, ort.signature.cross_attention_dim,
                         generator=torch.Generator().manual_seed(1))
    feeds = ort.signature.random_feeds(4, torch.Generator().manual_seed(0), states)
    output = ort(feeds)
    assert output.dtype == torch.float32 and output.device.type == "cpu"
    assert _sqnr_db(reference(feeds), output) >= MIN_OUTPUT_SQNR_DB


def test_explicit_backend_overrides_the_suffix(cached_run, tmp_path):
    renamed = tmp_path / "unet.bin"
    shutil.copy(cached_run / "model.onnx", renamed)
    assert open_runner(renamed, "onnxruntime").signature.num_steps == 3


def test_unknown_suffix_names_the_known_ones(tmp_path):
    path = tmp_path / "unet.bin"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"'.bin'.*\.onnx \(onnxruntime\).*\.engine \(tensorrt\).*backend="):
        open_runner(path)


def test_unknown_backend_lists_the_registered_ones(tmp_path):
    with pytest.raises(UserError, match="unknown backend 'openvino'; choose one of onnxruntime, tensorrt, torch"):
        open_runner(tmp_path / "model.onnx", "openvino")


@pytest.mark.parametrize("name", ["model.onnx", "model.engine", "checkpoint/quantized_unet.safetensors"])
def test_missing_file_is_a_user_error_with_the_fix(tmp_path, name):
    with pytest.raises(UserError, match=f"no file at .*{name}.*lowbit-deploy export"):
        open_runner(tmp_path / name)


def test_a_run_directory_is_refused_with_the_files_to_pass(cached_run, tmp_path):
    folder = tmp_path / "run.onnx"  # a directory whose name looks like a model
    folder.mkdir()
    with pytest.raises(UserError, match="is a directory; pass the file to run"):
        open_runner(folder)


# ---- the engine runner, TensorRT stood in on CPU ---------------------------------------------------------------
class _FakeEngine:
    """Stands in for ``trt.TrtRunner``: records calls, answers fp16 like a half-precision engine output would."""

    input_names = ["sample", "step_index", "encoder_hidden_states"]
    calls: list = []

    def __init__(self, engine_path, backend=None, plugin="auto") -> None:
        self.engine_path, self.plugin = engine_path, plugin

    def infer(self, feeds):
        _FakeEngine.calls.append(feeds)
        return {"noise_pred": feeds["sample"].half() * 2}


@pytest.fixture
def engine_run(cached_run, tmp_path, monkeypatch):
    """A copy of the cached run with an engine file and a build report, TensorRT replaced by :class:`_FakeEngine`."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(cached_run / "model.onnx", run / "model.onnx")
    (run / "model.engine").write_bytes(b"not an engine: the stand-in never reads it")
    (run / "report.json").write_text(json.dumps({"build": {"compute_capabilities": ["8.9"]}}))
    asked = []
    monkeypatch.setattr(trt_runtime, "unavailable_reason", lambda built_for, plugin: asked.append(built_for))
    monkeypatch.setattr(trt_runtime, "TrtRunner", _FakeEngine)
    _FakeEngine.calls = []
    return run, asked


def test_engine_runner_checks_feeds_before_the_engine_and_answers_on_cpu(engine_run):
    run, asked = engine_run
    runner = open_runner(run / "model.engine")
    assert isinstance(runner, EngineRunner) and runner.name == "tensorrt"
    assert asked == [["8.9"]]  # the build report's compute capabilities decide whether it can run here
    signature = runner.signature
    states = torch.zeros(2, signature.seq_len, signature.cross_attention_dim)
    feeds = signature.feeds(torch.ones(2, *signature.sample_shape), torch.tensor([0, 2]), states)
    output = runner(feeds)
    assert output.dtype == torch.float32 and output.device.type == "cpu" and torch.equal(output, 2 * feeds["sample"])
    bad = {**feeds, "step_index": torch.tensor([0, signature.num_steps])}
    with pytest.raises(UserError, match="step_index .* out of range"):
        runner(bad)
    assert len(_FakeEngine.calls) == 1  # the out-of-range index never reached the engine


@pytest.mark.parametrize("plugin", ["auto", "cpp", "python"])
def test_engine_runner_passes_the_plugin_choice_to_tensorrt(engine_run, plugin):
    run, _ = engine_run
    assert open_runner(run / "model.engine", plugin=plugin)._engine.plugin == plugin


def test_engine_runner_refuses_an_unknown_plugin_before_the_engine(engine_run):
    run, asked = engine_run
    with pytest.raises(UserError, match="plugin='rust' is not one of auto, cpp, python"):
        open_runner(run / "model.engine", plugin="rust")
    assert asked == []  # refused before anything looked at the engine


def test_engine_runner_refuses_an_engine_with_other_inputs(engine_run, monkeypatch):
    run, _ = engine_run
    monkeypatch.setattr(_FakeEngine, "input_names", ["sample", "timestep", "encoder_hidden_states"])
    with pytest.raises(UserError, match="rebuild the engine from the matching ONNX file"):
        open_runner(run / "model.engine")


def test_engine_without_its_onnx_needs_a_signature(engine_run):
    run, _ = engine_run
    signature = open_runner(run / "model.onnx").signature
    (run / "model.onnx").unlink()
    with pytest.raises(UserError, match="model.onnx is not beside it"):
        open_runner(run / "model.engine")
    assert open_runner(run / "model.engine", signature=signature).signature == signature


def test_engine_that_cannot_run_here_says_why(engine_run, monkeypatch):
    run, _ = engine_run
    monkeypatch.setattr(trt_runtime, "unavailable_reason", lambda built_for, plugin: "no GPU")
    with pytest.raises(BackendUnavailableError, match="cannot run .*model.engine here: no GPU.*model.onnx") as error:
        open_runner(run / "model.engine")
    assert error.value.reason == "no GPU"


def test_engine_on_this_machine_runs_or_says_why(cached_run, tmp_path):
    """Unpatched: where engines cannot run (no GPU here), the runner raises with the machine's real reason."""
    reason = trt_runtime.unavailable_reason(None)
    if reason is None:
        pytest.skip("this machine can run engines: tests/unit/runtime/test_runners.py's gpu test runs one")
    shutil.copy(cached_run / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "model.engine").write_bytes(b"\0")
    with pytest.raises(BackendUnavailableError) as error:
        open_runner(tmp_path / "model.engine")
    assert error.value.reason == reason


@pytest.mark.gpu
@pytest.mark.trt
def test_engine_drop_in_matches_the_pytorch_reference_on_a_gpu(cached_run, tmp_path):
    """Builds the cached run's engine for this GPU and compares its outputs with the PyTorch reference."""
    reason = trt_runtime.unavailable_reason(["current"])
    if reason:
        pytest.skip(f"not run: {reason}")
    from lowbit_deploy.pipeline import build_run

    run = shutil.copytree(cached_run, tmp_path / "run")
    capability = trt_runtime.device_compute_capability()
    build_run(run, compute_capabilities=[capability], fp16_reference=False, plugin="python")
    engine = open_runner(run / "model.engine", built_for=[capability])
    reference = open_runner(run / "checkpoint" / "quantized_unet.safetensors")
    states = torch.randn(2, engine.signature.seq_len, engine.signature.cross_attention_dim)
    feeds = engine.signature.random_feeds(2, torch.Generator().manual_seed(0), states)
    # fp32 engine; TensorRT may pick TF32 tactics, so the gate is the validate stage's default (60 dB), not ORT's.
    assert _sqnr_db(reference(feeds), engine(feeds)) >= 60.0
