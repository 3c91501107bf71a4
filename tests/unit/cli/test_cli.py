"""The CLI end to end on a tiny local checkpoint (CliRunner): closing lines, exit codes, clean user errors."""

import json
import re

import pytest
import yaml
from click.testing import CliRunner

from lowbit_deploy.cli import main


def _run_chain(root, recipe_data: dict):
    """`lowbit-deploy run` of ``recipe_data`` on a tiny local checkpoint into ``root / "run"`` (no engine build here;
    tests/trt builds engines)."""
    from tinymodels import make_tiny_unet

    make_tiny_unet().save_pretrained(root / "model" / "unet")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data))
    return CliRunner().invoke(main, ["run", str(recipe), "--out", str(root / "run"), "--model", str(root / "model"),
                                     "--no-build", "--no-progress"])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One train -> export -> validate chain."""
    from tinymodels import TINY_RECIPE

    root = tmp_path_factory.mktemp("cli")
    return root, _run_chain(root, TINY_RECIPE)


def test_run_chains_every_stage_and_passes(chain):
    root, result = chain
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("PASSED | Runtime: ")
    run = root / "run"
    for artifact in ("checkpoint/quantized_unet.safetensors", "model.onnx", "model_fp16.onnx", "report.json",
                     "report.md", "samples.png"):
        assert (run / artifact).is_file(), artifact
    report = json.loads((run / "report.json").read_text())
    assert report["validate"]["passed"] is True
    statuses = {item["artifact"]: item["status"] for item in report["validate"]["parity"]}
    assert statuses["onnxruntime"] == "passed"
    assert statuses["tensorrt"].startswith("not run")  # never "passed" when it did not run
    assert report["build"]["status"] == "not run: --no-build"
    assert "PASSED" in (run / "report.md").read_text()


def test_validate_fails_with_exit_1_and_names_the_passing_tolerance(chain):
    root, _ = chain
    result = CliRunner().invoke(main, ["validate", str(root / "run"), "--max-abs", "0", "--min-sqnr-db", "1000",
                                       "--skip-sampling"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("FAILED | Runtime: ")
    # The printed tolerances are the ones that pass: re-running with them must succeed.
    suggested = re.findall(r"passes with (--[a-z-]+) (\S+)\)", result.output)
    assert {flag for flag, _ in suggested} == {"--max-abs", "--min-sqnr-db"}
    rerun = CliRunner().invoke(main, ["validate", str(root / "run"), "--skip-sampling",
                                      *[part for pair in suggested for part in pair]])
    assert rerun.exit_code == 0, rerun.output


def test_invalid_option_values_are_clean_errors(chain):
    root, _ = chain
    result = CliRunner().invoke(main, ["validate", str(root / "run"), "--sampling-steps", "0"])
    assert result.exit_code == 2 and "num_steps" in result.output and "Traceback" not in result.output


def test_export_is_repeatable_on_the_same_run(chain):
    root, _ = chain
    result = CliRunner().invoke(main, ["export", str(root / "run")])
    assert result.exit_code == 0, result.output
    assert "lowbit weight nodes" in result.output


def test_unknown_recipe_key_is_a_clean_error_and_writes_nothing(tmp_path, tiny_recipe_dict):
    tiny_recipe_dict["quantize"]["layers"][0]["bitz"] = 3
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    result = CliRunner().invoke(main, ["train", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "bitz: unknown key" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["export", "build", "validate"])
def test_stage_on_missing_run_dir_is_a_clean_error(tmp_path, command):
    result = CliRunner().invoke(main, [command, str(tmp_path / "nothing-here")])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", [[], ["run"], ["train"], ["export"], ["build"], ["validate"]])
def test_help_texts(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_export_of_a_corrupt_checkpoint_leaves_no_onnx(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "quantized_unet.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "run")])
    assert result.exit_code == 2 and "error:" in result.output
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint"]


def test_pickle_checkpoint_is_refused_by_every_stage(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "quantized_unet.pt").write_bytes(b"\x80\x04.")
    for command in ("export", "validate"):  # build reads model.onnx, which a pickle-only run never has
        result = CliRunner().invoke(main, [command, str(tmp_path / "run")])
        assert result.exit_code == 2 and "safetensors only" in result.output, (command, result.output)


@pytest.fixture(scope="module")
def cached_chain(tmp_path_factory):
    """The BitsFusion path on a tiny checkpoint: cached time layers (step index), staged training, v2 packing."""
    import copy

    from tinymodels import TINY_RECIPE

    root = tmp_path_factory.mktemp("cli-cached")
    data = copy.deepcopy(TINY_RECIPE)
    data["schedule"] = {"num_steps": 3}
    data["quantize"]["layers"][2:4] = [{"pattern": "time_embedding.*", "cache": True},
                                       {"pattern": "*.time_emb_proj", "cache": True}]
    data["train"] = {"batch_size": 2, "checkpoint_every": 1, "data": "gaussian",
                     "stages": [{"kind": "distill", "steps": 2, "feature_weight": 0.01}]}
    data["validate"]["sampling"].pop("num_steps")
    return root, _run_chain(root, data)


def test_cached_chain_deploys_by_step_index(cached_chain):
    import onnx

    root, result = cached_chain
    assert result.exit_code == 0, result.output
    run = root / "run"
    for artifact in ("plan.png", "time_cache.png", "samples.png"):
        assert (run / artifact).is_file(), artifact
    model = onnx.load(str(run / "model.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["sample", "step_index", "encoder_hidden_states"]
    report = json.loads((run / "report.json").read_text())
    from lowbit_deploy.models import load_model
    from lowbit_deploy.validate.sampling import schedule_timesteps

    expected = schedule_timesteps(load_model(root / "model").scheduler_config, 3)
    assert report["train"]["signature"]["step_timesteps"] == expected and len(expected) == 3
    assert report["export"]["op_version"] == 2 and report["export"]["cached_values"] > 0
    assert report["validate"]["sampling"]["num_steps"] == 3
    assert "deployment_rounding" in report["validate"]


def test_sampling_steps_other_than_the_cached_schedule_are_refused(cached_chain):
    root, _ = cached_chain
    result = CliRunner().invoke(main, ["validate", str(root / "run"), "--sampling-steps", "5"])
    assert result.exit_code == 2, result.output
    assert "cached for ddim, 3 steps" in result.output and "--sampling-steps 3" in result.output
    assert "Traceback" not in result.output
