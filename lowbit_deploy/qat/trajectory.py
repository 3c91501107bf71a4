"""EfficientDM's data-free distillation along the float teacher's sampling trajectories (stage kind ``trajectory``).

The teacher samples with the deployed schedule (DDIM, eta 0, the recipe's ``schedule``) and classifier-free guidance
from seeded noise ``x_T ~ N(0, I)`` and seeded prompts; no data is read, so any checkpoint can be distilled. Each
optimisation step is one denoising step: teacher and student see the same ``x_t`` (conditional and unconditional
halves as one batch, as deployed), the loss compares their CFG-combined outputs, and the trajectory advances with
the teacher's output. Stage step ``k`` is step ``k mod T`` of trajectory ``k div T``.

Reproducibility: trajectory ``j`` is drawn from its own seed (the run seed, the stage and ``j``), not from the run's
generator, so a run resumed in the middle of a trajectory recomputes the teacher's trajectory (no gradients, T
teacher calls) and continues bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..models.conditioning import Conditions
from ..signature import signature_for
from ..validate.sampling import make_scheduler, sample, unet_runner
from .objectives import LOSSES, LossTerms

if TYPE_CHECKING:
    from .loop import TrainingRun
    from .stages import StageSpec


def trajectory_seed(run_seed: int, stage_index: int, trajectory: int) -> int:
    return (run_seed * 1_000_003 + stage_index * 10_007 + trajectory) % (2**63)


@dataclass
class TeacherTrajectory:
    latents: list[torch.Tensor]   # x_t the step starts from, per step
    outputs: list[torch.Tensor]   # the teacher's CFG-combined output, per step
    timesteps: list[int]
    conditions: Conditions
    null: Conditions


@torch.no_grad()
def teacher_trajectory(teacher: torch.nn.Module, bundle, scheduler_config: dict, num_steps: int, batch: int,
                       guidance_scale: float, seed: int) -> TeacherTrajectory:
    """The teacher's sampling trajectory for ``batch`` seeded prompts: every step's input latents and output."""
    generator = torch.Generator().manual_seed(seed)
    conditions = bundle.condition.sample_conditions(batch, generator)
    null = bundle.condition.null_conditions(batch)
    signature = signature_for(teacher, conditions.encoder_hidden_states.shape[1])
    recorded = TeacherTrajectory([], [], [], conditions, null)

    def record(step_index: int, timestep: int, latents: torch.Tensor, output: torch.Tensor) -> None:
        recorded.latents.append(latents.clone())
        recorded.outputs.append(output.clone())
        recorded.timesteps.append(timestep)

    sample(unet_runner(teacher), signature, conditions, null, scheduler_config=scheduler_config, num_steps=num_steps,
           guidance_scale=guidance_scale, seed=seed, observer=record)
    return recorded


def guided_output(model: torch.nn.Module, latents: torch.Tensor, timestep: int, conditions: Conditions,
                  null: Conditions, guidance_scale: float, scheduler) -> torch.Tensor:
    """``model``'s CFG-combined output at ``latents`` (conditional and unconditional halves in one batch)."""
    use_cfg = guidance_scale != 1.0
    model_input = torch.cat([latents, latents]) if use_cfg else latents
    model_input = scheduler.scale_model_input(model_input, timestep)
    states = conditions.cat(null) if use_cfg else conditions
    # float32 timesteps, as the sampler feeds a timestep-input model (validate/sampling.py)
    times = torch.full((model_input.shape[0],), float(timestep), dtype=torch.float32)
    output = model(model_input, times, **states.unet_keywords()).sample
    if not use_cfg:
        return output
    output_cond, output_null = output.chunk(2)
    return output_null + guidance_scale * (output_cond - output_null)


@dataclass
class TrajectoryStep:
    step_index: int
    trajectory: TeacherTrajectory


class TrajectoryObjective:
    """Loss of one denoising step: ``loss(student's guided output, teacher's guided output)`` at the teacher's
    ``x_t``. It draws its own inputs (no data sampler)."""

    needs_data = False

    def __init__(self, stage: "StageSpec", run: "TrainingRun") -> None:
        if not run.schedule_timesteps:
            raise ValueError("a trajectory stage needs the deployed schedule's timesteps")
        self.stage, self.student, self.teacher, self.bundle = stage, run.student, run.teacher, run.bundle
        self.num_steps = len(run.schedule_timesteps)
        self.scheduler = make_scheduler(run.bundle.scheduler_config, self.num_steps)
        self.loss_fn = LOSSES[stage.loss]
        self.seed = run.seed
        self._cached: tuple[int, TeacherTrajectory] | None = None

    def inputs(self, run: "TrainingRun", batch) -> TrajectoryStep:
        trajectory, step_index = divmod(run.step - self.stage.start, self.num_steps)
        if self._cached is None or self._cached[0] != trajectory:
            seed = trajectory_seed(self.seed, self.stage.index, trajectory)
            self._cached = (trajectory, teacher_trajectory(self.teacher, self.bundle, self.bundle.scheduler_config,
                                                           self.num_steps, run.batch_size, self.stage.guidance_scale,
                                                           seed))
        return TrajectoryStep(step_index, self._cached[1])

    def __call__(self, inputs: TrajectoryStep) -> LossTerms:
        recorded, index = inputs.trajectory, inputs.step_index
        prediction = guided_output(self.student, recorded.latents[index], recorded.timesteps[index],
                                   recorded.conditions, recorded.null, self.stage.guidance_scale, self.scheduler)
        loss = self.loss_fn(prediction, recorded.outputs[index])
        return LossTerms(loss, loss)

    def close(self) -> None:
        self._cached = None
