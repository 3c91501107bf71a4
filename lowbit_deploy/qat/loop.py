"""The training loop: runs the stages in order from the run's current step, one :func:`train_step` at a time,
and tells the callbacks (checkpoints, progress, loss history, ...) what happened.

Each stage starts with a fresh AdamW at its own learning rate. Adam's moments estimate the gradient statistics of
one objective; Stage II's plain noise loss has other gradient magnitudes than Stage I's distillation, so carried
moments would mis-scale its first steps. A fresh optimizer also makes a stage boundary a clean resume point (no
optimizer state to carry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .callbacks import TrainCallback
from .data import make_sampler
from .distributed import Distributed
from .objectives import StageObjective, StepLosses, make_objective
from .optimizer import make_optimizer
from .stages import StagePlan, StageSpec
from .step import train_step


@dataclass
class TrainingRun:
    """What the loop advances and the step function and callbacks read."""

    student: nn.Module
    teacher: nn.Module
    bundle: object                  # models.ModelBundle: conditions (null prompt) and data for the samplers
    noise_scheduler: object         # diffusers DDPMScheduler of the teacher: forward noising, training target
    generator: torch.Generator      # the one seeded source of every random draw (saved for --resume)
    plan: StagePlan
    batch_size: int
    weight_decay: float
    step: int = 0                   # global steps done
    stage: StageSpec | None = None
    optimizer: torch.optim.Optimizer | None = None
    objective: StageObjective | None = None
    schedule_timesteps: tuple[int, ...] = ()  # the deployed schedule's timesteps (schedule sampling, trajectories)
    seed: int = 0                   # the recipe's train.seed (trajectory stages seed each trajectory from it)
    lora: object | None = None      # the recipe's train.lora (EfficientDM's optimiser groups), or None
    distributed: Distributed = field(default_factory=Distributed)  # torchrun's processes (one: no-ops)

    def new_optimizer(self, stage: StageSpec) -> torch.optim.Optimizer:
        return make_optimizer(self.student, stage.lr, self.weight_decay, self.lora)

    def start_stage(self, stage: StageSpec) -> None:
        # A resumed run arrives with the stage in progress and its optimizer already restored.
        if self.stage is not stage or self.optimizer is None:
            self.stage, self.optimizer = stage, self.new_optimizer(stage)

    @property
    def position(self) -> tuple[int, int]:
        return self.plan.position(self.step)


def _emit(callbacks: Sequence[TrainCallback], event: str, *args) -> None:
    for callback in callbacks:
        getattr(callback, event)(*args)


def _averaged(run: TrainingRun, losses: StepLosses) -> StepLosses:
    """The global batch's losses: each rank computed its slice's (the mean of equal slices' means)."""
    if run.distributed.world_size == 1:
        return losses
    total, prediction, feature = run.distributed.average_values([losses.total, losses.prediction, losses.feature])
    return StepLosses(total, prediction, feature)


def run_stages(run: TrainingRun, callbacks: Sequence[TrainCallback] = ()) -> None:
    """Train ``run`` from ``run.step`` to ``run.plan.end_step``; callbacks are called in list order."""
    _emit(callbacks, "on_train_begin", run)
    for stage in run.plan.stages:
        stop = min(stage.end, run.plan.end_step)
        if run.step >= stop:
            continue
        run.start_stage(stage)
        run.objective = make_objective(stage, run)
        sampler = make_sampler(stage.data, run.bundle) if getattr(run.objective, "needs_data", True) else None
        _emit(callbacks, "on_stage_begin", run)
        try:
            while run.step < stop:
                losses = _averaged(run, train_step(run, sampler(run.batch_size, run.generator) if sampler else None))
                run.step += 1
                _emit(callbacks, "on_step_end", run, losses)
        finally:
            run.objective.close()
            run.objective = None
        _emit(callbacks, "on_stage_end", run)
    _emit(callbacks, "on_train_end", run)
