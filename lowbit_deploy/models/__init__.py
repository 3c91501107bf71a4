"""Models: the embedded default (a tiny class-prompted digit UNet), foreign diffusers checkpoints, their conditions.

Importing this package is cheap: torch and diffusers load when a function runs. ``load_digits``,
``DigitClassifier``, ``PromptEncoder`` and ``ConditionSource`` are resolved lazily on first access.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from .classifier import DigitClassifier
    from .conditioning import ConditionSource
    from ..recipes import Recipe

DEFAULT_MODEL_DIR: Path = Path(__file__).parent / "default"

_LAZY = {
    "load_digits": "digits",
    "DigitClassifier": "classifier",
    "PromptEncoder": "conditioning",
    "ConditionSource": "conditioning",
    "PromptConditionSource": "conditioning",
    "RandomConditionSource": "conditioning",
    "TextConditionSource": "text_conditions",
    "default_unet_config": "loading",
}

__all__ = ["DEFAULT_MODEL_DIR", "ModelBundle", "load_model", "load_recipe_model", "sample_shape", *_LAZY]


@dataclass
class ModelBundle:
    unet: "UNet2DConditionModel"      # fp32, eval mode, on CPU
    source: str                       # the resolved folder the UNet was loaded from
    condition: "ConditionSource"
    classifier: "DigitClassifier | None"  # None for foreign checkpoints
    scheduler_config: dict            # diffusers scheduler config: training noise and sampling
    # Where the conditions come from, for the train and validate reports: kind (prompts | text_encoder | random),
    # details, and a "warning" where they are not real (random states, or a prompts file that is not used).
    condition_report: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The condition source also draws the UNet's added conditions (SDXL, class labels); unsupported ones are
        # refused here, as soon as the model is loaded.
        from ..signature import added_conditions_for

        self.condition.use_added_conditions(added_conditions_for(self.unet.config), sample_shape(self.unet))


def sample_shape(unet: "UNet2DConditionModel") -> tuple[int, int, int]:
    """``(channels, height, width)`` of one sample (a latent for SD, an image for the default) the UNet denoises."""
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return unet.config.in_channels, height, width


def load_model(path: str | os.PathLike | None = None, subfolder: str | None = None, *, variant: str | None = None,
               prompts_file: str | os.PathLike | None = None,
               memory_check: Callable[[int], object] | None = None) -> ModelBundle:
    """Load the embedded default (``path=None``) or a local diffusers checkpoint folder (safetensors only).

    With ``subfolder=None`` a ``PATH/unet/config.json`` selects the ``unet`` subfolder. ``variant`` selects weight
    files such as ``diffusion_pytorch_model.fp16.safetensors`` (loaded as float32). ``prompts_file`` (one prompt per
    line) is encoded by the folder's CLIP text encoder where it has one (``text_encoder/`` + ``tokenizer/``);
    without both, conditions are random and ``condition_report`` warns. ``memory_check`` gets the stored parameter
    count before the UNet loads (a stage's memory pre-flight, export/memory.py). Problems with the folder raise
    ``lowbit_deploy.errors.UserError`` naming the problem and the fix.
    """
    from .loading import load_model_from

    return load_model_from(DEFAULT_MODEL_DIR if path is None else path, subfolder, variant,
                           None if prompts_file is None else str(prompts_file), memory_check)


def load_recipe_model(recipe: "Recipe", path: str | os.PathLike | None = None,
                      memory_check: Callable[[int], object] | None = None) -> ModelBundle:
    """``load_model`` as ``recipe`` asks (``model.subfolder``, ``model.variant``, ``conditions.prompts_file``) from
    ``path`` (the run's model; None: the embedded default) -- the one place train, analyze and validate load it."""
    return load_model(path, recipe.model.subfolder, variant=recipe.model.variant,
                      prompts_file=recipe.conditions.prompts_file, memory_check=memory_check)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
