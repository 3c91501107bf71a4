import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit_deploy.errors import UserError
from lowbit_deploy.qat.checkpoint import CHECKPOINT_DIRNAME, WEIGHTS_FILE, load_checkpoint
from lowbit_deploy.qat.trainer import train
from lowbit_deploy.quant.apply import quantized_layers
from lowbit_deploy.recipes import parse_recipe


def _train(recipe_dict, model_dir, run_dir, **kwargs):
    return train(parse_recipe(recipe_dict), run_dir, model_path=str(model_dir), progress=False, **kwargs)


def test_training_writes_a_loadable_checkpoint(tmp_path, tiny_model_dir, tiny_recipe_dict):
    result = _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "run")
    assert result.steps == 2 and result.first_loss is not None
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.step == 2 and checkpoint.model_source == str(tiny_model_dir.resolve())
    assert quantized_layers(checkpoint.unet)
    assert sorted(p.name for p in (tmp_path / "run" / CHECKPOINT_DIRNAME).iterdir()) == [
        "quantized_unet.safetensors", "train_state.safetensors", "train_times.json"]


def test_resume_continues_bit_identically(tmp_path, tiny_model_dir, tiny_recipe_dict):
    tiny_recipe_dict["train"]["steps"] = 4
    _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "straight")
    _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "resumed", steps=2)
    _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "resumed", resume=True)
    straight = load_checkpoint(tmp_path / "straight").unet.state_dict()
    resumed = load_checkpoint(tmp_path / "resumed")
    assert resumed.step == 4
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed.unet.state_dict()[name]), name


def test_existing_checkpoint_needs_resume(tmp_path, tiny_model_dir, tiny_recipe_dict):
    _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "run")
    with pytest.raises(UserError, match="--resume"):
        _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "run")


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir, tiny_recipe_dict):
    with pytest.raises(UserError, match="no quantized checkpoint"):
        _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "run", resume=True)


def test_bad_model_path_leaves_nothing_behind(tmp_path, tiny_recipe_dict):
    with pytest.raises(UserError, match="does not exist"):
        _train(tiny_recipe_dict, tmp_path / "missing-model", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_corrupt_and_pickle_checkpoints_are_refused(tmp_path):
    run = tmp_path / "run" / CHECKPOINT_DIRNAME
    run.mkdir(parents=True)
    (run / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "run")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "model.pt").write_bytes(b"\x80\x04.")
    with pytest.raises(UserError, match="safetensors only"):
        load_checkpoint(pickled)
    with pytest.raises(UserError, match="safetensors only"):
        load_checkpoint(pickled / "model.pt")


def test_foreign_safetensors_file_is_not_taken_for_a_checkpoint(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(UserError, match="not a lowbit-deploy quantized checkpoint"):
        load_checkpoint(tmp_path)


def test_recipe_matching_no_layer_writes_nothing(tmp_path, tiny_model_dir, tiny_recipe_dict):
    tiny_recipe_dict["quantize"]["layers"] = [{"pattern": "nothing.matches.*", "bits": 2}]
    with pytest.raises(UserError, match="matched no quantizable layer"):
        _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_checkpoint_and_optimizer_state_from_different_steps(tmp_path, tiny_model_dir,
                                                                               tiny_recipe_dict):
    from lowbit_deploy.qat.checkpoint import TRAIN_STATE_FILE

    tiny_recipe_dict["train"].update(steps=3, checkpoint_every=1)
    _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "a", steps=1)
    _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "b", steps=2)
    # Simulate a run killed between the two writes: weights at step 2, optimizer state still at step 1.
    (tmp_path / "b" / CHECKPOINT_DIRNAME / TRAIN_STATE_FILE).write_bytes(
        (tmp_path / "a" / CHECKPOINT_DIRNAME / TRAIN_STATE_FILE).read_bytes())
    with pytest.raises(UserError, match="checkpoint is at step 2 but the optimizer state at step 1"):
        _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "b", resume=True)


