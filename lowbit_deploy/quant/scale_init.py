"""Scale initialisation: an explicit calibration step that writes each quantizer's ``scale`` parameter.

``minmax``      -- ``s = max|w| / max_level`` per output channel.
``alternating`` -- BitsFusion's alternating optimisation (Lloyd-Max style), started from min-max:
                   ``q = clip(round(w / s))`` then ``s = <w, q> / <q, q>`` per channel, repeated.
"""

from __future__ import annotations

from typing import Callable

import torch

from .fake_quant import MIN_SCALE, WeightQuantizer
from .grids import ScaleInit


def minmax_scale(weight: torch.Tensor, quantizer: WeightQuantizer, iterations: int = 0) -> torch.Tensor:
    del iterations  # min-max is closed-form; the argument keeps every initializer's signature the same
    per_channel_max = weight.detach().float().flatten(1).abs().amax(dim=1)
    return (per_channel_max / quantizer.grid.max_abs_level).clamp_min(MIN_SCALE)


def alternating_scale(weight: torch.Tensor, quantizer: WeightQuantizer, iterations: int = 10) -> torch.Tensor:
    w = weight.detach().float().flatten(1)
    scale = minmax_scale(weight, quantizer)
    grid = quantizer.grid
    for _ in range(iterations):
        q = torch.clamp(torch.round(w / scale[:, None]), grid.qmin, grid.qmax)
        q_dot_q = (q * q).sum(dim=1)
        w_dot_q = (w * q).sum(dim=1)
        # A channel whose weights all round to 0 has no least-squares scale; keep the previous one.
        updated = torch.where(q_dot_q > 0, w_dot_q / q_dot_q.clamp_min(1.0), scale)
        scale = updated.clamp_min(MIN_SCALE)
    return scale


SCALE_INITIALIZERS: dict[ScaleInit, Callable[..., torch.Tensor]] = {
    ScaleInit.MINMAX: minmax_scale,
    ScaleInit.ALTERNATING: alternating_scale,
}


def quantization_mse(weight: torch.Tensor, quantizer: WeightQuantizer) -> float:
    """Mean squared error of the deployed weight against the float weight."""
    return float(((quantizer.dequantized_weight(weight) - weight.detach().float()) ** 2).mean())


@torch.no_grad()
def initialize_scale(weight: torch.Tensor, quantizer: WeightQuantizer, method: ScaleInit, iterations: int = 10) -> None:
    quantizer.scale.copy_(SCALE_INITIALIZERS[method](weight, quantizer, iterations))
