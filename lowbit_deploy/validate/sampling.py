"""A deterministic DDIM sampler over any runner (torch module, ONNX Runtime or TensorRT), and PSNR.

A runner is a plain callable taking the deployed signature's named inputs, so the same loop drives the fp32
reference and every deployed backend -- by timestep value or by step index, as the model's signature says -- and
parity compares final images produced from identical seeds, timesteps and conditions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from ..errors import UserError

if TYPE_CHECKING:
    from ..models.conditioning import Conditions
    from ..signature import DeployedSignature

Runner = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
# Called at every step with (step index, timestep, latents the step starts from, the guided model output).
StepObserver = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def make_scheduler(scheduler_config: dict, num_steps: int):
    """The inference scheduler (DDIM) set to ``num_steps``: the one schedule sampling and time caching share."""
    from diffusers import DDIMScheduler

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def schedule_timesteps(scheduler_config: dict, num_steps: int) -> list[int]:
    """Timestep of each step index (index 0 = the first, noisiest step)."""
    return [int(t) for t in make_scheduler(scheduler_config, num_steps).timesteps]


@torch.no_grad()
def sample(runner: Runner, signature: "DeployedSignature", cond: "Conditions | torch.Tensor",
           null: "Conditions | torch.Tensor | None", *, scheduler_config: dict, num_steps: int, guidance_scale: float,
           seed: int, observer: StepObserver | None = None) -> torch.Tensor:
    """Run DDIM (eta 0) for ``cond``'s batch of samples; returns ``[B, C, H, W]`` float32 clamped to [-1, 1].

    ``cond`` and ``null`` are :class:`~lowbit_deploy.models.conditioning.Conditions` (encoder_hidden_states and the
    added conditions the signature names) or bare encoder_hidden_states for models without added conditions;
    ``null`` may have batch 1.

    ``runner(feeds)`` returns the model output the scheduler's ``prediction_type`` names; ``feeds`` are built by
    ``signature`` (a step index for models with cached time features, else the timestep value). With ``null`` given
    and ``guidance_scale != 1`` each step runs conditional and unconditional inputs as one batch of 2B
    (classifier-free guidance). ``observer`` sees every step (data-free distillation and activation calibration
    follow the teacher's trajectories through it).
    """
    scheduler = make_scheduler(scheduler_config, num_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    if signature.step_timesteps and tuple(timesteps) != signature.step_timesteps:
        raise UserError(f"this model takes a step index into {signature.schedule} (timesteps "
                        f"{list(signature.step_timesteps)[:4]}...: cached time features or per-step activation "
                        f"scales); sampling with {num_steps} steps gives other timesteps. Sample with "
                        f"{signature.num_steps} steps, or re-train with another schedule")
    from ..models.conditioning import as_conditions

    cond = as_conditions(cond)
    batch = cond.batch
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((batch, *signature.sample_shape), generator=generator, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    use_cfg = null is not None and guidance_scale != 1.0
    states = cond.cat(as_conditions(null).expand(batch)) if use_cfg else cond
    for step_index, timestep in enumerate(scheduler.timesteps):
        model_input = torch.cat([latents, latents]) if use_cfg else latents
        model_input = scheduler.scale_model_input(model_input, timestep)
        time = signature.time_feed(timestep, step_index, model_input.shape[0])
        output = runner(signature.feeds(model_input, time, states.encoder_hidden_states, **states.added)).float()
        if use_cfg:
            output_cond, output_null = output.chunk(2)
            output = output_null + guidance_scale * (output_cond - output_null)
        if observer is not None:
            observer(step_index, int(timestep), latents, output)
        latents = scheduler.step(output, timestep, latents, eta=0.0).prev_sample
    return latents.clamp(-1.0, 1.0)


def unet_runner(unet: torch.nn.Module) -> Runner:
    """Adapt a diffusers UNet (timestep input, ``.sample`` output) to the runner interface; feeds beyond sample,
    timestep and encoder_hidden_states that name added conditions are passed as diffusers names them."""
    from ..signature import UNET_ARGUMENT, unet_keywords

    def run(feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        added = {name: value for name, value in feeds.items() if name in UNET_ARGUMENT}
        return unet(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"],
                    **unet_keywords(added)).sample

    return run


def module_runner(module: torch.nn.Module, signature: "DeployedSignature") -> Runner:
    """Adapt a module whose forward takes the signature's inputs positionally (the deployed UNet)."""

    def run(feeds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return module(*(feeds[name] for name in signature.input_names))

    return run


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements; ``inf`` for identical tensors."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = float(torch.mean((a.double() - b.double()) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / mse)
