"""Activation quantization with one learned step size per denoising step (EfficientDM's TALSQ), selected by an
explicit step index -- never by a hidden counter.

The forward pass computes exactly what ``lowbit::QuantizeDequantizeActivation`` computes (docs/ops/
QuantizeDequantizeActivation_v1.md; numpy reference :func:`lowbit_deploy.quant.activation_grid.quantize_dequantize_numpy`):
per sample ``b`` with step ``i``, ``y = (clamp(round(x / s_i) + z_i, qmin, qmax) - z_i) * s_i`` in float32, with the
scale exactly as stored (float32). Gradients: straight through the rounding, LSQ's for the scale (scaled by
``1 / sqrt(values_per_sample * qmax)``), straight through for the zero point's rounding.

Which step a sample is at:
* in training and in the trained torch model, the UNet's time projection is wrapped by :class:`StepTracking`, which
  maps each sample's timestep to the trained step whose timestep is nearest (ties: the earlier, noisier step) and
  publishes the indexes in the model's :class:`StepContext`;
* in the deployed graph the step index is an input (the signature's ``step_index``), published the same way.

Fewer (or other) steps than trained: a sampler with another schedule calls the model at timesteps it was not trained
at; each uses the scale of the trained step with the nearest timestep (the rule above, :func:`nearest_steps`). For a
DDIM schedule whose step count divides the trained one this keeps every k-th trained scale, as EfficientDM's code
does for 20 of 100 steps; :func:`resample_table` applies the same rule to a whole table.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .activation_grid import ActivationGrid
from .fake_quant import round_ste, with_gradient_of

# Smallest activation scale kept during training (a zero step would divide by zero).
MIN_ACTIVATION_SCALE = 2.0**-24


class StepContext:
    """The step index of each sample of the forward in progress, shared by the modules of one UNet (a plain object,
    not a module: it holds no state of its own and must not be registered twice)."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None


def nearest_steps(timesteps: torch.Tensor, step_timesteps: torch.Tensor) -> torch.Tensor:
    """Index of the trained step whose timestep is nearest to each of ``timesteps`` (ties: the lower index, i.e. the
    noisier step of a descending schedule)."""
    distance = (timesteps.reshape(-1, 1).double() - step_timesteps.reshape(1, -1).double()).abs()
    return distance.argmin(dim=1)  # argmin returns the first minimum: the lower index on ties


def resample_table(table: torch.Tensor, trained_timesteps: Sequence[int], timesteps: Sequence[int]) -> torch.Tensor:
    """A per-step table trained for ``trained_timesteps`` as used at ``timesteps`` (rows by :func:`nearest_steps`)."""
    rows = nearest_steps(torch.tensor(list(timesteps)), torch.tensor(list(trained_timesteps)))
    return table.index_select(0, rows)


class StepTracking(nn.Module):
    """Wraps a UNet's ``time_proj``: publishes each sample's step index (nearest trained step) before computing the
    time features as before."""

    def __init__(self, inner: nn.Module, step_timesteps: Sequence[int], context: StepContext) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("step_timesteps", torch.tensor(list(step_timesteps), dtype=torch.int64),
                             persistent=False)
        self.context = context

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        self.context.index = nearest_steps(timesteps, self.step_timesteps)
        return self.inner(timesteps)


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int,
                             qmax: int) -> torch.Tensor:
    """The op's math on per-sample ``scale``/``zero_point`` of shape ``[B]`` (float32), with STE gradients."""
    broadcast = (x.shape[0],) + (1,) * (x.dim() - 1)
    s = scale.reshape(broadcast)
    q = round_ste(x / s)
    if zero_point is None:
        return torch.clamp(q, qmin, qmax) * s
    z = zero_point.reshape(broadcast)
    return (torch.clamp(q + z, qmin, qmax) - z) * s


class ActivationQuantizer(nn.Module):
    """Quantizes a layer's input on ``grid`` with ``steps`` learnable scales (1: one scale for every step)."""

    def __init__(self, grid: ActivationGrid, steps: int, context: StepContext | None) -> None:
        super().__init__()
        if steps > 1 and context is None:
            raise ValueError("per-step activation scales need the model's StepContext")
        self.grid = grid
        self.scale = nn.Parameter(torch.ones(steps))
        self.zero_point = None if grid.symmetric else nn.Parameter(torch.zeros(steps))
        self.context = context
        self.enabled = True  # calibration switches quantization off while it observes the float inputs

    @property
    def steps(self) -> int:
        return self.scale.numel()

    @property
    def per_step(self) -> bool:
        return self.steps > 1

    def extra_repr(self) -> str:
        return f"{self.grid.describe()}, {self.steps} step scale(s)"

    def rows(self, batch: int) -> torch.Tensor:
        """The scale-table row of each sample: its step index, or 0 with a single scale."""
        if not self.per_step:
            return torch.zeros(batch, dtype=torch.int64, device=self.scale.device)
        index = self.context.index if self.context is not None else None
        if index is None:
            raise RuntimeError("an activation quantizer with per-step scales ran before the step index was known")
        if index.shape[0] != batch:
            raise RuntimeError(f"the forward's step index has {index.shape[0]} entries for a batch of {batch}")
        return index

    def deployed_scale(self) -> torch.Tensor:
        """The scale table exactly as stored (float32)."""
        return self.scale.detach().clamp_min(MIN_ACTIVATION_SCALE).float()

    def deployed_zero_point(self) -> torch.Tensor | None:
        """The integer zero points as stored (float32 holding integers in [qmin, qmax]); None when symmetric."""
        if self.zero_point is None:
            return None
        return torch.round(self.zero_point.detach()).clamp(self.grid.qmin, self.grid.qmax).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        rows = self.rows(x.shape[0])
        values_per_sample = max(x[0].numel(), 1)
        factor = 1.0 / math.sqrt(values_per_sample * max(abs(self.grid.qmax), 1))
        table = with_gradient_of(self.deployed_scale(), self.scale.clamp_min(MIN_ACTIVATION_SCALE) * factor)
        zero = None
        if self.zero_point is not None:
            zero_point = torch.clamp(round_ste(self.zero_point), self.grid.qmin, self.grid.qmax)
            zero = zero_point.index_select(0, rows)
        return fake_quantize_activation(x, table.index_select(0, rows), zero, self.grid.qmin, self.grid.qmax)

    @torch.no_grad()
    def set_table(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        self.scale.copy_(scale.clamp_min(MIN_ACTIVATION_SCALE))
        if self.zero_point is not None and zero_point is not None:
            self.zero_point.copy_(zero_point)


def step_context_of(unet: nn.Module) -> StepContext | None:
    """The StepContext a UNet's time projection publishes into (None when nothing tracks steps)."""
    return getattr(unet.time_proj, "context", None)


def install_step_tracking(unet: nn.Module, step_timesteps: Sequence[int]) -> StepContext:
    """Wrap ``unet.time_proj`` so every forward publishes its samples' step indexes; returns the shared context."""
    if isinstance(unet.time_proj, StepTracking):
        return unet.time_proj.context
    if not step_timesteps:
        raise ValueError("per-step activation scales need the deployed schedule's timesteps")
    context = StepContext()
    unet.time_proj = StepTracking(unet.time_proj, step_timesteps, context)
    return context


def activation_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, ActivationQuantizer)}
