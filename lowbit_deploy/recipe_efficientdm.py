"""Recipe sections of EfficientDM (docs: shared METHODS.md): activation quantization (``quantize.activations``) and
LoRA QAT (``train.lora``). The schema (recipes.py) uses and re-exports them.

Which layers quantize their input activations, at how many bits and whether per denoising step, is a per-rule choice
(``quantize.layers[].act_bits`` / ``act_per_step``); these sections hold what is shared by all of them.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .recipe_types import _Rate, _Strict


class ActivationSection(_Strict):
    """How quantized activations are gridded and calibrated. Calibration runs the float teacher's sampler (DDIM on
    the recipe's ``schedule``, classifier-free guidance) from seeded noise, feeds every step's input to the
    weight-quantized student and picks, per layer and step, the scale whose quantization error (an Lp norm over the
    collected activations) is smallest among ``candidates`` evenly spaced clipping ranges -- EfficientDM's search."""

    symmetric: bool = Field(True, description="symmetric grid [-2^(b-1), 2^(b-1)-1] with no zero point (TensorRT's "
                                              "Q/DQ is symmetric); false: [0, 2^b-1] with a learned zero point")
    calibration_samples: Annotated[int, Field(ge=1, le=4096)] = Field(
        16, description="sampling trajectories (one prompt each) whose activations calibrate the scales")
    calibration_batch: Annotated[int, Field(ge=1)] = 16
    candidates: Annotated[int, Field(ge=2, le=1000)] = 80
    norm_p: Annotated[float, Field(gt=0, le=10)] = 2.4
    guidance_scale: Annotated[float, Field(ge=1)] = 3.0
    seed: int = 0


# EfficientDM's public code keeps these at 8-bit weights and activations without LoRA (METHODS.md).
LORA_EXCLUDE_DEFAULT = ("conv_in", "conv_out", "time_embedding.*")


class LoraSection(_Strict):
    """QALoRA: a low-rank update ``B A`` on every quantized layer not excluded, merged into the frozen weight before
    fake quantization (so only the merged, quantized weight is deployed). With LoRA only LoRA and quantizer parameters
    train; everything else is frozen.

    Scale-aware optimisation (EfficientDM): a LoRA update smaller than the layer's weight step is lost to rounding,
    so each layer's LoRA learning rate is the stage's ``lr`` times the layer's mean weight scale divided by the mean
    of that over all LoRA layers (the stage ``lr`` stays the average LoRA rate). Weight and activation scales get their
    own rates."""

    rank: Annotated[int, Field(ge=1)] = 32
    exclude: list[str] = Field(default_factory=lambda: list(LORA_EXCLUDE_DEFAULT),
                               description="fnmatch patterns of quantized layers that get no LoRA")
    scale_aware: bool = True
    weight_scale_lr: _Rate = 1e-6
    activation_scale_lr: _Rate = 5e-4
