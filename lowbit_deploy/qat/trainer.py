"""Quantization-aware training by distillation from the float teacher's noise prediction.

Each step: draw clean samples and conditions, drop conditions to the null prompt with probability p (so
classifier-free guidance keeps working), draw timesteps (uniform, or BitsFusion's Beta(3, 1) that favours large t
where quantization error grows), noise the samples, and regress the quantized student's noise prediction onto the
teacher's. AdamW over the student's latent weights and quantizer scales.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..io import update_report
from ..quant.apply import quantize_model
from ..recipes import Recipe, TimestepSampling, TrainSection
from .checkpoint import (
    CHECKPOINT_DIRNAME,
    check_same_step,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
    save_train_state,
)
from .data import make_sampler


@dataclass
class TrainResult:
    checkpoint: str
    steps: int
    seconds: float
    first_loss: float | None
    last_loss: float | None
    average_bits: float
    quantized_layers: int
    losses: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("losses")
        return data


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"mse": F.mse_loss, "l1": F.l1_loss}


def sample_timesteps(config: TrainSection, batch: int, num_train_timesteps: int,
                     generator: torch.Generator) -> torch.Tensor:
    if config.timestep_sampling is TimestepSampling.BETA:
        # torch's Beta sampler takes no generator; derive a numpy one from ours so runs and resumes stay seeded.
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        draws = np.random.default_rng(seed).beta(config.beta_alpha, config.beta_beta, size=batch)
        fraction = torch.from_numpy(draws).float()
    else:
        fraction = torch.rand(batch, generator=generator)
    return (fraction * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def _resolved(model_path: str | None) -> str | None:
    # Later stages load the teacher again, possibly from another working directory: keep an absolute path.
    return str(Path(model_path).expanduser().resolve()) if model_path else None


def _check_resume_matches(checkpoint, recipe: Recipe, model_path: str | None) -> None:
    if checkpoint.recipe.quantize != recipe.quantize or checkpoint.recipe.train.model_copy(
            update={"steps": recipe.train.steps}) != recipe.train:
        raise UserError(f"cannot resume {checkpoint.path}: its recipe's quantize/train sections differ from "
                        f"{recipe.name!r}; resume with the recipe it was started with, or train into a new --out")
    if model_path is not None and model_path != checkpoint.model_source:
        teacher = checkpoint.model_source or "the embedded default"
        raise UserError(f"cannot resume {checkpoint.path}: it distils {teacher}, not {model_path}; drop --model or "
                        f"pass the same folder")


def _prepare(recipe: Recipe, model_path: str | None, run_dir: Path, resume: bool):
    from ..models import load_model

    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(run_dir)
        _check_resume_matches(checkpoint, recipe, model_path)
        model_path = checkpoint.model_source
    bundle = load_model(model_path, recipe.model.subfolder)
    teacher = bundle.unet.eval().requires_grad_(False)
    if checkpoint is not None:
        student, plan = checkpoint.unet, checkpoint.plan
    else:
        student = copy.deepcopy(teacher)
        plan = quantize_model(student, recipe.quantize).to_dict()
    student.train().requires_grad_(True)
    return bundle, teacher, student, plan, model_path, checkpoint.step if checkpoint else 0


def train(recipe: Recipe, run_dir: str | Path, *, model_path: str | None = None, steps: int | None = None,
          resume: bool = False, progress: bool = True) -> TrainResult:
    """Run QAT for ``recipe`` into ``run_dir`` (checkpoint written atomically every ``checkpoint_every`` steps)."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    config = recipe.train
    total_steps = config.steps if steps is None else steps
    run_dir = Path(run_dir)
    if not resume and (run_dir / CHECKPOINT_DIRNAME).exists():
        raise UserError(f"{run_dir} already holds a checkpoint; pass --resume to continue it, or choose a new --out")
    model_path = _resolved(model_path or recipe.model.path)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    bundle, teacher, student, plan, model_path, checkpoint_step = _prepare(recipe, model_path, run_dir, resume)
    start_step = 0
    sampler = make_sampler(config.data, bundle)
    seq_len = bundle.condition.seq_len
    noise_scheduler = DDPMScheduler.from_config(bundle.scheduler_config)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    if resume:
        start_step = load_train_state(run_dir, optimizer, generator)
        check_same_step(checkpoint_step, start_step, run_dir)
    loss_fn = LOSSES[config.loss]
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(start_step, total_steps), desc="QAT", disable=not progress, initial=start_step,
               total=total_steps)
    for step in bar:
        batch = sampler(config.batch_size, generator)
        drop = torch.rand(config.batch_size, generator=generator) < config.condition_drop_prob
        conditions = torch.where(drop[:, None, None], bundle.condition.null(config.batch_size),
                                 batch.encoder_hidden_states)
        timesteps = sample_timesteps(config, config.batch_size, num_train_timesteps, generator)
        noise = torch.randn(batch.x0.shape, generator=generator)
        noisy = noise_scheduler.add_noise(batch.x0, noise, timesteps)
        with torch.no_grad():
            target = teacher(noisy, timesteps, conditions).sample
        loss = loss_fn(student(noisy, timesteps, conditions).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.5f}")
        done = step + 1
        if done % config.checkpoint_every == 0 and done < total_steps:
            save_checkpoint(run_dir, student, recipe, model_path, done, plan, seq_len)
            save_train_state(run_dir, optimizer, done, generator)
    student.eval()
    checkpoint = save_checkpoint(run_dir, student, recipe, model_path, max(total_steps, start_step), plan,
                                 seq_len)
    save_train_state(run_dir, optimizer, max(total_steps, start_step), generator)
    result = TrainResult(str(checkpoint), total_steps, time.perf_counter() - started,
                         losses[0] if losses else None, losses[-1] if losses else None, plan["average_bits"],
                         len(plan["layers"]), losses)
    update_report(run_dir, "train", {**result.summary(), "plan": _plan_summary(plan)})
    return result


def _plan_summary(plan: dict) -> dict:
    by_bits: dict[str, int] = {}
    for layer in plan["layers"]:
        key = f"{layer['grid_kind']}-{layer['bits']}bit"
        by_bits[key] = by_bits.get(key, 0) + 1
    return {"layers_by_grid": by_bits, "quantized_params": plan["quantized_params"],
            "float_params": plan["float_params"], "average_bits": round(plan["average_bits"], 4)}
