"""Per-layer bisection: every quantized layer and block is found in the graph, a clean export passes, and a
mutated layer is named first -- also when compared in small chunks."""

import copy
import re

import onnx
import pytest

from lowbit_deploy.validate.mutation import MutationKind, mutate, quantized_layer_names
from lowbit_deploy.validate.per_layer import find_taps, onnx_scope, per_layer_parity

GATE_DB = 110.0


@pytest.fixture(scope="module")
def context(tiny_run):
    from lowbit_deploy.validate.parity import prepare_validation

    return prepare_validation(tiny_run)


@pytest.mark.parametrize("module, scope", [
    ("conv_in", "/conv_in"),
    ("down_blocks.0.resnets.0.conv1", "/down_blocks.0/resnets.0/conv1"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
     "/down_blocks.1/attentions.0/transformer_blocks.0/ff/net.0/proj"),
    ("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
     "/up_blocks.0/attentions.0/transformer_blocks.0/attn1/to_out.0"),
])
def test_onnx_scope_follows_the_exporter(context, module, scope):
    assert onnx_scope(context.deployed.unet, module) == scope


def test_every_quantized_layer_and_block_has_a_tap(tiny_run, context):
    model = onnx.load(str(tiny_run / "model.onnx"))
    quantized = quantized_layer_names(model)
    taps, unmapped = find_taps(model, context.deployed, quantized)
    assert unmapped == []
    assert {t.module for t in taps if t.kind == "quantized"} == set(quantized)
    assert {t.module for t in taps if t.kind == "block"} == {"down_blocks.0", "down_blocks.1", "mid_block",
                                                               "up_blocks.0", "up_blocks.1"}
    assert [t.position for t in taps] == sorted(t.position for t in taps)


@pytest.mark.parametrize("chunk", [3, 64])
def test_clean_export_passes_and_chunks_do_not_change_figures(tiny_run, context, chunk):
    report = per_layer_parity(tiny_run / "model.onnx", context.deployed, context.inputs, GATE_DB, chunk=chunk)
    assert report.passed, report.verdict()
    assert report.chunks == -(-len(report.layers) // chunk)
    reference = per_layer_parity(tiny_run / "model.onnx", context.deployed, context.inputs, GATE_DB, chunk=1000)
    assert [l.stats for l in report.layers] == [l.stats for l in reference.layers]


@pytest.mark.parametrize("kind", [MutationKind.CODE, MutationKind.SCALE])
@pytest.mark.parametrize("position", [1, 6, -2])
def test_a_mutated_layer_is_named_first(tiny_run, context, tmp_path, kind, position):
    model = onnx.load(str(tiny_run / "model.onnx"))
    layer = quantized_layer_names(model)[position]
    mutated = copy.deepcopy(model)
    mutate(mutated, layer, kind, seed=0)
    onnx.save(mutated, str(tmp_path / "model.onnx"))
    report = per_layer_parity(tmp_path / "model.onnx", context.deployed, context.inputs, GATE_DB, chunk=4)
    assert not report.passed
    assert report.first_failing.tap.module == layer, report.verdict()
    assert layer in report.verdict()
    # The verdict names the gate that would pass, and that gate does pass.
    passing = float(re.search(r"passes with --per-layer-min-sqnr-db (\S+)\)", report.verdict()).group(1))
    report.min_sqnr_db = passing
    assert report.passed, report.verdict()


def test_chunks_are_sessions_of_a_registered_backend():
    from lowbit_deploy.validate.per_layer import CHUNK_BACKENDS

    assert set(CHUNK_BACKENDS) == {"onnxruntime", "tensorrt"}


@pytest.mark.trt
def test_a_tensorrt_chunk_engine_builds_with_its_taps_marked_as_outputs(tiny_run, context, tmp_path):
    """The TensorRT side of the bisection up to what a CPU can do: the chunk's ONNX, with its taps added as outputs,
    builds into an engine ahead of time (running it needs a GPU: the next test)."""
    from lowbit_deploy.engines.tensorrt_import import tensorrt_importable
    from lowbit_deploy.validate.per_layer import ChunkOptions, _with_outputs, build_chunk_engine

    if not tensorrt_importable("tensorrt_rtx"):
        pytest.skip("tensorrt_rtx is not installed (pip install 'lowbit-deploy[tensorrt-rtx]')")
    model = onnx.load(str(tiny_run / "model.onnx"))
    taps, _ = find_taps(model, context.deployed, quantized_layer_names(model))
    chunk = [tap.tensor for tap in taps[:5]]
    engine = build_chunk_engine(_with_outputs(model, chunk), context.signature, 2,
                                ChunkOptions(work_dir=tmp_path, plugin="python", compute_capability="8.9"))
    assert engine.is_file() and engine.stat().st_size > 0
    assert not (engine.parent / "chunk.onnx").exists()
    # TensorRT names a marked output after its ONNX tensor, which the runner reads the chunk's values by.
    import tensorrt_rtx as trt

    network_outputs = _parsed_outputs(trt, _with_outputs(model, chunk))
    assert set(chunk) <= network_outputs


def _parsed_outputs(trt, model_bytes: bytes) -> set[str]:
    from lowbit_deploy.engines.plugin import register_plugins

    register_plugins(trt)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model_bytes)
    return {network.get_output(index).name for index in range(network.num_outputs)}


@pytest.mark.gpu
def test_tensorrt_bisection_passes_a_clean_engine_and_names_a_mutated_layer(tiny_run, context, tmp_path):
    from lowbit_deploy.recipes import TENSORRT_GATES
    from lowbit_deploy.runtime.trt import device_compute_capability, unavailable_reason
    from lowbit_deploy.validate.per_layer import ChunkOptions

    reason = unavailable_reason(["current"])
    if reason:
        pytest.skip(f"TensorRT per-layer bisection runs engines: {reason}")
    options = ChunkOptions(work_dir=tmp_path, plugin="python", compute_capability=device_compute_capability())
    clean = per_layer_parity(tiny_run / "model.onnx", context.deployed, context.inputs[:1],
                             TENSORRT_GATES.min_sqnr_db, chunk=16, backend="tensorrt", options=options)
    assert clean.passed and clean.backend == "tensorrt", clean.verdict()
    # fp16/TF32 kernels sit far below float32 exactness, so the broken layer is broken grossly: its scales zeroed.
    model = onnx.load(str(tiny_run / "model.onnx"))
    layer = quantized_layer_names(model)[3]
    scale = next(init for init in model.graph.initializer if init.name == f"unet.{layer}.scale")
    scale.CopyFrom(onnx.numpy_helper.from_array(0 * onnx.numpy_helper.to_array(scale), scale.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    broken = per_layer_parity(tmp_path / "model.onnx", context.deployed, context.inputs[:1],
                              TENSORRT_GATES.min_sqnr_db, chunk=16, backend="tensorrt", options=options)
    assert broken.first_failing is not None and broken.first_failing.tap.module == layer, broken.verdict()
