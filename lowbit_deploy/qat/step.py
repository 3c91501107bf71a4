"""One optimisation step: draw the step's randomness from the seeded generator, compute the stage's loss,
backward, optimizer step.

Draw order (part of the reproducibility contract -- a resumed run replays it exactly): the batch (the data sampler
draws samples and conditions), the condition-drop mask, the timesteps, the noise. A dropped row gets the null
encoder_hidden_states and the null added conditions (SDXL / class labels) together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..recipes import TimestepSampling
from .data import Batch
from .objectives import NoisedBatch, StepLosses

if TYPE_CHECKING:
    from .loop import TrainingRun


def sample_timesteps(config, batch: int, num_train_timesteps: int, generator: torch.Generator,
                     schedule: Sequence[int] = ()) -> torch.Tensor:
    """Integer timesteps in ``[0, T)``: uniform, BitsFusion's ``Beta(alpha, beta)`` (``Beta(3, 1)`` favours large
    t, where quantization error grows), or uniform over ``schedule`` (the deployed schedule's timesteps).
    ``config`` is a stage (or anything with ``timestep_sampling``, ``beta_alpha``, ``beta_beta``)."""
    if config.timestep_sampling is TimestepSampling.SCHEDULE:
        if not schedule:
            raise ValueError("timestep_sampling 'schedule' needs the deployed schedule's timesteps")
        chosen = torch.randint(0, len(schedule), (batch,), generator=generator)
        return torch.tensor(list(schedule), dtype=torch.long)[chosen]
    if config.timestep_sampling is TimestepSampling.BETA:
        # torch's Beta sampler takes no generator; derive a numpy one from ours so runs and resumes stay seeded.
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        draws = np.random.default_rng(seed).beta(config.beta_alpha, config.beta_beta, size=batch)
        fraction = torch.from_numpy(draws).float()
    else:
        fraction = torch.rand(batch, generator=generator)
    return (fraction * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def drop_conditions(conditions: torch.Tensor, null_conditions: torch.Tensor, probability: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each row by the null condition with ``probability`` (so classifier-free guidance keeps working);
    returns the conditions every model of the step sees, and the drop mask."""
    dropped = torch.rand(conditions.shape[0], generator=generator) < probability
    return torch.where(dropped[:, None, None], null_conditions, conditions), dropped


def drop_added(added: dict[str, torch.Tensor], null_added: dict[str, torch.Tensor],
               dropped: torch.Tensor) -> dict[str, torch.Tensor]:
    """The added conditions with the rows of ``dropped`` replaced by their null values."""
    return {name: torch.where(dropped.reshape(-1, *([1] * (value.dim() - 1))), null_added[name], value)
            for name, value in added.items()}


def noised_batch(batch: Batch, stage, condition_source, noise_scheduler, generator: torch.Generator,
                 schedule: Sequence[int] = ()) -> NoisedBatch:
    size = batch.x0.shape[0]
    conditions, dropped = drop_conditions(batch.encoder_hidden_states, condition_source.null(size),
                                          stage.condition_drop_prob, generator)
    added = drop_added(batch.added, condition_source.null_added(size), dropped) if batch.added else {}
    timesteps = sample_timesteps(stage, size, noise_scheduler.config.num_train_timesteps, generator, schedule)
    noise = torch.randn(batch.x0.shape, generator=generator)
    noisy = noise_scheduler.add_noise(batch.x0, noise, timesteps)
    return NoisedBatch(batch.x0, noise, noisy, timesteps, conditions, dropped, added)


def train_step(run: "TrainingRun", batch: Batch) -> StepLosses:
    """One optimisation step of ``run``'s current stage on ``batch``; returns the loss terms."""
    draw_inputs = getattr(run.objective, "inputs", None)  # objectives that draw their own inputs (trajectory)
    if draw_inputs is not None:
        inputs = draw_inputs(run, batch)
    else:
        inputs = noised_batch(batch, run.stage, run.bundle.condition, run.noise_scheduler, run.generator,
                              run.schedule_timesteps)
    # Under torchrun each process trains on its slice of the global batch and the gradients are averaged.
    terms = run.objective(run.distributed.shard(inputs, run.batch_size))
    run.optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    run.distributed.average_gradients(run.student.parameters())
    factor = run.stage.lr_factor(run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    run.optimizer.step()
    return terms.values()
