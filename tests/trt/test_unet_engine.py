"""The build stage on a real (tiny) quantized UNet: a TensorRT-RTX engine whose every low-bit layer is a plugin."""

from __future__ import annotations

import json

import onnx
import pytest
import yaml
from click.testing import CliRunner

from lowbit_deploy.engines.tensorrt_import import tensorrt_importable
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
    # The Python plugin in this process (it never loads the C++ library, which a process keeps once loaded); the
    # default C++ plugin builds in a fresh process below.
    result = runner.invoke(main, ["build", str(root / "run"), "--compute-capability", "8.9", "--plugin", "python"])
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


def test_default_cli_build_uses_the_cpp_library_and_builds_the_same_engine(built_run, cpp_plugin_library):
    """`lowbit-deploy build` (default --plugin cpp) in a fresh process: the report names the C++ library and the
    engine matches the Python plugin's. Not byte for byte: TensorRT-RTX's Myelin names (``__mye<N>``) and memory
    offsets differ between any two builds of this UNet, Python vs Python included (measured); the toy chains of
    test_cpp_plugin.py build deterministically and are compared byte for byte."""
    import shutil
    import subprocess
    import sys

    run, result = built_run
    assert result.exit_code == 0, result.output
    python_engine = (run / "model.engine").read_bytes()
    python_report = json.loads((run / "report.json").read_text())["build"]
    assert python_report["plugin"] == "python"
    copy = run.parent / "run_cpp"
    shutil.copytree(run, copy)
    command = [sys.executable, "-m", "lowbit_deploy.cli", "build", str(copy), "--compute-capability", "8.9",
               "--no-fp16-reference"]
    cli = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]
    assert "cpp plugin" in cli.stdout and str(cpp_plugin_library.path) in cli.stdout
    report = json.loads((copy / "report.json").read_text())["build"]
    assert report["plugin"] == "cpp" and report["plugin_library"] == str(cpp_plugin_library.path)
    assert report["plugin_layers"] == python_report["plugin_layers"] > 0
    assert len((copy / "model.engine").read_bytes()) == len(python_engine)


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
    result = CliRunner().invoke(main, ["build", str(run), "--compute-capability", "9.0", "--plugin", "python"])
    assert result.exit_code == 2 and "not a TensorRT-RTX target" in result.output
    result = CliRunner().invoke(main, ["build", str(run), "--compute-capability", "nine", "--plugin", "python"])
    assert result.exit_code == 2 and "MAJOR.MINOR" in result.output
