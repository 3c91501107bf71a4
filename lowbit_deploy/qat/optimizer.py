"""AdamW over the student, with weight decay only where shrinking towards zero is a prior worth having, and (with
EfficientDM's LoRA) one learning rate per layer.

Excluded from decay:
- every quantizer scale (``weight_quantizer.scale``, ``input_quantizer.scale``/``zero_point``): decay would pull the
  quantization step towards 0 whatever the loss says, shrinking the grid until values clip (the step size is a
  calibration, not an over-parameterised weight);
- biases and normalisation gains/shifts (every 1-D parameter): decaying a GroupNorm gain towards 0 scales the
  activations down, and a bias has no redundancy for decay to regularise -- the usual AdamW practice.
Latent weights (quantized or float, >= 2-D) keep the recipe's ``weight_decay``.

Every group carries ``base_lr``; the step function sets ``lr = base_lr * stage.lr_factor(step)``, so the stage's
schedule scales every group alike.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZER_SCALE_SUFFIX = "weight_quantizer.scale"
ACTIVATION_QUANTIZER = "input_quantizer."


def decays(name: str, parameter: nn.Parameter) -> bool:
    return parameter.ndim >= 2 and not name.endswith(QUANTIZER_SCALE_SUFFIX) and ACTIVATION_QUANTIZER not in name


def parameter_groups(model: nn.Module, weight_decay: float, lr: float) -> list[dict]:
    decayed, kept = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decayed if decays(name, parameter) else kept).append(parameter)
    groups = [{"name": "decay", "params": decayed, "weight_decay": weight_decay, "base_lr": lr},
              {"name": "no_decay", "params": kept, "weight_decay": 0.0, "base_lr": lr}]
    return [group for group in groups if group["params"]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, lora=None) -> torch.optim.AdamW:
    """``lora`` (a recipe's :class:`~lowbit_deploy.recipes.LoraSection`, or None) switches to EfficientDM's groups
    (:func:`lowbit_deploy.quant.lora.lora_parameter_groups`)."""
    if lora is not None:
        from ..quant.lora import lora_parameter_groups

        groups = lora_parameter_groups(model, lr, lora)
    else:
        groups = parameter_groups(model, weight_decay, lr)
    return torch.optim.AdamW(groups, lr=lr)
