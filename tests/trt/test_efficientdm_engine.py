"""An EfficientDM model (W4A8, per-step activation scales, LoRA merged) through train -> export -> build -> validate:
the engine builds ahead of time with a plugin layer per UnpackDequantize node and per QuantizeDequantizeActivation
node, with the Python plugin and with the C++ library; the INT8 Q/DQ pairs of the constant-scale layers stay
standard (TensorRT's native path)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import onnx
import pytest
import yaml
from click.testing import CliRunner

from lowbit_deploy.cli import main
from lowbit_deploy.engines.tensorrt_import import tensorrt_importable
from lowbit_deploy.export.activation_ops import ACTIVATION_OP_TYPE
from lowbit_deploy.export.lowbit_ops import OP_DOMAIN, OP_TYPE

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(not tensorrt_importable("tensorrt_rtx") and not tensorrt_importable("tensorrt"),
                       reason="neither tensorrt nor tensorrt_rtx is installed (pip install 'lowbit-deploy[tensorrt-rtx]')"),
]


@pytest.fixture(scope="module")
def efficientdm_run(tmp_path_factory):
    from tinymodels import TINY_EFFICIENTDM_RECIPE, make_tiny_unet

    root = tmp_path_factory.mktemp("efficientdm")
    make_tiny_unet().save_pretrained(root / "model" / "unet")
    recipe = root / "recipe.yaml"
    data = {**TINY_EFFICIENTDM_RECIPE, "train": {**TINY_EFFICIENTDM_RECIPE["train"],
                                                 "stages": [{"kind": "trajectory", "steps": 2}]}}
    recipe.write_text(yaml.safe_dump(data))
    runner = CliRunner()
    for args in (["train", str(recipe), "--out", str(root / "run"), "--model", str(root / "model"), "--no-progress"],
                 ["export", str(root / "run")],
                 ["build", str(root / "run"), "--compute-capability", "8.9", "--plugin", "python"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    return root / "run"


def _node_counts(run):
    nodes = onnx.load(str(run / "model.onnx")).graph.node
    return (sum(n.domain == OP_DOMAIN and n.op_type == OP_TYPE for n in nodes),
            sum(n.domain == OP_DOMAIN and n.op_type == ACTIVATION_OP_TYPE for n in nodes),
            sum(n.op_type == "QuantizeLinear" for n in nodes))


def test_the_engine_has_a_plugin_layer_per_weight_and_per_step_activation_node(efficientdm_run):
    weights, activations, qdq = _node_counts(efficientdm_run)
    report = json.loads((efficientdm_run / "report.json").read_text())["build"]
    assert weights > 0 and activations > 0 and qdq > 0
    assert report["plugin_layers"] == weights and report["activation_layers"] == activations
    assert report["plugin"] == "python" and (efficientdm_run / "model.engine").stat().st_size > 0


def test_the_cpp_library_builds_the_same_engine(efficientdm_run, cpp_plugin_library):
    copy = efficientdm_run.parent / "run_cpp"
    shutil.copytree(efficientdm_run, copy)
    command = [sys.executable, "-m", "lowbit_deploy.cli", "build", str(copy), "--compute-capability", "8.9",
               "--no-fp16-reference"]
    cli = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]
    report = json.loads((copy / "report.json").read_text())["build"]
    python_report = json.loads((efficientdm_run / "report.json").read_text())["build"]
    assert report["plugin"] == "cpp" and report["plugin_library"] == str(cpp_plugin_library.path)
    assert (report["plugin_layers"], report["activation_layers"]) == (python_report["plugin_layers"],
                                                                       python_report["activation_layers"])
    # Not byte for byte (TensorRT-RTX's generated names differ between builds of a UNet; test_unet_engine.py).
    assert (copy / "model.engine").stat().st_size == (efficientdm_run / "model.engine").stat().st_size


def test_validate_passes_onnxruntime_and_reports_the_floor_of_quantized_activations(efficientdm_run):
    result = CliRunner().invoke(main, ["validate", str(efficientdm_run)])
    assert result.exit_code == 0, result.output
    validate = json.loads((efficientdm_run / "report.json").read_text())["validate"]
    onnxruntime = next(item for item in validate["parity"] if item["artifact"] == "onnxruntime")
    assert onnxruntime["status"] == "passed"
    weights = next(item for item in validate["parity"] if item["artifact"] == "onnxruntime weights (exact)")
    assert weights["status"] == "passed"  # LoRA merged: the exported codes are the trained ones
