"""The loss of each training stage, in a registry keyed by stage kind.

``distill`` (BitsFusion Stage I): ``loss(eps_student, eps_teacher) + feature_weight * L_feat`` where ``L_feat`` is
    the same loss between the student's and the teacher's outputs of every ``down_blocks[i]`` and ``up_blocks[i]``,
    averaged over the blocks ([inferred]: the paper names the blocks and the weight 0.01, not the norm; averaging
    keeps the weight's meaning independent of the UNet's depth). Teacher and student see the same inputs, dropped
    conditions included. ``feature_weight == 0`` registers no hook at all.
``noise`` (Stage II): ``loss(prediction, target)`` with the true target of the scheduler's parametrisation (the
    added noise for epsilon models, the velocity for v-prediction models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..recipes import StageKind
from ..signature import unet_keywords
from .stages import StageSpec

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"mse": F.mse_loss, "l1": F.l1_loss}


@dataclass
class NoisedBatch:
    """One step's model inputs and what produced them."""

    x0: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    timesteps: torch.Tensor
    conditions: torch.Tensor    # with the dropped rows replaced by the null condition
    dropped: torch.Tensor       # bool [batch]
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # added conditions by name, dropped rows null

    def unet_keywords(self) -> dict:
        """The added conditions as keywords of diffusers' UNet call (none for SD1.x/2.x-style UNets)."""
        return unet_keywords(self.added)


@dataclass
class StepLosses:
    """The terms of one step's loss as floats (``feature`` is None where the stage has no feature term)."""

    total: float
    prediction: float
    feature: float | None = None


@dataclass
class LossTerms:
    total: torch.Tensor
    prediction: torch.Tensor
    feature: torch.Tensor | None = None

    def values(self) -> StepLosses:
        return StepLosses(self.total.item(), self.prediction.item(),
                          None if self.feature is None else self.feature.item())


class StageObjective(Protocol):
    def __call__(self, inputs: NoisedBatch) -> LossTerms: ...

    def close(self) -> None:
        """Release what the objective attached to the models (hooks)."""


class BlockOutputs:
    """Keeps the output of every ``down_blocks[i]`` and ``up_blocks[i]`` of a diffusers UNet during a forward."""

    def __init__(self, unet: nn.Module) -> None:
        blocks = [*unet.down_blocks, *unet.up_blocks]
        self._outputs: list[torch.Tensor | None] = [None] * len(blocks)
        self._handles = [block.register_forward_hook(partial(self._keep, index))
                         for index, block in enumerate(blocks)]

    def _keep(self, index: int, module: nn.Module, args, output) -> None:
        # Down blocks return (hidden_states, skip states); the hidden states are the block's output.
        self._outputs[index] = output[0] if isinstance(output, tuple) else output

    def take(self) -> list[torch.Tensor]:
        outputs, self._outputs = self._outputs, [None] * len(self._outputs)
        if any(output is None for output in outputs):
            raise RuntimeError("a UNet block did not run during the forward pass; feature distillation needs all")
        return outputs  # type: ignore[return-value]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class DistillObjective:
    def __init__(self, stage: StageSpec, student: nn.Module, teacher: nn.Module) -> None:
        self.student, self.teacher = student, teacher
        self.loss_fn = LOSSES[stage.loss]
        self.feature_weight = stage.feature_weight
        self._features = ((BlockOutputs(student), BlockOutputs(teacher)) if stage.feature_weight > 0 else None)

    def __call__(self, inputs: NoisedBatch) -> LossTerms:
        model_inputs, keywords = (inputs.noisy, inputs.timesteps, inputs.conditions), inputs.unet_keywords()
        with torch.no_grad():
            target = self.teacher(*model_inputs, **keywords).sample
        prediction = self.loss_fn(self.student(*model_inputs, **keywords).sample, target)
        if self._features is None:
            return LossTerms(prediction, prediction)
        student_blocks, teacher_blocks = (outputs.take() for outputs in self._features)
        feature = feature_loss(student_blocks, teacher_blocks, self.loss_fn)
        return LossTerms(prediction + self.feature_weight * feature, prediction, feature)

    def close(self) -> None:
        for outputs in self._features or ():
            outputs.remove()


def feature_loss(student_blocks: list[torch.Tensor], teacher_blocks: list[torch.Tensor],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    terms = [loss_fn(student, teacher.detach()) for student, teacher in zip(student_blocks, teacher_blocks)]
    return torch.stack(terms).mean()


class NoiseObjective:
    TARGETS = {
        "epsilon": lambda scheduler, inputs: inputs.noise,
        "v_prediction": lambda scheduler, inputs: scheduler.get_velocity(inputs.x0, inputs.noise, inputs.timesteps),
    }

    def __init__(self, stage: StageSpec, student: nn.Module, noise_scheduler) -> None:
        prediction_type = noise_scheduler.config.prediction_type
        if prediction_type not in self.TARGETS:
            raise UserError(f"a `noise` stage trains towards the scheduler's target, and prediction_type "
                            f"{prediction_type!r} is not supported ({', '.join(self.TARGETS)} are); use a "
                            f"`distill` stage for this model")
        self.student, self.scheduler = student, noise_scheduler
        self.target = self.TARGETS[prediction_type]
        self.loss_fn = LOSSES[stage.loss]

    def __call__(self, inputs: NoisedBatch) -> LossTerms:
        prediction = self.student(inputs.noisy, inputs.timesteps, inputs.conditions, **inputs.unet_keywords()).sample
        loss = self.loss_fn(prediction, self.target(self.scheduler, inputs))
        return LossTerms(loss, loss)

    def close(self) -> None:
        pass


def _trajectory_objective(stage: StageSpec, run) -> StageObjective:
    from .trajectory import TrajectoryObjective  # imports this module

    return TrajectoryObjective(stage, run)


# Registry: stage kind -> objective factory (stage, training run). A new stage kind adds an entry here and a
# StageKind member in recipe_types.py. An objective with ``needs_data = False`` draws its own inputs (``inputs``).
STAGE_OBJECTIVES: dict[StageKind, Callable[..., StageObjective]] = {
    StageKind.DISTILL: lambda stage, run: DistillObjective(stage, run.student, run.teacher),
    StageKind.NOISE: lambda stage, run: NoiseObjective(stage, run.student, run.noise_scheduler),
    StageKind.TRAJECTORY: _trajectory_objective,
}


def make_objective(stage: StageSpec, run) -> StageObjective:
    return STAGE_OBJECTIVES[stage.kind](stage, run)
