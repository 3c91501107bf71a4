"""The build stage on a real (tiny) quantized UNet: a TensorRT-RTX engine whose every low-bit layer is a plugin."""

from __future__ import annotations

import json

import onnx
import pytest
import yaml
from click.testing import CliRunner

from lowbit_deploy.build.tensorrt_import import tensorrt_importable
from lowbit_deploy.cli import main
from lowbit_deploy.export.lowbit_ops import OP_DOMAIN

pytestmark = [
    pytest.mark.trt,
    pytest.mark.skipif(not tensorrt_importable("tensorrt_rtx") and not tensorrt_importable("tensorrt"),
                       reason="neither tensorrt nor tensorrt_rtx is installed (pip install 'lowbit-deploy[tensorrt-rtx]')"),
]


@pytest.fixture(scope="module")
def built_run(tmp_path_factory):
    from tinymodels import TINY_RECIPE, make_tiny_unet

    root = tmp_path_factory.mktemp("engine")
    make_tiny_unet().save_pretrained(root / "model" / "unet")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "steps": 1}}))
    runner = CliRunner()
    for args in (["train", str(recipe), "--out", str(root / "run"), "--model", str(root / "model"), "--no-progress"],
                 ["export", str(root / "run")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["build", str(root / "run"), "--compute-capability", "8.9"])
    return root / "run", result


def test_build_writes_an_engine_with_one_plugin_layer_per_lowbit_node(built_run):
    run, result = built_run
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("PASSED")
    report = json.loads((run / "report.json").read_text())["build"]
    lowbit_nodes = sum(node.domain == OP_DOMAIN for node in onnx.load(str(run / "model.onnx")).graph.node)
    assert lowbit_nodes > 0 and report["plugin_layers"] == lowbit_nodes
    assert (run / "model.engine").stat().st_size == report["engine_bytes"] > 0
    assert report["fp16_engine_bytes"] > 0 and report["compute_capabilities"] == ["8.9"]


def test_validate_never_claims_an_engine_it_could_not_run(built_run):
    from lowbit_deploy.runtime.trt import gpu_available

    run, _ = built_run
    result = CliRunner().invoke(main, ["validate", str(run), "--skip-sampling"])
    assert result.exit_code == 0, result.output
    tensorrt = next(item for item in json.loads((run / "report.json").read_text())["validate"]["parity"]
                    if item["artifact"] == "tensorrt")
    if gpu_available():
        assert tensorrt["status"] == "passed"
    else:
        assert tensorrt["status"] == "not run: no GPU" and tensorrt["stats"] is None


@pytest.mark.skipif(tensorrt_importable("tensorrt"), reason="full TensorRT builds for the GPU present and ignores "
                    "compute capabilities; this checks TensorRT-RTX's ahead-of-time targets")
def test_unknown_compute_capability_is_a_clean_error(built_run):
    run, _ = built_run
    result = CliRunner().invoke(main, ["build", str(run), "--compute-capability", "9.0"])
    assert result.exit_code == 2 and "not a TensorRT-RTX target" in result.output
    result = CliRunner().invoke(main, ["build", str(run), "--compute-capability", "nine"])
    assert result.exit_code == 2 and "MAJOR.MINOR" in result.output
