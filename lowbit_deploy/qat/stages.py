"""The stages a training run goes through, resolved from the recipe: every setting explicit, every stage placed.

BitsFusion trains in two stages: Stage I (``distill``) regresses the student onto the float teacher's noise
prediction and block outputs; Stage II (``noise``) fine-tunes on the plain diffusion loss against the true noise.
A recipe without ``train.stages`` is one ``distill`` stage built from the single-stage keys (``train.steps``,
``train.loss``) with no feature term -- exactly what training was before stages existed.

Steps are counted globally across stages (checkpoints, ``--steps`` and ``--resume`` use that count); a stage
covers the global steps ``[start, start + steps)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import UserError
from ..recipes import (
    FEATURE_WEIGHT,
    SINGLE_STAGE_LOSS,
    SINGLE_STAGE_STEPS,
    STAGE_LOSS,
    TRAJECTORY_GUIDANCE,
    DataSource,
    LrSchedule,
    StageKind,
    TimestepSampling,
    TrainSection,
)


@dataclass(frozen=True)
class StageSpec:
    """One stage with every setting resolved (recipe value, else the train section's, else the kind's default)."""

    index: int          # 0-based position in the run
    kind: StageKind
    start: int          # global step at which the stage begins
    steps: int
    lr: float
    lr_schedule: LrSchedule
    loss: str           # "mse" | "l1"
    feature_weight: float
    timestep_sampling: TimestepSampling
    beta_alpha: float
    beta_beta: float
    condition_drop_prob: float
    data: DataSource
    guidance_scale: float = TRAJECTORY_GUIDANCE  # trajectory stages: the teacher sampler's guidance

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def label(self) -> str:
        return f"{self.index + 1}-{self.kind.value}"

    def lr_at(self, step: int) -> float:
        """The learning rate of global ``step`` (inside this stage): a function of the step alone, so a resumed
        run needs no scheduler state."""
        return self.lr * self.lr_factor(step)

    def lr_factor(self, step: int) -> float:
        """The schedule's multiplier at global ``step``: every parameter group's rate is its base rate times this."""
        progress = (step - self.start) / self.steps
        if self.lr_schedule is LrSchedule.COSINE:
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.lr_schedule is LrSchedule.LINEAR:
            return 1.0 - progress
        return 1.0


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[StageSpec, ...]
    end_step: int       # where this invocation stops: the stages' total, or less under a --steps cap

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end if self.stages else 0

    def position(self, step: int) -> tuple[int, int]:
        """(stage index, steps done within it) after ``step`` global steps; a stage boundary belongs to the next
        stage (step 0 of it), and the end of the run is ``(len(stages), 0)``."""
        for stage in self.stages:
            if step < stage.end:
                return stage.index, max(step - stage.start, 0)
        return len(self.stages), 0


def resolve_stages(section: TrainSection, steps_override: int | None = None) -> StagePlan:
    """The stages of ``section``. ``steps_override`` (``--steps``) replaces ``train.steps`` of a single-stage
    recipe and caps the total of a staged one (training stops there; ``--resume`` without it continues)."""
    shared = dict(timestep_sampling=section.timestep_sampling, beta_alpha=section.beta_alpha,
                  beta_beta=section.beta_beta, condition_drop_prob=section.condition_drop_prob, data=section.data)
    if section.stages is None:
        steps = steps_override if steps_override is not None else (
            section.steps if section.steps is not None else SINGLE_STAGE_STEPS)
        only = StageSpec(0, StageKind.DISTILL, 0, steps, section.lr, section.lr_schedule,
                         section.loss or SINGLE_STAGE_LOSS, 0.0, **shared)
        return StagePlan((only,), steps)
    stages, start = [], 0
    for index, stage in enumerate(section.stages):
        chosen = {key: value for key, value in stage.model_dump(exclude={"kind", "steps"}).items()
                  if value is not None}
        weight = FEATURE_WEIGHT if stage.kind is StageKind.DISTILL else 0.0
        defaults = StageSpec(index, stage.kind, start, stage.steps, section.lr, section.lr_schedule,
                             STAGE_LOSS[stage.kind], weight, **shared)
        stages.append(replace(defaults, **chosen))
        start += stage.steps
    end = start if steps_override is None else min(steps_override, start)
    return StagePlan(tuple(stages), end)


def check_stage_data(plan: StagePlan, resolve_source) -> None:
    """A ``noise`` stage regresses onto the noise added to real samples; on data-free gaussian samples it would
    teach the model to denoise white noise and undo the distillation."""
    for stage in plan.stages:
        if stage.kind is StageKind.NOISE and resolve_source(stage.data) is DataSource.GAUSSIAN:
            raise UserError(f"train stage {stage.label} needs real data, but its data source is data-free gaussian "
                            f"samples (`data: {stage.data.value}` with this model). Use `data: digits` with the "
                            f"embedded default model, or drop the `noise` stage for data-free checkpoints")
