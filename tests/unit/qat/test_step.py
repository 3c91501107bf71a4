from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from lowbit_deploy.qat.data import Batch
from lowbit_deploy.qat.loop import TrainingRun
from lowbit_deploy.qat.objectives import DistillObjective
from lowbit_deploy.qat.stages import StagePlan, StageSpec
from lowbit_deploy.qat.step import drop_conditions, sample_timesteps, train_step
from lowbit_deploy.recipes import DataSource, LrSchedule, StageKind, TimestepSampling


def _stage(sampling=TimestepSampling.BETA, drop=0.5, alpha=3.0, beta=1.0):
    return StageSpec(0, StageKind.DISTILL, 0, 1, 1e-2, LrSchedule.CONSTANT, "mse", 0.0, sampling, alpha, beta, drop,
                     DataSource.AUTO)


@pytest.mark.parametrize("sampling, expected_mean", [(TimestepSampling.BETA, 750), (TimestepSampling.UNIFORM, 500)])
def test_timestep_sampling_is_seeded_in_range_with_the_right_mean(sampling, expected_mean):
    draws = [sample_timesteps(_stage(sampling), 20000, 1000, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and draws[0].dtype == torch.int64
    assert draws[0].min() >= 0 and draws[0].max() <= 999
    # Beta(3, 1) has mean 3/4 (standard deviation ~0.19, so the mean of 20000 draws is within ~1.3 of 750);
    # flooring to integer steps lowers it by 1/2.
    assert draws[0].float().mean().item() == pytest.approx(expected_mean - 0.5, abs=8)


def test_schedule_sampling_draws_only_and_every_deployed_timestep():
    schedule = (951, 901, 501, 1)
    draws = sample_timesteps(_stage(TimestepSampling.SCHEDULE), 4000, 1000, torch.Generator().manual_seed(0),
                             schedule)
    counts = torch.bincount(draws, minlength=1000)[list(schedule)]
    assert set(draws.tolist()) == set(schedule) and counts.sum() == 4000
    assert counts.min() > 900  # uniform: ~1000 each
    with pytest.raises(ValueError, match="schedule"):
        sample_timesteps(_stage(TimestepSampling.SCHEDULE), 4, 1000, torch.Generator())


def test_beta_parameters_shape_the_draws():
    generator = torch.Generator().manual_seed(0)
    early = sample_timesteps(_stage(alpha=1.0, beta=3.0), 20000, 1000, generator).float().mean().item()
    assert early == pytest.approx(249.5, abs=8)


def test_condition_drop_rate_and_null_rows():
    conditions, null = torch.ones(20000, 2, 3), torch.zeros(20000, 2, 3)
    dropped_conditions, dropped = drop_conditions(conditions, null, 0.1, torch.Generator().manual_seed(0))
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert torch.equal(dropped_conditions[dropped], null[dropped])
    assert torch.equal(dropped_conditions[~dropped], conditions[~dropped])


class _Recorder(nn.Module):
    """A stub UNet that remembers the inputs of every call."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, noisy, timesteps, conditions):
        self.calls.append((noisy.clone(), timesteps.clone(), conditions.clone()))
        return SimpleNamespace(sample=noisy * self.gain)


def test_a_step_drops_the_same_conditions_for_teacher_and_student():
    teacher, student = _Recorder().requires_grad_(False), _Recorder()
    teacher.gain.fill_(2.0)
    stage = _stage(drop=0.5)
    null_row = torch.full((4, 8), -7.0)
    bundle = SimpleNamespace(condition=SimpleNamespace(null=lambda size: null_row.expand(size, 4, 8)))
    run = TrainingRun(student, teacher, bundle, DDPMScheduler(), torch.Generator().manual_seed(0),
                      StagePlan((stage,), 1), batch_size=64, weight_decay=0.0)
    run.start_stage(stage)
    run.objective = DistillObjective(stage, student, teacher)
    conditions = torch.randn(64, 4, 8, generator=torch.Generator().manual_seed(1))
    losses = train_step(run, Batch(torch.randn(64, 1, 8, 8), conditions))

    (teacher_inputs,), (student_inputs,) = teacher.calls, student.calls
    for teacher_input, student_input in zip(teacher_inputs, student_inputs):
        assert torch.equal(teacher_input, student_input)
    seen = student_inputs[2]
    dropped = (seen == null_row).flatten(1).all(dim=1)
    assert 10 < int(dropped.sum()) < 54  # p = 0.5 of 64 rows
    assert torch.equal(seen[~dropped], conditions[~dropped])
    assert losses.total == losses.prediction and losses.feature is None
    assert student.gain.item() != 1.0  # the optimizer stepped


def test_dropped_rows_get_the_null_added_conditions_too_and_teacher_and_student_see_them():
    """An SDXL / class-conditional batch: a dropped row's text_embeds / class label become the null ones with its
    states; the draws of a plain model are unchanged (nothing extra is drawn)."""
    from tinymodels import make_tiny_class_unet

    from lowbit_deploy.models.conditioning import RandomConditionSource
    from lowbit_deploy.qat.step import noised_batch
    from lowbit_deploy.signature import added_conditions_for

    unet = make_tiny_class_unet(num_classes=5)
    source = RandomConditionSource(dim=16, seq_len=4)
    source.use_added_conditions(added_conditions_for(unet.config), (1, 8, 8))
    generator = torch.Generator().manual_seed(0)
    conditions = source.sample_conditions(64, generator)
    batch = Batch(torch.randn(64, 1, 8, 8), conditions.encoder_hidden_states, conditions.added)
    inputs = noised_batch(batch, _stage(drop=0.5), source, DDPMScheduler(), torch.Generator().manual_seed(1))
    labels, dropped = inputs.added["class_labels"], inputs.dropped
    assert 10 < int(dropped.sum()) < 54
    assert (labels[dropped] == 4).all() and torch.equal(labels[~dropped], conditions.added["class_labels"][~dropped])
    assert inputs.unet_keywords() == {"class_labels": labels}
    plain = noised_batch(Batch(batch.x0, batch.encoder_hidden_states), _stage(drop=0.5), source, DDPMScheduler(),
                         torch.Generator().manual_seed(1))
    assert torch.equal(plain.dropped, dropped) and torch.equal(plain.noisy, inputs.noisy) and plain.added == {}
