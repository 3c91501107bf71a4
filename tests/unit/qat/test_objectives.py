import copy
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from lowbit_deploy.qat.data import Batch
from lowbit_deploy.qat.objectives import DistillObjective, NoiseObjective, make_objective
from lowbit_deploy.qat.stages import StageSpec
from lowbit_deploy.qat.step import noised_batch
from lowbit_deploy.recipes import DataSource, LrSchedule, StageKind, TimestepSampling


def _stage(kind=StageKind.DISTILL, loss="l1", feature_weight=0.0, drop=0.0):
    return StageSpec(0, kind, 0, 1, 1e-4, LrSchedule.CONSTANT, loss, feature_weight, TimestepSampling.BETA, 3.0, 1.0,
                     drop, DataSource.AUTO)


def _inputs(unet, batch=2, seed=0, scheduler=None):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 1, 8, 8, generator=generator)
    conditions = torch.randn(batch, 4, unet.config.cross_attention_dim, generator=generator)
    null = SimpleNamespace(null=lambda size: torch.zeros(size, 4, unet.config.cross_attention_dim))
    return noised_batch(Batch(x0, conditions), _stage(), null, scheduler or DDPMScheduler(), generator)


def _block_hooks(unet):
    return sum(len(block._forward_hooks) for block in [*unet.down_blocks, *unet.up_blocks])


def test_feature_term_is_zero_for_an_identical_student_and_positive_after_a_perturbation(tiny_unet):
    teacher = tiny_unet.requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    objective = DistillObjective(_stage(feature_weight=0.5), student, teacher)
    inputs = _inputs(teacher)
    terms = objective(inputs)
    assert terms.feature is not None and terms.feature.item() == 0.0 and terms.prediction.item() == 0.0
    with torch.no_grad():
        student.down_blocks[0].resnets[0].conv1.weight.add_(0.05)
    terms = objective(inputs)
    assert terms.feature.item() > 0 and terms.prediction.item() > 0
    assert terms.total.item() == pytest.approx(terms.prediction.item() + 0.5 * terms.feature.item(), rel=1e-6)
    terms.total.backward()  # the feature term reaches the student's weights
    assert student.down_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0
    objective.close()
    assert _block_hooks(student) == _block_hooks(teacher) == 0


def test_zero_feature_weight_registers_no_hook(tiny_unet):
    student = copy.deepcopy(tiny_unet)
    run = SimpleNamespace(student=student, teacher=tiny_unet, noise_scheduler=DDPMScheduler())
    objective = make_objective(_stage(feature_weight=0.0), run)
    assert _block_hooks(student) == _block_hooks(tiny_unet) == 0
    terms = objective(_inputs(tiny_unet))
    assert terms.feature is None and terms.total is terms.prediction


def test_features_are_taken_from_every_down_and_up_block(tiny_unet):
    objective = DistillObjective(_stage(feature_weight=1.0), copy.deepcopy(tiny_unet), tiny_unet)
    assert _block_hooks(tiny_unet) == len(tiny_unet.down_blocks) + len(tiny_unet.up_blocks)
    objective.close()


class _Predicts(nn.Module):
    """A stub UNet whose prediction is whatever ``output`` returns."""

    def __init__(self, output):
        super().__init__()
        self.output = output
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, noisy, timesteps, conditions):
        return SimpleNamespace(sample=self.output() + 0 * self.unused)


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_noise_stage_targets_the_true_noise(tiny_unet, loss):
    inputs = _inputs(tiny_unet, batch=4)
    exact = NoiseObjective(_stage(StageKind.NOISE, loss), _Predicts(lambda: inputs.noise), DDPMScheduler())
    assert exact(inputs).total.item() == 0.0
    # Predicting the clean sample instead is wrong: the target is the noise, not x0.
    wrong = NoiseObjective(_stage(StageKind.NOISE, loss), _Predicts(lambda: inputs.x0), DDPMScheduler())
    assert wrong(inputs).total.item() > 0.1


def test_noise_stage_targets_the_velocity_of_v_prediction_models(tiny_unet):
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    inputs = _inputs(tiny_unet, scheduler=scheduler)
    velocity = scheduler.get_velocity(inputs.x0, inputs.noise, inputs.timesteps)
    objective = NoiseObjective(_stage(StageKind.NOISE), _Predicts(lambda: velocity), scheduler)
    assert objective(inputs).total.item() == 0.0


def test_noise_stage_refuses_an_unknown_parametrisation():
    from lowbit_deploy.errors import UserError

    with pytest.raises(UserError, match="prediction_type 'sample' is not supported"):
        NoiseObjective(_stage(StageKind.NOISE), _Predicts(lambda: None), DDPMScheduler(prediction_type="sample"))
