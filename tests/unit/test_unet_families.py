"""UNet families beyond SD1.x/2.x through the whole chain as a user runs it (`lowbit-deploy run --model FOLDER`):
SDXL-shaped UNets (added conditions text_embeds / time_ids, transformer_layers_per_block as a list) and
class-conditional UNets (class_labels), with and without cached time embeddings. Train -> export -> validate
(ONNX Runtime parity, exact weights, sampling); the engine build of both families is in
tests/trt/test_unet_families_engine.py.

One chain per family runs by default (~30 s each on the 2-core dev CPU); the other time input of each is `slow`.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from tinymodels import TINY_FAMILIES, run_tiny_family

from lowbit_deploy.runtime.ort import OrtRunner, read_signature

ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}


@pytest.mark.parametrize("family, cached", [
    ("sdxl", True),
    ("class", False),
    pytest.param("sdxl", False, marks=pytest.mark.slow),
    pytest.param("class", True, marks=pytest.mark.slow),
])
def test_family_goes_through_train_export_and_validate(tmp_path, family, cached):
    run, result = run_tiny_family(tmp_path, family, cached, "--no-build")
    assert result.exit_code == 0, result.output
    _, added = TINY_FAMILIES[family]
    signature = read_signature(run / "model.onnx")
    time_input = "step_index" if cached else "timestep"
    assert signature.input_names == ("sample", time_input, "encoder_hidden_states", *added)
    report = json.loads((run / "report.json").read_text())
    assert report["train"]["signature"]["inputs"] == list(signature.input_names)

    # The graph takes the added conditions as inputs named and typed by the signature.
    graph = onnx.load(str(run / "model.onnx"), load_external_data=False).graph
    assert [graph_input.name for graph_input in graph.input] == list(signature.input_names)
    for graph_input, spec in zip(graph.input, signature.inputs):
        assert graph_input.type.tensor_type.elem_type == ONNX_TYPES[spec.dtype], spec.name
    tables = {init.name for init in graph.initializer if init.name.endswith(".table")}
    assert ("unet.time_embedding.table" in tables) == cached
    assert not any("time_emb_proj" in name for name in tables)  # they see the added conditions: never cached

    # Validate passed every artifact check on these inputs (ONNX Runtime within the floor-following gates, weights
    # bit-exact, sampled images), not only its closing line.
    validate = report["validate"]
    statuses = {item["artifact"]: item["status"] for item in validate["parity"]}
    assert validate["passed"] and statuses["onnxruntime"] == "passed"
    assert statuses["onnxruntime weights (exact)"] == "passed"
    assert validate["sampling"]["status"] == "passed"

    # The added conditions reach the output through the ONNX graph: changing only them changes it.
    generator = torch.Generator().manual_seed(0)
    feeds = signature.random_feeds(2, generator, torch.randn(2, signature.seq_len, signature.cross_attention_dim))
    other, ort = dict(feeds), OrtRunner(run / "model.onnx", threads=1)
    for name in added:
        other[name] = {"text_embeds": lambda value: value + 1.0, "time_ids": lambda value: value * 2.0,
                       "class_labels": lambda value: (value + 1) % 5}[name](feeds[name])
        assert float((ort(other) - ort(feeds)).abs().max()) > 1e-4, name
        other[name] = feeds[name]
