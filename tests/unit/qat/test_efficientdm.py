"""EfficientDM training on a tiny data-free checkpoint: calibration on teacher trajectories, the trajectory stage
(loss goes down, resume is bit-identical mid-trajectory), LoRA and the report."""

import json

import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.qat.checkpoint import load_checkpoint
from lowbit_deploy.qat.trainer import train
from lowbit_deploy.qat.trajectory import guided_output, teacher_trajectory
from lowbit_deploy.quant.activation import activation_quantizers
from lowbit_deploy.recipes import parse_recipe
from lowbit_deploy.validate.sampling import make_scheduler


def _train(recipe_dict, model_dir, run_dir, **kwargs):
    return train(parse_recipe(recipe_dict), run_dir, model_path=str(model_dir), progress=False, **kwargs)


def _all_tensors(run_dir):
    from safetensors.torch import load_file

    folder = run_dir / "checkpoint"
    return {**load_file(folder / "quantized_unet.safetensors"),
            **{f"train_state/{k}": v for k, v in load_file(folder / "train_state.safetensors").items()}}


def _held_out_loss(run_dir, model_dir, seed=999):
    """Mean loss of the student along a teacher trajectory no training step used."""
    from lowbit_deploy.models import load_model

    checkpoint = load_checkpoint(run_dir)
    bundle = load_model(str(model_dir))
    steps = checkpoint.signature.num_steps
    recorded = teacher_trajectory(bundle.unet, bundle, bundle.scheduler_config, steps, 4, 3.0, seed)
    scheduler = make_scheduler(bundle.scheduler_config, steps)
    with torch.no_grad():
        losses = [torch.nn.functional.mse_loss(
            guided_output(checkpoint.unet, recorded.latents[i], recorded.timesteps[i], recorded.conditions,
                          recorded.null, 3.0, scheduler), recorded.outputs[i]) for i in range(steps)]
    return float(torch.stack(losses).mean())


def test_calibration_sets_a_scale_per_step_and_the_report_says_so(tmp_path, tiny_model_dir,
                                                                  tiny_efficientdm_recipe_dict):
    _train(tiny_efficientdm_recipe_dict, tiny_model_dir, tmp_path / "run", steps=0)
    quantizers = activation_quantizers(load_checkpoint(tmp_path / "run").unet)
    per_step = {name: q for name, q in quantizers.items() if q.per_step}
    assert per_step and len(per_step) < len(quantizers)  # conv_in/conv_out/time_embedding keep one scale
    assert all(q.steps == 4 for q in per_step.values())
    # Calibrated, not left at the placeholder 1.0, and different across steps (activations change along sampling).
    assert all(not torch.equal(q.scale.detach(), torch.ones(q.steps)) for q in quantizers.values())
    assert sum(len(set(q.scale.detach().tolist())) > 1 for q in per_step.values()) > len(per_step) // 2
    report = json.loads((tmp_path / "run" / "report.json").read_text())["train"]
    assert set(report["activation_calibration"]) == set(quantizers)
    assert 0 < report["trainable_fraction"] < 1
    assert report["trainable_parameters"] == sum(
        p.numel() for name, p in load_checkpoint(tmp_path / "run").unet.named_parameters()
        if ".lora." in name or "quantizer." in name)


def test_asymmetric_calibration_learns_zero_points(tmp_path, tiny_model_dir, tiny_efficientdm_recipe_dict):
    tiny_efficientdm_recipe_dict["quantize"]["activations"]["symmetric"] = False
    _train(tiny_efficientdm_recipe_dict, tiny_model_dir, tmp_path / "run", steps=0)
    quantizers = activation_quantizers(load_checkpoint(tmp_path / "run").unet)
    zero_points = torch.cat([q.deployed_zero_point() for q in quantizers.values()])
    assert zero_points.min() >= 0 and zero_points.max() <= 255 and zero_points.unique().numel() > 1


def test_trajectory_distillation_lowers_the_loss_on_a_held_out_trajectory(tmp_path, tiny_model_dir,
                                                                          tiny_efficientdm_recipe_dict):
    tiny_efficientdm_recipe_dict["train"]["stages"][0]["steps"] = 24
    _train(tiny_efficientdm_recipe_dict, tiny_model_dir, tmp_path / "start", steps=0)
    result = _train(tiny_efficientdm_recipe_dict, tiny_model_dir, tmp_path / "trained")
    assert result.steps == 24
    before, after = (_held_out_loss(tmp_path / name, tiny_model_dir) for name in ("start", "trained"))
    assert after < 0.9 * before, (before, after)
    # Only LoRA and quantizer parameters moved: the latent weights are the teacher's.
    start, trained = (load_checkpoint(tmp_path / name).unet.state_dict() for name in ("start", "trained"))
    moved = {name for name in start if not torch.equal(start[name], trained[name])}
    assert moved and all(".lora." in name or "quantizer." in name for name in moved), sorted(moved)[:5]


def test_resume_in_the_middle_of_a_trajectory_is_bit_identical(tmp_path, tiny_model_dir,
                                                               tiny_efficientdm_recipe_dict):
    _train(tiny_efficientdm_recipe_dict, tiny_model_dir, tmp_path / "straight")
    straight = _all_tensors(tmp_path / "straight")
    for interrupted_at in (3, 4):  # inside trajectory 0, and at the start of trajectory 1
        run = tmp_path / f"interrupted-{interrupted_at}"
        _train(tiny_efficientdm_recipe_dict, tiny_model_dir, run, steps=interrupted_at)
        _train(tiny_efficientdm_recipe_dict, tiny_model_dir, run, resume=True)
        resumed = _all_tensors(run)
        assert resumed.keys() == straight.keys()
        for name, tensor in straight.items():
            assert torch.equal(tensor, resumed[name]), f"{name} differs after resuming at step {interrupted_at}"


def test_lora_rank_beyond_a_layer_is_refused_before_training(tmp_path, tiny_model_dir,
                                                             tiny_efficientdm_recipe_dict):
    tiny_efficientdm_recipe_dict["train"]["lora"]["rank"] = 64
    with pytest.raises(UserError, match=r"train.lora.rank 64 is larger than layer .* allows"):
        _train(tiny_efficientdm_recipe_dict, tiny_model_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, error", [
    ({"act_bits": 9}, r"act_bits: Input should be less than or equal to 8"),
    ({"act_bits": 1}, r"act_bits: Input should be greater than or equal to 2"),
    ({"keep_float": True, "bits": None}, r"`act_bits` quantizes the input of a quantized layer"),
])
def test_activation_settings_out_of_range_are_recipe_errors(tiny_efficientdm_recipe_dict, change, error):
    rule = tiny_efficientdm_recipe_dict["quantize"]["layers"][-1]
    rule.update(change)
    rule.pop("bits") if rule.get("bits", 0) is None else None
    with pytest.raises(UserError, match=error):
        parse_recipe(tiny_efficientdm_recipe_dict)


def test_per_step_scales_fix_the_sampling_steps(tiny_efficientdm_recipe_dict):
    tiny_efficientdm_recipe_dict["validate"]["sampling"]["num_steps"] = 2
    with pytest.raises(UserError, match=r"activation scales are per step for schedule.num_steps=4"):
        parse_recipe(tiny_efficientdm_recipe_dict)
