"""validate end to end on a copy of the tiny run: per-backend gates, exact weights and --per-layer through the CLI."""

import json
import re
import shutil

import onnx
import pytest
from click.testing import CliRunner

from lowbit_deploy.cli import main
from lowbit_deploy.recipes import ONNXRUNTIME_GATES, TENSORRT_GATES, ValidateSection
from lowbit_deploy.validate.mutation import MutationKind, mutate, quantized_layer_names


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(tiny_run, target)
    return target


def test_clean_run_passes_with_per_layer(run_copy):
    result = CliRunner().invoke(main, ["validate", str(run_copy), "--per-layer", "--skip-sampling"])
    assert result.exit_code == 0, result.output
    assert "[per-layer] passed" in result.output
    assert "[onnxruntime weights (exact)] passed" in result.output
    report = json.loads((run_copy / "report.json").read_text())["validate"]
    # By default the ONNX Runtime, per-layer and sampling gates follow the model's float32 noise floor.
    floor = report["noise_floor"]["sqnr_db"]
    assert report["gates"]["onnxruntime"]["min_sqnr_db"] == round(floor - 10, 1)
    assert report["gates"]["per_layer_min_sqnr_db"] == round(floor - 20, 1)
    assert report["sampling"]["status"].startswith("not run")
    assert report["gates"]["tensorrt"] == TENSORRT_GATES.model_dump()
    assert "[gates] float32 noise floor" in result.output
    assert report["per_layer"]["first_failing"] is None
    assert (run_copy / "per_layer_sqnr.png").is_file()
    # No GPU here: the engine's bisection says why it did not run, and never reads as passed.
    assert report["per_layer_tensorrt"]["status"].startswith("not run: ")
    assert "Per-layer bisection" in (run_copy / "report.md").read_text()


def test_a_broken_layer_fails_validate_and_the_report_names_it(run_copy):
    model = onnx.load(str(run_copy / "model.onnx"))
    layer = quantized_layer_names(model)[4]
    mutate(model, layer, MutationKind.CODE, seed=0)
    onnx.save(model, str(run_copy / "model.onnx"))
    result = CliRunner().invoke(main, ["validate", str(run_copy), "--per-layer", "--per-layer-chunk", "5",
                                       "--skip-sampling"])
    assert result.exit_code == 1, result.output
    assert re.search(rf"first layer below [0-9.]+ dB: {re.escape(layer)} ", result.output), result.output
    assert f"decoded weight of {layer}" in result.output
    markdown = (run_copy / "report.md").read_text()
    assert f"| {layer} **<- first below the gate** |" in markdown


def test_legacy_tolerances_are_one_gate_for_every_backend():
    shared = {"max_abs": 1e-3, "min_cosine": 0.99999, "min_sqnr_db": 60.0}
    section = ValidateSection.model_validate({"tolerances": shared})
    assert section.gates.onnxruntime.model_dump(exclude={"max_rel"}) == shared
    assert section.gates.tensorrt.model_dump(exclude={"max_rel"}) == shared
    explicit = ValidateSection.model_validate({"tolerances": shared, "gates": {"tensorrt": TENSORRT_GATES.model_dump()}})
    assert explicit.gates.tensorrt == TENSORRT_GATES and explicit.gates.onnxruntime.min_sqnr_db == 60.0


def test_defaults_are_per_backend_and_tighter_for_onnxruntime():
    gates = ValidateSection().gates
    assert gates.onnxruntime.min_sqnr_db > gates.tensorrt.min_sqnr_db
    assert gates.onnxruntime.max_abs < gates.tensorrt.max_abs


def test_flags_override_the_gates_of_every_backend(run_copy):
    result = CliRunner().invoke(main, ["validate", str(run_copy), "--min-sqnr-db", "1000", "--skip-sampling"])
    assert result.exit_code == 1
    report = json.loads((run_copy / "report.json").read_text())["validate"]
    assert report["gates"]["onnxruntime"]["min_sqnr_db"] == report["gates"]["tensorrt"]["min_sqnr_db"] == 1000
    # the flag fixed the SQNR gate only: max_abs still follows the floor
    assert report["gates"]["follow_floor"]["output_margin_db"] is None
    assert report["gates"]["onnxruntime"]["max_abs"] != ONNXRUNTIME_GATES.max_abs


def test_gates_written_in_a_recipe_are_fixed():
    section = ValidateSection.model_validate({"gates": {"onnxruntime": ONNXRUNTIME_GATES.model_dump()},
                                              "sampling": {"min_psnr_db": 90.0}})
    follow = section.gates.follow_floor
    assert (follow.output_margin_db, follow.max_abs_factor, follow.sampling_margin_db,
            follow.sampling_flip_margin_db) == (None, None, None, None)
    assert follow.per_layer_margin_db == 20.0
    assert ValidateSection.model_validate(section.model_dump()) == section  # stable through checkpoint JSON


def test_a_failing_sampling_gate_names_the_value_that_passes(run_copy):
    args = ["validate", str(run_copy), "--samples", "2"]
    failed = CliRunner().invoke(main, [*args, "--min-psnr-db", "1000"])
    assert failed.exit_code == 1, failed.output
    passes_with = json.loads((run_copy / "report.json").read_text())["validate"]["sampling"]["passes_with"]
    assert passes_with in failed.output and passes_with.startswith("--min-psnr-db ")
    passed = CliRunner().invoke(main, [*args, *passes_with.split()])
    assert passed.exit_code == 0, passed.output
