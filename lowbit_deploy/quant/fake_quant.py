"""Fake-quantized Conv2d/Linear layers with learnable per-output-channel scales (LSQ, straight-through rounding).

The forward pass computes exactly what the deployed artifact computes: the scale is rounded to float16 (the stored
type) before use, codes are ``clamp(round(w / scale16), qmin, qmax)`` and the weight is ``float32(q) *
float32(scale16)`` -- the formula of docs/ops/UnpackDequantize_v1.md. Gradients pass straight through the two
roundings; the scale gradient is LSQ's, scaled by ``1 / sqrt(numel_per_channel * max_level)``.

Quantizer state (the scale) is a registered parameter created at construction and filled by an explicit
initialisation step (:mod:`lowbit_deploy.quant.scale_init`), never lazily inside ``forward``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .grids import GridKind, IntegerGrid

# Smallest scale kept during training: a scale of 0 would divide by zero and a denormal fp16 loses precision.
MIN_SCALE = 2.0**-14


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even, like the export) with an identity gradient."""
    return x + (torch.round(x) - x).detach()


def with_gradient_of(value: torch.Tensor, carrier: torch.Tensor) -> torch.Tensor:
    """``value`` exactly (bit for bit), with the gradient ``carrier`` receives.

    ``carrier - carrier.detach()`` is exactly 0 for every finite float and ``value + 0`` is ``value``, so no
    rounding can creep into the forward pass -- unlike ``(x - x*f).detach() + x*f``, which differs from ``x`` by an
    ulp in some channels and then rounds to another float16 scale than the deployed one.
    """
    return value + (carrier - carrier.detach())


class WeightQuantizer(nn.Module):
    """Per-output-channel quantizer of a weight of shape ``[C_out, ...]`` onto an :class:`IntegerGrid`."""

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], grid: IntegerGrid) -> None:
        super().__init__()
        self.grid = grid
        self.weight_shape = tuple(weight_shape)
        self.scale = nn.Parameter(torch.ones(self.weight_shape[0]))
        numel_per_channel = math.prod(self.weight_shape[1:])
        self._grad_factor = 1.0 / math.sqrt(numel_per_channel * grid.max_abs_level)

    def extra_repr(self) -> str:
        return self.grid.describe()

    def _broadcast(self, per_channel: torch.Tensor) -> torch.Tensor:
        return per_channel.view(-1, *([1] * (len(self.weight_shape) - 1)))

    def deployed_scale(self) -> torch.Tensor:
        """The scale exactly as stored in the artifact (float16), widened to float32."""
        return self.scale.detach().clamp_min(MIN_SCALE).to(torch.float16).to(torch.float32)

    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer grid values ``q`` (int64, same shape as the weight) that the artifact stores."""
        scale = self._broadcast(self.deployed_scale())
        q = torch.round(weight.detach().float() / scale)
        return q.clamp(self.grid.qmin, self.grid.qmax).to(torch.int64)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # Value: the deployed float16 scale. Gradient: straight through the float16 rounding and the clamp, scaled
        # by LSQ's factor.
        carrier = self.scale.clamp_min(MIN_SCALE) * self._grad_factor
        scale16 = self._broadcast(with_gradient_of(self.deployed_scale(), carrier))
        q = torch.clamp(round_ste(weight / scale16), self.grid.qmin, self.grid.qmax)
        return q * scale16

    @torch.no_grad()
    def dequantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The deployed float32 weight: ``float32(q) * float32(scale16)``, bit-identical to every exported form."""
        return self.integer_weight(weight).to(torch.float32) * self._broadcast(self.deployed_scale())


def quantized_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` through the layer's ``input_quantizer`` (trained or deployed), or unchanged where it has none."""
    quantizer = layer._modules.get("input_quantizer")
    return x if quantizer is None else quantizer(x)


class QuantizedLayer(nn.Module):
    """Mixin behaviour shared by the quantized Conv2d and Linear: owns ``weight_quantizer``."""

    weight: nn.Parameter
    weight_quantizer: WeightQuantizer

    def latent_weight(self) -> torch.Tensor:
        """The float weight that is quantized: the layer's own, plus the merged LoRA update where one is attached
        (:mod:`lowbit_deploy.quant.lora`) -- every consumer of the quantized weight (training, export, the exact
        weight check) goes through this one function."""
        lora = self._modules.get("lora")
        return self.weight if lora is None else self.weight + lora.delta()

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.latent_weight())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_input(self, x)


class QuantConv2d(nn.Conv2d, QuantizedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantLinear(nn.Linear, QuantizedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


def reclassed(cls: type[nn.Module], layer: nn.Module) -> nn.Module:
    """A new module of ``cls`` sharing ``layer``'s attributes, parameters, buffers and submodules."""
    module = cls.__new__(cls)
    module.__dict__.update(layer.__dict__)
    module._parameters = dict(layer._parameters)
    module._buffers = dict(layer._buffers)
    module._modules = dict(layer._modules)
    return module


def _from_float(quant_cls: type[nn.Module], layer: nn.Module, grid: IntegerGrid) -> QuantizedLayer:
    """The quantized twin of a float layer: same parameters (shared), plus a quantizer."""
    quantized = reclassed(quant_cls, layer)
    quantized.weight_quantizer = WeightQuantizer(layer.weight.shape, grid).to(layer.weight.device)
    return quantized


def deployed_float_layer(layer: QuantizedLayer) -> nn.Module:
    """The plain float layer (the quantized class's float base) holding the deployed, dequantized weight."""
    float_type = next(base for base in type(layer).__mro__[1:] if base in QUANTIZABLE_LAYERS)
    plain = reclassed(float_type, layer)
    for training_only in ("weight_quantizer", "lora", "input_quantizer"):
        plain._modules.pop(training_only, None)
    plain.weight = nn.Parameter(layer.weight_quantizer.dequantized_weight(layer.latent_weight()), requires_grad=False)
    return plain


# Registry: float layer type -> constructor of its quantized replacement. Add a layer type here (and an export
# handler in lowbit_deploy/export) to make it quantizable; nothing else branches on layer types.
QUANTIZABLE_LAYERS: dict[type[nn.Module], Callable[[nn.Module, IntegerGrid], QuantizedLayer]] = {
    nn.Conv2d: lambda layer, grid: _from_float(QuantConv2d, layer, grid),
    nn.Linear: lambda layer, grid: _from_float(QuantLinear, layer, grid),
}


def quantizable_type(module: nn.Module) -> bool:
    return type(module) in QUANTIZABLE_LAYERS


__all__ = [
    "GridKind",
    "IntegerGrid",
    "QUANTIZABLE_LAYERS",
    "QuantConv2d",
    "QuantLinear",
    "QuantizedLayer",
    "WeightQuantizer",
    "quantizable_type",
    "quantized_input",
]
