"""ONNX Runtime weight modes: ``packed`` keeps every lowbit node's packed words as the session's initializers (no
decoded float32 copy), ``folded`` is ORT's default constant folding; both compute the deployed model's outputs."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.export.lowbit_ops import OP_DOMAIN, OP_TYPE
from lowbit_deploy.recipe_validate import ONNXRUNTIME_GATES
from lowbit_deploy.runtime import ort as ort_runtime
from lowbit_deploy.runtime.ort import WEIGHT_MODES, OrtRunner, packed_weight_count, resolve_weight_mode
from lowbit_deploy.runtime.runners import TorchRunner, open_runner

# Fusions differ between the modes (a folded weight feeds Conv/Gemm fusions as a constant), so the float32 op order
# differs: measured 1.2e-6 max abs between the modes on the default model. Each mode must stay inside the ONNX
# Runtime output gate against the PyTorch deployed model (2e-5, docs/gates.md); between each other: 1e-5.
BETWEEN_MODES_MAX_ABS = 1e-5


def _feeds(signature, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, signature.seq_len, signature.cross_attention_dim, generator=generator)
    return signature.random_feeds(batch, generator, states)


def _lowbit_inputs(onnx_path) -> set[str]:
    model = onnx.load(str(onnx_path))
    return {name for node in model.graph.node if node.domain == OP_DOMAIN and node.op_type == OP_TYPE
            for name in node.input}


def _optimized_initializers(onnx_path, mode: str, tmp_path) -> set[str]:
    target = tmp_path / f"optimized_{mode}.onnx"
    runner = OrtRunner(onnx_path, weights=mode, optimized_model_path=target)
    runner(_feeds(runner.signature))
    return {init.name for init in onnx.load(str(target)).graph.initializer}


@pytest.mark.parametrize("fixture", ["cached_run", "timestep_run"])
def test_both_modes_compute_the_deployed_outputs(fixture, request):
    run = request.getfixturevalue(fixture)
    reference = TorchRunner(run / "checkpoint" / "quantized_unet.safetensors")
    feeds = _feeds(reference.signature)
    expected = reference(feeds)
    outputs = {mode: OrtRunner(run / "model.onnx", weights=mode)(feeds) for mode in WEIGHT_MODES}
    for mode, output in outputs.items():
        assert float((output - expected).abs().max()) <= ONNXRUNTIME_GATES.max_abs, mode
    assert float((outputs["packed"] - outputs["folded"]).abs().max()) <= BETWEEN_MODES_MAX_ABS


def test_packed_mode_keeps_the_packed_words_resident_and_folded_decodes_them(cached_run, tmp_path):
    onnx_path = cached_run / "model.onnx"
    packed_words = {name for name in _lowbit_inputs(onnx_path) if name.endswith(".packed")}
    assert packed_words
    packed = _optimized_initializers(onnx_path, "packed", tmp_path)
    folded = _optimized_initializers(onnx_path, "folded", tmp_path)
    assert packed_words <= packed  # every lowbit node still reads its packed words: nothing was decoded ahead
    assert not packed_words & folded  # ORT's default folding replaced them by decoded weights (what packed avoids)


def test_auto_folds_small_models_and_keeps_large_ones_packed(cached_run, monkeypatch):
    onnx_path = cached_run / "model.onnx"
    count = packed_weight_count(onnx_path)
    report = json.loads((cached_run / "report.json").read_text())["export"]
    assert count == report["quantized_weights"] > 0
    assert resolve_weight_mode("auto", onnx_path) == "folded"
    monkeypatch.setattr(ort_runtime, "FOLD_MAX_WEIGHTS", count - 1)
    assert resolve_weight_mode("auto", onnx_path) == "packed"
    assert resolve_weight_mode("folded", onnx_path) == "folded"
    runner = OrtRunner(onnx_path)
    runner(_feeds(runner.signature))
    assert runner.weights == "packed"


def test_open_runner_passes_the_mode_and_refuses_an_unknown_one(cached_run):
    assert open_runner(cached_run / "model.onnx", ort_weights="packed").weights == "packed"
    with pytest.raises(UserError, match="unknown ONNX Runtime weight mode 'unpacked'.*packed, folded or auto"):
        open_runner(cached_run / "model.onnx", ort_weights="unpacked")
