"""validate at scale: one ONNX Runtime session in the chosen weight mode, and the sampling comparison's default work
bounded by the model's size."""

import json
import shutil

import pytest
from click.testing import CliRunner

from lowbit_deploy.cli import main
from lowbit_deploy.recipes import SamplingSection
from lowbit_deploy.runtime.ort import read_signature
from lowbit_deploy.signature import TimeInput, signature_for
from lowbit_deploy.validate import parity
from lowbit_deploy.validate.parity import SAMPLING_BUDGET_PARAMETER_STEPS, scaled_sampling

SD15_PARAMETERS = 859_520_964
DEFAULT_MODEL_PARAMETERS = 2_000_000


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(tiny_run, target)
    return target


@pytest.fixture(scope="module")
def timestep_signature():
    from tinymodels import make_tiny_unet

    return signature_for(make_tiny_unet(), 8)


@pytest.mark.parametrize("parameters, samples, steps, expected", [
    (DEFAULT_MODEL_PARAMETERS, 10, 25, (10, 25)),     # 5e8 parameter-steps: the recipe's values
    (SD15_PARAMETERS, 2, 25, (2, 2)),                 # the SD1.5 recipe's 2 x 25 -> 2 x 2
    (SD15_PARAMETERS, 1, 3, (1, 3)),                  # 2.6e9: within the budget
    (2_600_000_000, 4, 50, (2, 2)),                   # SDXL-sized
])
def test_sampling_work_is_bounded_by_model_size(timestep_signature, parameters, samples, steps, expected):
    config = SamplingSection(num_samples=samples, num_steps=steps)
    scaled = scaled_sampling(config, steps, timestep_signature, parameters)
    assert (scaled.num_samples, scaled.num_steps) == expected
    assert (parameters * samples * steps > SAMPLING_BUDGET_PARAMETER_STEPS) == (scaled != config)


def test_a_model_with_a_step_index_keeps_its_schedule(tiny_run):
    signature = read_signature(tiny_run / "model.onnx")
    assert signature.time_input is TimeInput.STEP_INDEX
    scaled = scaled_sampling(SamplingSection(num_samples=10), signature.num_steps, signature, SD15_PARAMETERS)
    assert (scaled.num_samples, scaled.num_steps) == (2, None)  # None: the schedule's steps, which the graph caches


@pytest.mark.parametrize("mode", ["packed", "folded"])
def test_validate_runs_one_session_in_the_chosen_mode(run_copy, mode):
    result = CliRunner().invoke(main, ["validate", str(run_copy), "--ort-weights", mode, "--samples", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((run_copy / "report.json").read_text())["validate"]
    onnxruntime = next(entry for entry in report["parity"] if entry["artifact"] == "onnxruntime")
    assert onnxruntime["status"] == "passed" and onnxruntime["details"] == {"weights": mode}
    assert report["sampling"]["status"] == "passed" and "scaled_to_model_size" not in report["sampling"]


def test_validate_scales_the_recipe_sampling_but_not_flags(run_copy, monkeypatch):
    monkeypatch.setattr(parity, "SAMPLING_BUDGET_PARAMETER_STEPS", 1)  # every model is "large"
    monkeypatch.setattr(parity, "SCALED_SAMPLES", 1)  # below the tiny recipe's 2
    result = CliRunner().invoke(main, ["validate", str(run_copy)])
    assert result.exit_code == 0, result.output
    sampling = json.loads((run_copy / "report.json").read_text())["validate"]["sampling"]
    assert sampling["num_samples"] == 1 and "scaled_to_model_size" in sampling
    result = CliRunner().invoke(main, ["validate", str(run_copy), "--samples", "3"])
    assert result.exit_code == 0, result.output
    sampling = json.loads((run_copy / "report.json").read_text())["validate"]["sampling"]
    assert sampling["num_samples"] == 3 and "scaled_to_model_size" not in sampling
