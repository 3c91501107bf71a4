"""A deterministic DDIM sampler over any denoiser (torch module, ONNX Runtime or TensorRT), and PSNR.

The denoiser is a plain callable so the same loop drives the fp32 reference and every deployed backend: parity
then compares final images produced from identical seeds, timesteps and conditions.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _batched(states: torch.Tensor, batch: int) -> torch.Tensor:
    if states.shape[0] == batch:
        return states
    if states.shape[0] == 1:
        return states.expand(batch, *states.shape[1:])
    raise ValueError(f"null conditions have batch {states.shape[0]}; expected 1 or {batch}")


@torch.no_grad()
def sample(denoise: Denoiser, cond: torch.Tensor, null: torch.Tensor | None, *, scheduler_config: dict,
           num_steps: int, guidance_scale: float, seed: int, sample_shape: tuple[int, int, int]) -> torch.Tensor:
    """Run DDIM (eta 0) for ``cond.shape[0]`` samples; returns ``[B, C, H, W]`` float32 clamped to [-1, 1].

    ``denoise(latents, timesteps[B], encoder_hidden_states)`` returns the model output the scheduler's
    ``prediction_type`` names. With ``null`` given and ``guidance_scale != 1`` each step runs conditional and
    unconditional inputs as one batch of 2B (classifier-free guidance).
    """
    from diffusers import DDIMScheduler

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps)
    batch = cond.shape[0]
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((batch, *sample_shape), generator=generator, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    use_cfg = null is not None and guidance_scale != 1.0
    states = torch.cat([cond, _batched(null, batch).to(cond.dtype)]) if use_cfg else cond
    for timestep in scheduler.timesteps:
        model_input = torch.cat([latents, latents]) if use_cfg else latents
        model_input = scheduler.scale_model_input(model_input, timestep)
        # A fresh contiguous tensor: ONNX Runtime / TensorRT bindings want dense int64 buffers, not views.
        timesteps = torch.full((model_input.shape[0],), int(timestep), dtype=torch.long)
        output = denoise(model_input, timesteps, states).float()
        if use_cfg:
            output_cond, output_null = output.chunk(2)
            output = output_null + guidance_scale * (output_cond - output_null)
        latents = scheduler.step(output, timestep, latents, eta=0.0).prev_sample
    return latents.clamp(-1.0, 1.0)


def unet_denoiser(unet: torch.nn.Module) -> Denoiser:
    """Adapt a diffusers UNet (``.sample`` output) to the ``denoise`` signature."""

    def denoise(latents: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return unet(latents, timesteps, encoder_hidden_states=states).sample

    return denoise


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements; ``inf`` for identical tensors."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = float(torch.mean((a.double() - b.double()) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / mse)
