"""AdamW over the student, with weight decay only where shrinking towards zero is a prior worth having.

Excluded from decay:
- every ``weight_quantizer.scale``: decay would pull the quantization step towards 0 whatever the loss says,
  shrinking the grid until weights clip (the step size is a calibration, not an over-parameterised weight);
- biases and normalisation gains/shifts (every 1-D parameter): decaying a GroupNorm gain towards 0 scales the
  activations down, and a bias has no redundancy for decay to regularise -- the usual AdamW practice.
Latent weights (quantized or float, >= 2-D) keep the recipe's ``weight_decay``.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZER_SCALE_SUFFIX = "weight_quantizer.scale"


def decays(name: str, parameter: nn.Parameter) -> bool:
    return parameter.ndim >= 2 and not name.endswith(QUANTIZER_SCALE_SUFFIX)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decayed, kept = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decayed if decays(name, parameter) else kept).append(parameter)
    groups = [{"name": "decay", "params": decayed, "weight_decay": weight_decay},
              {"name": "no_decay", "params": kept, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr)
