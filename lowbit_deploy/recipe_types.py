"""The value types of a recipe's train section: its enums and constrained numbers. The schema (recipes.py) uses
and re-exports every name, so callers keep importing them from ``lowbit_deploy.recipes``."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class TimestepSampling(str, Enum):
    UNIFORM = "uniform"
    BETA = "beta"
    # uniform over the deployed schedule's timesteps (`schedule`): the only ones a model is run at after deployment
    # (with cached time features, the only ones it can run at)
    SCHEDULE = "schedule"


class LrSchedule(str, Enum):
    CONSTANT = "constant"
    COSINE = "cosine"  # lr * (1 + cos(pi * k / steps)) / 2 at step k of the stage: decays to ~0 by its end
    LINEAR = "linear"  # lr * (1 - k / steps): EfficientDM's linear decay without warm-up


class DataSource(str, Enum):
    AUTO = "auto"
    DIGITS = "digits"
    GAUSSIAN = "gaussian"


class StageKind(str, Enum):
    """BitsFusion's training stages; lowbit_deploy/qat/objectives.py holds the loss of each."""

    DISTILL = "distill"  # Stage I: match the float teacher's noise prediction (and its block outputs)
    NOISE = "noise"      # Stage II: predict the true noise added to real data
    # EfficientDM: data-free distillation along the float teacher's own sampling trajectories (CFG-combined outputs)
    TRAJECTORY = "trajectory"


LossKind = Literal["mse", "l1"]
_Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_BetaParameter = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Probability = Annotated[float, Field(ge=0, le=1)]
