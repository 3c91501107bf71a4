"""QALoRA (EfficientDM): a low-rank update on a quantized layer, merged into its frozen weight before fake
quantization, so the deployed artifact holds only the merged, quantized weight -- no LoRA at run time.

Linear: ``A`` maps in -> r, ``B`` maps r -> out; the update is ``B @ A``. Conv2d: ``A`` is a conv to r channels with
the layer's own kernel size (EfficientDM applies it with the layer's stride/padding/dilation, which do not change the
merged weight: a kxk conv followed by a 1x1 conv is the kxk conv with weight ``B . A``), ``B`` a 1x1 conv r -> out.
``A`` starts Kaiming-uniform, ``B`` at zero, so training starts from the unchanged model.

The update is computed in one place (:meth:`LoRA.delta`), and
:meth:`lowbit_deploy.quant.fake_quant.QuantizedLayer.latent_weight` adds it; training, export and the exact weight
check all read that, so the exported codes are the trained ones bit for bit.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from ..errors import UserError
from .activation import ActivationQuantizer
from .fake_quant import QuantizedLayer


class LoRA(nn.Module):
    """The factors of one layer's update, stored as matrices: ``a`` is ``[r, fan_in]``, ``b`` is ``[out, r]``."""

    def __init__(self, weight_shape: tuple[int, ...], rank: int) -> None:
        super().__init__()
        out_features, fan_in = weight_shape[0], math.prod(weight_shape[1:])
        self.weight_shape = tuple(weight_shape)
        self.a = nn.Parameter(torch.empty(rank, fan_in))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        # What nn.Linear / nn.Conv2d initialise their weight with (Kaiming-uniform, a = sqrt(5)), as LoRA does.
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def extra_repr(self) -> str:
        return f"rank={self.rank}"

    def delta(self) -> torch.Tensor:
        return (self.b @ self.a).reshape(self.weight_shape)


def max_rank(layer: nn.Module) -> int:
    """The largest rank whose update is still low-rank: ``min(out, fan_in)``."""
    return min(layer.weight.shape[0], math.prod(layer.weight.shape[1:]))


def lora_targets(model: nn.Module, exclude: list[str]) -> dict[str, QuantizedLayer]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, QuantizedLayer) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)}


def check_lora(model: nn.Module, section) -> dict[str, QuantizedLayer]:
    """The layers ``section`` (a recipe's ``train.lora``) puts LoRA on; a clear error for a rank a layer cannot
    take, or a grouped conv (whose weight cannot hold the merged update)."""
    targets = lora_targets(model, section.exclude)
    if not targets:
        raise UserError(f"train.lora: every quantized layer is excluded ({section.exclude}); LoRA would train "
                        f"nothing. Narrow train.lora.exclude")
    for name, layer in targets.items():
        if getattr(layer, "groups", 1) != 1:
            raise UserError(f"train.lora: layer {name} is a grouped conv (groups={layer.groups}), whose weight cannot "
                            f"hold a merged LoRA update; add it to train.lora.exclude")
        if section.rank > max_rank(layer):
            too_small = sorted(n for n, module in targets.items() if section.rank > max_rank(module))
            raise UserError(f"train.lora.rank {section.rank} is larger than layer {name} allows (at most "
                            f"{max_rank(layer)} = min(out, in x kernel) for its weight {tuple(layer.weight.shape)}); "
                            f"{len(too_small)} layer(s) are too small. Lower train.lora.rank to <= "
                            f"{min(max_rank(targets[n]) for n in too_small)} or add them to train.lora.exclude")
    return targets


def attach_lora(model: nn.Module, section, *, generator_seed: int = 0) -> dict[str, QuantizedLayer]:
    """Give every target layer a LoRA (seeded, so a run and its resume build the same start) and freeze everything
    except LoRA factors and quantizer parameters."""
    targets = check_lora(model, section)
    state = torch.random.get_rng_state()
    torch.manual_seed(generator_seed)
    try:
        for layer in targets.values():
            layer.lora = LoRA(tuple(layer.weight.shape), section.rank).to(layer.weight.device)
    finally:
        torch.random.set_rng_state(state)
    freeze_all_but_lora_and_quantizers(model)
    return targets


def freeze_all_but_lora_and_quantizers(model: nn.Module) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_lora_or_quantizer(name))


def is_lora_or_quantizer(name: str) -> bool:
    return ".lora." in f".{name}" or "weight_quantizer." in name or "input_quantizer." in name


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters) of ``model``."""
    total = sum(parameter.numel() for parameter in model.parameters())
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad), total


def lora_parameter_groups(model: nn.Module, lr: float, section) -> list[dict]:
    """EfficientDM's optimiser groups: one per LoRA layer at ``lr`` scaled by the layer's mean weight scale over the
    mean of those (``scale_aware``; else ``lr``), the weight scales at ``section.weight_scale_lr``, the activation
    scales and zero points at ``section.activation_scale_lr``. No weight decay (LoRA starts at zero: decay towards it
    only fights the update)."""
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, QuantizedLayer) and module._modules.get("lora") is not None}
    means = {name: float(layer.weight_quantizer.deployed_scale().mean()) for name, layer in layers.items()}
    average = sum(means.values()) / max(len(means), 1)
    groups = []
    for name, layer in layers.items():
        rate = lr * means[name] / average if section.scale_aware and average > 0 else lr
        groups.append({"name": f"lora:{name}", "params": list(layer.lora.parameters()), "weight_decay": 0.0,
                       "base_lr": rate})
    weight_scales = [module.weight_quantizer.scale for module in model.modules() if isinstance(module, QuantizedLayer)]
    activation = [p for module in model.modules() if isinstance(module, ActivationQuantizer)
                  for p in module.parameters()]
    groups.append({"name": "weight_scales", "params": weight_scales, "weight_decay": 0.0,
                   "base_lr": section.weight_scale_lr})
    if activation:
        groups.append({"name": "activation_scales", "params": activation, "weight_decay": 0.0,
                       "base_lr": section.activation_scale_lr})
    for group in groups:
        group["lr"] = group["base_lr"]
    return [group for group in groups if group["params"]]