def test_resume_uses_the_recorded_teacher_and_refuses_another_recipe(tmp_path, tiny_model_dir, tiny_recipe_dict):
    tiny_recipe_dict["train"]["steps"] = 3
    _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "run", steps=1)
    # No --model on resume: the teacher recorded in the checkpoint (an absolute path) is used, not the default.
    train(parse_recipe(tiny_recipe_dict), tmp_path / "run", resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run").model_source == str(tiny_model_dir.resolve())
    tiny_recipe_dict["quantize"]["layers"][-1]["bits"] = 3
    with pytest.raises(UserError, match="differ"):
        _train(tiny_recipe_dict, tiny_model_dir, tmp_path / "run", resume=True)


def _all_tensors(run_dir):
    """Every tensor a run leaves behind: the student's weights and scales, optimizer moments, generator state."""
    from lowbit_deploy.qat.checkpoint import TRAIN_STATE_FILE

    folder = run_dir / CHECKPOINT_DIRNAME
    weights = {f"weights/{k}": v for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    return {**weights, **{f"train_state/{k}": v for k, v in load_file(str(folder / TRAIN_STATE_FILE)).items()}}


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_two_stage_resume_is_bit_identical_within_and_across_stages(tmp_path, tiny_digits_model_dir,
                                                                     two_stage_recipe_dict, lr_schedule):
    # The cosine rate is a function of the global step, so a resumed run needs no scheduler state. (--steps caps a
    # staged run; on a single-stage recipe it sets the stage's length, and with it the cosine's period.)
    two_stage_recipe_dict["train"].update(checkpoint_every=100, lr_schedule=lr_schedule)
    _train(two_stage_recipe_dict, tiny_digits_model_dir, tmp_path / "straight")
    straight = _all_tensors(tmp_path / "straight")
    assert any(name.startswith("train_state/optimizer.") for name in straight)
    # Interrupted in stage I, exactly at the stage boundary, and in stage II (stages of 2 + 2 steps).
    for interrupted_at in (1, 2, 3):
        run = tmp_path / f"interrupted-{interrupted_at}"
        _train(two_stage_recipe_dict, tiny_digits_model_dir, run, steps=interrupted_at)
        assert load_checkpoint(run).step == interrupted_at
        result = _train(two_stage_recipe_dict, tiny_digits_model_dir, run, resume=True)
        assert result.steps == 4 and len(result.losses) == 4 - interrupted_at
        resumed = _all_tensors(run)
        assert resumed.keys() == straight.keys()
        for name, tensor in straight.items():
            assert torch.equal(tensor, resumed[name]), f"{name} differs after resuming at step {interrupted_at}"


def test_the_report_lists_every_stage_also_after_a_resume(tmp_path, tiny_digits_model_dir, two_stage_recipe_dict):
    run = tmp_path / "run"
    _train(two_stage_recipe_dict, tiny_digits_model_dir, run, steps=3)
    result = _train(two_stage_recipe_dict, tiny_digits_model_dir, run, resume=True)
    report = json.loads((run / "report.json").read_text())["train"]
    assert report["stages"] == result.stages
    distill, noise = report["stages"]
    assert (distill["stage"], distill["steps"], distill["steps_done"], distill["loss"]) == ("1-distill", 2, 2, "l1")
    assert (noise["stage"], noise["steps"], noise["steps_done"], noise["lr"]) == ("2-noise", 2, 2, 5e-5)
    for stage in (distill, noise):
        assert stage["seconds"] > 0 and stage["first_loss"] > 0 and stage["last_loss"] > 0
    # Stage I's total is the prediction term plus 0.5 x the feature term; Stage II has no feature term.
    assert distill["first_feature_loss"] > 0
    expected = distill["first_prediction_loss"] + 0.5 * distill["first_feature_loss"]
    assert distill["first_loss"] == pytest.approx(expected, rel=1e-5)
    assert "first_feature_loss" not in noise and noise["last_loss"] == noise["last_prediction_loss"]
    # The resumed invocation ran stage II's last step only; the stage summary still starts at its first step.
    assert result.first_loss == noise["last_loss"] != noise["first_loss"]


def test_a_noise_stage_on_data_free_samples_is_refused_before_writing(tmp_path, tiny_model_dir,
                                                                      two_stage_recipe_dict):
    with pytest.raises(UserError, match="needs real data"):
        _train(two_stage_recipe_dict, tiny_model_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()
