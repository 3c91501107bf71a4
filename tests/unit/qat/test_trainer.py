import pytest
import torch
from safetensors.torch import save_file

from lowbit_deploy.errors import UserError
from lowbit_deploy.qat.checkpoint import CHECKPOINT_DIRNAME, WEIGHTS_FILE, load_checkpoint
from lowbit_deploy.qat.trainer import sample_timesteps, train
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
        "quantized_unet.safetensors", "train_state.safetensors"]


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


@pytest.mark.parametrize("sampling", ["uniform", "beta"])
def test_timestep_sampling_is_seeded_and_in_range(tiny_recipe_dict, sampling):
    tiny_recipe_dict["train"]["timestep_sampling"] = sampling
    config = parse_recipe(tiny_recipe_dict).train
    draws = [sample_timesteps(config, 4096, 1000, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert draws[0].min() >= 0 and draws[0].max() <= 999
    mean = draws[0].float().mean().item()
    # Beta(3, 1) has mean 3/4: it favours the noisy end, where quantization error grows.
    assert mean == pytest.approx(750 if sampling == "beta" else 500, abs=25)


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
