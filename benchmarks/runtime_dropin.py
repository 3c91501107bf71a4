"""The diffusers drop-in on a run: images from a diffusers DDIM loop over ``DeployedUNet2D(model.onnx)`` (or
``model.engine``) vs the project's sampler over the PyTorch deployed model, same seeds, conditions and steps; PSNR in
dB and wall times.

Usage: python benchmarks/runtime_dropin.py RUN_DIR [--artifact model.onnx|model.engine] [--samples 10] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import print_table

from lowbit_deploy.models import load_model
from lowbit_deploy.runtime import BackendUnavailableError, DeployedUNet2D, open_runner
from lowbit_deploy.signature import TimeInput
from lowbit_deploy.validate.sampling import psnr, sample, schedule_timesteps


def diffusers_loop(unet: DeployedUNet2D, scheduler_config: dict, cond: torch.Tensor, null: torch.Tensor,
                   num_steps: int, guidance_scale: float, seed: int) -> torch.Tensor:
    """What a user writes with diffusers (the README's lines): DDIM, eta 0, classifier-free guidance."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps)
    channels, height, width = unet.signature.sample_shape
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((cond.shape[0], channels, height, width), generator=generator)
    latents = latents * scheduler.init_noise_sigma
    states = torch.cat([cond, null])
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
        noise_cond, noise_null = unet(model_input, timestep, encoder_hidden_states=states).sample.chunk(2)
        noise = noise_null + guidance_scale * (noise_cond - noise_null)
        latents = scheduler.step(noise, timestep, latents, eta=0.0).prev_sample
    return latents.clamp(-1.0, 1.0)


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--artifact", default="model.onnx", help="model.onnx (ONNX Runtime) or model.engine")
    parser.add_argument("--samples", type=int, default=None, help="default: the recipe's validate.sampling")
    parser.add_argument("--sampling-steps", type=int, default=None, help="default: the recipe's (cached: its "
                                                                              "schedule)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()

    reference, load_reference_s = timed(open_runner, args.run_dir / "checkpoint" / "quantized_unet.safetensors")
    config = reference.recipe.validate_.sampling
    signature = reference.signature
    num_steps = (signature.num_steps if signature.time_input is TimeInput.STEP_INDEX
                 else reference.recipe.sampling_steps(args.sampling_steps))
    bundle = load_model(reference.model_source, reference.recipe.model.subfolder)
    try:
        unet, load_drop_in_s = timed(open_drop_in, args.run_dir / args.artifact, args.threads, bundle, num_steps)
    except BackendUnavailableError as error:
        print(f"{args.artifact}: not run: {error.reason}")
        raise SystemExit(1) from None
    count = args.samples or config.num_samples
    condition = bundle.condition
    if condition.num_classes is not None:
        cond = condition.for_labels([index % condition.num_classes for index in range(count)])
    else:
        cond, _ = condition.sample(count, torch.Generator().manual_seed(config.seed))
    null = condition.null(count)
    common = dict(num_steps=num_steps, guidance_scale=config.guidance_scale, seed=config.seed)

    with torch.no_grad():
        reference_images, reference_s = timed(sample, reference, signature, cond, null,
                                              scheduler_config=bundle.scheduler_config, **common)
        images, drop_in_s = timed(diffusers_loop, unet, bundle.scheduler_config, cond, null, **common)
    calls = num_steps  # one UNet call per step, conditional and null inputs batched together
    print_table(f"diffusers drop-in ({unet.runner.name}, {args.run_dir / args.artifact}) vs PyTorch deployed model: "
                f"{count} samples, DDIM {num_steps} steps, CFG {config.guidance_scale}, seed {config.seed}, "
                f"{torch.get_num_threads()} torch threads",
                ["images", "PSNR vs PyTorch deployed (dB)", "sampling wall (s)", f"per step, batch {2 * count} (ms)",
                 "load + first call (s)"],
                [["PyTorch deployed (project sampler, signature feeds)", "-", reference_s, 1000 * reference_s / calls,
                  load_reference_s],
                 ["DeployedUNet2D (diffusers DDIMScheduler loop)", psnr(images, reference_images), drop_in_s,
                  1000 * drop_in_s / calls, load_drop_in_s]])
    print(f"Runtime: {time.perf_counter() - started:.1f}s (wall, imports excluded)")


def open_drop_in(path: Path, threads: int | None, bundle, num_steps: int) -> DeployedUNet2D:
    """Open and call once: ONNX Runtime creates its session on the first call, which belongs to loading."""
    unet = DeployedUNet2D(path, threads=threads)
    signature = unet.signature
    first_timestep = schedule_timesteps(bundle.scheduler_config, num_steps)[0]
    unet(torch.zeros(1, *signature.sample_shape), first_timestep, bundle.condition.null(1))
    return unet


if __name__ == "__main__":
    main()
