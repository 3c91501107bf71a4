"""The stage chain over one run directory: `run --resume` after an interruption, and reproducible artifacts."""

import copy
import json

import pytest
import yaml
from click.testing import CliRunner
from tinymodels import TINY_RECIPE, make_tiny_unet

from lowbit_deploy.cli import main
from lowbit_deploy.export.onnx_export import export_run
from lowbit_deploy.qat.checkpoint import CHECKPOINT_DIRNAME, TRAIN_STATE_FILE, WEIGHTS_FILE, load_checkpoint
from lowbit_deploy.qat.trainer import train
from lowbit_deploy.recipes import parse_recipe

# Everything that must be byte-identical for the same inputs and seed (README: "Reproducible artifacts").
REPRODUCIBLE = (f"{CHECKPOINT_DIRNAME}/{WEIGHTS_FILE}", f"{CHECKPOINT_DIRNAME}/{TRAIN_STATE_FILE}", "model.onnx",
                "model_fp16.onnx", "plan.png")


@pytest.fixture
def model_and_recipe(tmp_path):
    make_tiny_unet().save_pretrained(tmp_path / "model" / "unet")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    return tmp_path / "model", recipe


def test_run_resume_continues_an_interrupted_chain_and_then_has_nothing_to_do(tmp_path, model_and_recipe):
    model, recipe = model_and_recipe
    run = tmp_path / "run"
    # A chain stopped during training: one of the recipe's two steps is saved, nothing after it exists.
    train(parse_recipe(TINY_RECIPE), run, model_path=str(model), steps=1, progress=False)
    again = ["run", str(recipe), "--out", str(run), "--model", str(model), "--no-build", "--no-progress"]
    refused = CliRunner().invoke(main, again)
    assert refused.exit_code == 2 and "pass --resume" in refused.output, refused.output
    resumed = CliRunner().invoke(main, [*again, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(run).step == 2
    report = json.loads((run / "report.json").read_text())
    assert {"train", "export", "build", "validate"} <= report.keys() and report["validate"]["passed"]
    # Every stage is complete now: a second --resume rewrites nothing.
    stamps = {name: (run / name).stat().st_mtime_ns for name in ("model.onnx", "report.json",
                                                                   f"{CHECKPOINT_DIRNAME}/{WEIGHTS_FILE}")}
    finished = CliRunner().invoke(main, [*again, "--resume"])
    assert finished.exit_code == 0, finished.output
    assert {name: (run / name).stat().st_mtime_ns for name in stamps} == stamps


def test_run_resume_exports_again_when_the_onnx_is_older_than_the_checkpoint(tmp_path, model_and_recipe):
    from lowbit_deploy.pipeline import completed_stages

    model, _ = model_and_recipe
    run = tmp_path / "run"
    recipe = parse_recipe(TINY_RECIPE)
    train(recipe, run, model_path=str(model), progress=False)
    assert set(completed_stages(run, recipe)) == {"train"}
    export_run(run)
    assert set(completed_stages(run, recipe)) == {"train", "export"}
    weights = run / CHECKPOINT_DIRNAME / WEIGHTS_FILE
    onnx_time = (run / "model.onnx").stat().st_mtime_ns
    import os

    os.utime(weights, ns=(onnx_time + 10**9, onnx_time + 10**9))  # the checkpoint changed after the export
    assert set(completed_stages(run, recipe)) == {"train"}
    # A checkpoint short of the recipe's steps is not a complete train stage.
    assert completed_stages(run, recipe, steps=5) == {}


def test_same_inputs_and_seed_give_byte_identical_artifacts(tmp_path, model_and_recipe):
    model, _ = model_and_recipe
    recipe = copy.deepcopy(TINY_RECIPE)
    for name in ("first", "second"):
        train(parse_recipe(recipe), tmp_path / name, model_path=str(model), progress=False)
        export_run(tmp_path / name)
    for artifact in REPRODUCIBLE:
        first, second = (tmp_path / "first" / artifact).read_bytes(), (tmp_path / "second" / artifact).read_bytes()
        assert first == second, f"{artifact} differs between two runs with the same inputs and seed"
