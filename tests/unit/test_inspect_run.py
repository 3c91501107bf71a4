"""inspect_run: what a run directory holds, from headers and metadata only; absent pieces are reported, not raised.

Artifacts are written directly (a safetensors header, a one-node ONNX model, report.json) so every case runs in
well under a second; tests/unit/cli/test_cli_output.py inspects a real tiny run against its report.json.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from lowbit_deploy.errors import UserError
from lowbit_deploy.inspect_run import CHECKPOINT_FORMAT, CHECKPOINT_PATH, describe_run, inspect_run
from lowbit_deploy.quant.grids import GridKind
from lowbit_deploy.quant.plan import LayerDecision, LayerRole, QuantPlan
from lowbit_deploy.signature import DeployedSignature, TimeInput

SECTIONS = ("checkpoint", "plan", "onnx", "signature", "build", "validation")


def _plan() -> QuantPlan:
    return QuantPlan((LayerDecision("conv_in", "Conv2d", 72, 8, LayerRole.QUANTIZED, GridKind.SIGNED, 8),
                      LayerDecision("down.0.conv", "Conv2d", 576, 8, LayerRole.QUANTIZED, GridKind.BALANCED, 1),
                      LayerDecision("down.1.conv", "Conv2d", 1152, 16, LayerRole.QUANTIZED, GridKind.BALANCED, 1),
                      LayerDecision("time_embedding.linear_1", "Linear", 256, 32, LayerRole.CACHED),
                      LayerDecision("down.0.time_emb_proj", "Linear", 256, 8, LayerRole.CACHED),
                      LayerDecision("mid.proj", "Linear", 256, 16, LayerRole.FLOAT)),
                     total_params=2500, source="test plan")


SIGNATURE = DeployedSignature((1, 8, 8), 4, 16, TimeInput.STEP_INDEX, (750, 500, 250, 0), "ddim, 4 steps")


def _write_checkpoint(run, metadata: dict) -> None:
    from safetensors.numpy import save_file

    path = run / CHECKPOINT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": np.zeros(4, np.float32)}, str(path), metadata=metadata)


def _checkpoint_metadata() -> dict:
    return {"format": CHECKPOINT_FORMAT, "step": "7", "model_source": "", "recipe": json.dumps({"name": "r"}),
            "plan": _plan().to_json(), "signature": SIGNATURE.to_json()}


def _write_onnx(run, fmt, levels: int = 3) -> "PackedWeight":  # noqa: F821
    import onnx

    from lowbit_deploy.export.lowbit_ops import PackedWeight, standalone_model
    from lowbit_deploy.runtime.ort import METADATA_SIGNATURE

    codes = np.random.default_rng(0).integers(0, levels, size=(8, 9))
    weight = PackedWeight.from_integers("w", codes - levels // 2, -(levels // 2), levels,
                                        np.ones(8, np.float16), fmt)
    model = standalone_model(weight)
    onnx.helper.set_model_props(model, {METADATA_SIGNATURE: SIGNATURE.to_json()})
    onnx.save(model, str(run / "model.onnx"))
    return weight


def test_missing_run_dir_and_a_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        inspect_run(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a run directory"):
        inspect_run(tmp_path / "file")


def test_empty_dir_reports_every_piece_missing(tmp_path):
    info = inspect_run(tmp_path)
    assert {section: info[section]["status"] for section in SECTIONS} == dict.fromkeys(SECTIONS, "missing")
    assert info["files"] == {"total_bytes": 0, "bytes": {}}
    assert "lowbit-deploy train" in info["checkpoint"]["detail"]
    assert any(line.startswith("plan: missing") for line in describe_run(info))


def test_checkpoint_header_gives_plan_and_signature_without_torch(tmp_path):
    _write_checkpoint(tmp_path, _checkpoint_metadata())
    code = ("import json, sys; from lowbit_deploy.inspect_run import inspect_run; "
            f"info = inspect_run({str(tmp_path)!r}); print(json.dumps([info['plan'], 'torch' in sys.modules]))")
    plan, torch_loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                   check=True).stdout)
    assert torch_loaded is False
    assert plan["by_role"] == {"quantized": 3, "float": 1, "cached": 2}
    assert plan["by_bits"] == {"1": {"layers": 2, "weights": 1728}, "8": {"layers": 1, "weights": 72}}
    # BitsFusion's count with the signature's 4 cached steps of the 8-row time_emb_proj table.
    assert plan["average_bits"] == pytest.approx((np.log2(3) * 1728 + 8 * 72 + 16 * 4 * 8) / 2500)
    assert plan["cached_values"] == 4 * 8
    assert [(layer["name"], layer["role"], layer["bits"], layer["grid"]) for layer in plan["per_layer"]] == [
        ("conv_in", "quantized", 8, "signed"), ("down.0.conv", "quantized", 1, "balanced"),
        ("down.1.conv", "quantized", 1, "balanced"), ("time_embedding.linear_1", "cached", None, None),
        ("down.0.time_emb_proj", "cached", None, None), ("mid.proj", "float", None, None)]
    info = inspect_run(tmp_path)
    lines = describe_run(info)
    assert "    conv_in: 8-bit signed, 72" in lines and "    mid.proj: float, 256" in lines
    assert info["checkpoint"]["step"] == 7 and info["checkpoint"]["recipe"] == "r"
    assert info["signature"]["from"] == CHECKPOINT_PATH.as_posix()
    assert info["signature"]["step_timesteps"] == [750, 500, 250, 0]
    assert info["onnx"]["status"] == "missing"


@pytest.mark.parametrize("fmt, levels", [("int8_words", 3), ("int32_words", 5), ("bitstream", 3),
                                         ("bitstream", 17)])
def test_onnx_packing_format_and_stored_bits(tmp_path, fmt, levels):
    from lowbit_deploy.quant.packing import PackingFormat

    weight = _write_onnx(tmp_path, PackingFormat(fmt), levels)
    info = inspect_run(tmp_path)
    onnx_info = info["onnx"]
    assert onnx_info["lowbit_nodes"] == 1 and onnx_info["quantized_weights"] == 72
    [group] = onnx_info["formats"]
    assert (group["format"], group["levels"]) == (fmt, levels)
    assert group["packed_bytes"] == weight.packed_words.nbytes and group["scale_bytes"] == 16
    assert onnx_info["stored_bits_per_weight"] == pytest.approx(8 * weight.packed_words.nbytes / 72)
    assert onnx_info["op_versions"] == [2 if fmt == "bitstream" else 1]
    assert info["signature"]["from"] == "model.onnx"
    assert info["files"]["bytes"]["model.onnx"] == (tmp_path / "model.onnx").stat().st_size


def test_corrupt_pieces_are_reported_unreadable(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08not a protobuf" * 3)
    (tmp_path / "report.json").write_text("{truncated")
    _write_checkpoint(tmp_path, {"format": "someone-else/1"})
    info = inspect_run(tmp_path)
    assert info["onnx"]["status"] == "unreadable"
    assert info["checkpoint"]["status"] == "unreadable" and "someone-else/1" in info["checkpoint"]["detail"]
    assert info["validation"]["status"] == "unreadable" and info["build"]["status"] == "unreadable"
    assert info["plan"]["status"] == "missing"
    lines = describe_run(info)
    assert any(line.startswith("onnx: unreadable (model.onnx: ") for line in lines)
    assert any(line.startswith("checkpoint: unreadable (format 'someone-else/1'") for line in lines)


def test_validation_entry_lists_backends_with_their_figures(tmp_path):
    stats = {"max_abs": 1e-6, "mean_abs": 1e-7, "max_rel": 1e-5, "cosine": 1.0, "sqnr_db": "inf"}
    report = {"validate": {"passed": False, "seconds": 1.5, "tolerances": {"max_abs": 0.001},
                           "parity": [{"artifact": "onnxruntime", "status": "passed", "failures": [], "stats": stats},
                                      {"artifact": "tensorrt", "status": "failed", "failures": ["max_abs 2 > 0.001"],
                                       "stats": stats}],
                           "sampling": {"status": "skipped"},
                           "noise_floor": {"sqnr_db": 131.25}, "gates": {"onnxruntime": {"min_sqnr_db": 121.3},
                                                                          "per_layer_min_sqnr_db": 111.3},
                           "per_layer": {"status": "failed", "verdict": "first layer below 111.3 dB: conv_in",
                                         "first_failing": "conv_in", "min_sqnr_db": 111.3, "layers": []},
                           "per_layer_tensorrt": {"status": "not run: no GPU"}},
              "build": {"backend": "tensorrt", "plugin": "cpp", "plugin_layers": 3, "engine_bytes": 10}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    info = inspect_run(tmp_path)
    validation = info["validation"]
    assert validation["passed"] is False and validation["tolerances"] == {"max_abs": 0.001}
    assert [(b["artifact"], b["status"], b["stats"]["sqnr_db"]) for b in validation["backends"]] == [
        ("onnxruntime", "passed", "inf"), ("tensorrt", "failed", "inf")]
    assert info["build"] == {"status": "ok", "backend": "tensorrt", "plugin": "cpp", "plugin_layers": 3,
                             "engine_bytes": 10}
    lines = describe_run(info)
    assert "validation: FAILED" in lines and "  tensorrt: failed  max_abs=1e-06 cosine=1.0 sqnr_db=inf" in lines
    assert "  float32 noise floor 131.2 dB -> gates: onnxruntime SQNR >= 121.3 dB, per-layer >= 111.3 dB" in lines
    assert "  per-layer onnxruntime: failed (first layer below 111.3 dB: conv_in)" in lines
    assert "  per-layer tensorrt: not run: no GPU" in lines
    json.dumps(info, allow_nan=False)  # the --json result must be strict JSON


def test_constants_match_the_checkpoint_module():
    from lowbit_deploy.qat import checkpoint

    assert CHECKPOINT_FORMAT == checkpoint.CHECKPOINT_FORMAT
    assert CHECKPOINT_PATH.parts == (checkpoint.CHECKPOINT_DIRNAME, checkpoint.WEIGHTS_FILE)


def test_checkpoint_names_the_model_files_and_prompts(tmp_path):
    """A run from a variant checkpoint with text conditions says which files and prompts it was distilled from."""
    recipe = {"name": "r", "model": {"variant": "fp16"}, "conditions": {"prompts_file": "/data/prompts.txt"}}
    _write_checkpoint(tmp_path, {**_checkpoint_metadata(), "model_source": "/models/sd15/unet",
                                 "recipe": json.dumps(recipe)})
    info = inspect_run(tmp_path)
    assert (info["checkpoint"]["variant"], info["checkpoint"]["prompts_file"]) == ("fp16", "/data/prompts.txt")
    assert describe_run(info)[1].endswith(", recipe r, model /models/sd15/unet, variant fp16, "
                                          "prompts /data/prompts.txt")
    _write_checkpoint(tmp_path, _checkpoint_metadata())
    assert describe_run(inspect_run(tmp_path))[1].endswith(", recipe r")
