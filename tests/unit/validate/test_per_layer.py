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
