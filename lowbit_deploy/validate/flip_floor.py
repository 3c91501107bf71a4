"""What one activation rounding flip does to sampled images: the sampling floor of models with quantized activations.

Where a layer's input is quantized, two correct float32 runtimes that accumulate in different orders can put one
input on either side of a rounding boundary, and the next layer then sees a whole quantization step of difference,
which the remaining layers and sampling steps carry on. The float32-vs-float64 floor (validate/floor.py) sees such a
flip only if one happens on the parity inputs: a small model may see none there (F ~135 dB) and then one in the longer
sampling comparison, which fails its F - 30 dB gate on a clean artifact. This floor does not wait for chance: the
deployed torch model samples again with, at its first call, the flip float32 noise makes likeliest in every batch item
-- the quantized input nearest a rounding boundary relative to its magnitude, moved across (graph inputs excluded:
every runtime reads them bit for bit) -- and the images' PSNR against the unflipped ones is what a clean artifact can
show (docs/gates.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class _Flip:
    likelihood: float     # distance to the boundary relative to the input's magnitude: smaller flips first
    quantizer: str
    position: tuple[int, ...]  # in the quantizer's output, batch item first
    delta: float          # output change: +-1 step of the grid, in the output's units


def _scales(quantizer, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = quantizer.context.index if quantizer.per_step else torch.zeros(batch, dtype=torch.int64)
    zero = None if quantizer.zero_point is None else quantizer.zero_point.index_select(0, rows)
    return quantizer.act_scale.index_select(0, rows), zero


def _likeliest(name: str, quantizer, x: torch.Tensor) -> list[_Flip | None]:
    """Per batch item, the input whose rounding float32 noise flips first (None: no input a flip could move): the
    smallest distance to a rounding boundary relative to the input's magnitude, with both codes inside the grid."""
    scale, zero = _scales(quantizer, x.shape[0])
    flips: list[_Flip | None] = []
    for item in range(x.shape[0]):
        value = x[item].double()
        v = value / float(scale[item])
        current, below = torch.round(v), torch.floor(v)
        flipped = torch.where(v - below < 0.5, below + 1, below)
        shift = 0.0 if zero is None else float(zero[item])
        inside = ((current + shift >= quantizer.qmin) & (current + shift <= quantizer.qmax)
                  & (flipped + shift >= quantizer.qmin) & (flipped + shift <= quantizer.qmax) & (flipped != current)
                  & (value != 0))
        if not bool(inside.any()):
            flips.append(None)
            continue
        relative = (v - below - 0.5).abs() * float(scale[item]) / value.abs()
        relative = torch.where(inside, relative, torch.full_like(relative, math.inf))
        flat = int(torch.argmin(relative))
        position = tuple(int(i) for i in np.unravel_index(flat, tuple(value.shape)))
        flips.append(_Flip(float(relative.reshape(-1)[flat]), name, (item, *position),
                           float((flipped.reshape(-1)[flat] - current.reshape(-1)[flat]) * scale[item])))
    return flips


def has_activation_quantizers(deployed: nn.Module) -> bool:
    from ..export.activation_ops import DeployedActivationQuantizer

    return any(isinstance(module, DeployedActivationQuantizer) for module in deployed.modules())


def likeliest_flips(deployed: nn.Module, args: list[torch.Tensor]) -> list[_Flip]:
    """Per batch item of ``args``, the activation rounding flip float32 noise makes likeliest (items where no
    quantized input can flip have none)."""
    from ..export.activation_ops import DeployedActivationQuantizer

    chosen: list[_Flip | None] = [None] * args[0].shape[0]
    inputs_of_graph = {arg.data_ptr() for arg in args}

    def finder(name):
        def hook(module, inputs, _):
            if inputs[0].data_ptr() in inputs_of_graph:
                return  # a graph input reaches every runtime bit for bit: its rounding cannot flip
            for item, flip in enumerate(_likeliest(name, module, inputs[0])):
                if flip is not None and (chosen[item] is None or flip.likelihood < chosen[item].likelihood):
                    chosen[item] = flip
        return hook

    _run_hooked(deployed, args, {name: finder(name) for name, module in deployed.named_modules()
                                 if isinstance(module, DeployedActivationQuantizer)})
    return [flip for flip in chosen if flip is not None]


def run_with_flips(deployed: nn.Module, args: list[torch.Tensor], flips: list[_Flip]) -> torch.Tensor:
    """``deployed`` on ``args`` with ``flips`` made (each at its quantizer's first call, where it was found)."""
    calls: dict[str, int] = {}

    def flipper(name):
        def hook(module, inputs, out):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                for flip in flips:
                    if flip.quantizer == name:
                        out[flip.position] += flip.delta
            return out
        return hook

    return _run_hooked(deployed, args, {flip.quantizer: flipper(flip.quantizer) for flip in flips})


def one_flip_runner(deployed: nn.Module):
    """A runner of ``deployed`` (validate/sampling.py's feeds -> output) whose first call carries the likeliest
    activation rounding flip of every batch item; later calls run unchanged."""
    names = deployed.signature.input_names
    done = [False]

    def run(feeds) -> torch.Tensor:
        args = [feeds[name] for name in names]
        if not done[0]:
            done[0] = True
            flips = likeliest_flips(deployed, args)
            if flips:
                return run_with_flips(deployed, args, flips)
        with torch.no_grad():
            return deployed(*args)
    return run


def _run_hooked(deployed: nn.Module, args: list[torch.Tensor], hooks: dict) -> torch.Tensor:
    modules = dict(deployed.named_modules())
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks.items()]
    try:
        with torch.no_grad():
            return deployed(*args)
    finally:
        for handle in handles:
            handle.remove()
