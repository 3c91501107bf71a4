"""SDXL-shaped and class-conditional tiny UNets through the whole chain with the engine build: `lowbit-deploy run`
trains, exports, builds a TensorRT-RTX engine (ahead of time, on the CPU) whose optimisation profile covers the added
condition inputs, and validates (the engine itself runs only where a GPU is: elsewhere validate says so)."""

from __future__ import annotations

import json

import onnx
import pytest
from tinymodels import TINY_FAMILIES, run_tiny_family

from lowbit_deploy.engines.tensorrt_import import tensorrt_importable
from lowbit_deploy.export.lowbit_ops import OP_DOMAIN

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(not tensorrt_importable("tensorrt_rtx") and not tensorrt_importable("tensorrt"),
                       reason="neither tensorrt nor tensorrt_rtx is installed (pip install 'lowbit-deploy[tensorrt-rtx]')"),
]


@pytest.mark.parametrize("family, cached", [("sdxl", True), ("class", False)])
def test_family_builds_an_engine_and_validates(tmp_path, family, cached):
    from lowbit_deploy.runtime.trt import gpu_available

    run, result = run_tiny_family(tmp_path, family, cached, "--build", "--plugin", "python")
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    graph = onnx.load(str(run / "model.onnx")).graph
    lowbit_nodes = sum(node.domain == OP_DOMAIN for node in graph.node)
    # A profile for every graph input (text_embeds / time_ids / class_labels included) or TensorRT refuses to build.
    assert {graph_input.name for graph_input in graph.input} >= set(TINY_FAMILIES[family][1])
    assert lowbit_nodes > 0 and report["build"]["plugin_layers"] == lowbit_nodes
    assert (run / "model.engine").stat().st_size == report["build"]["engine_bytes"] > 0
    tensorrt = next(item for item in report["validate"]["parity"] if item["artifact"] == "tensorrt")
    assert report["validate"]["passed"]
    assert tensorrt["status"] == ("passed" if gpu_available() else "not run: no GPU")
