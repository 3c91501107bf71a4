"""Activation-scale calibration (EfficientDM): an error-minimising search over activations collected on the float
teacher's sampling trajectories.

The teacher samples ``calibration_samples`` seeded prompts with the deployed schedule and guidance; at every step the
weight-quantized student (activation quantization off) runs on the teacher's ``x_t`` and each activation quantizer
observes its input, per table row (per step for TALSQ, all steps for one scale):

* the range of every value: max |x| (symmetric) or min and max (asymmetric);
* a fixed random subset of each sample's values (:data:`VALUES_PER_SAMPLE`), kept per row.

Then, per row, ``candidates`` clipping ranges ``range * k / K`` (k = 1..K) are scored by the summed
``|x - qdq(x)|^p`` (p = ``norm_p``, EfficientDM's 2.4) over the kept values; the best gives the row's scale (and
zero point). Each row is calibrated on its own step's activations (EfficientDM starts every step from one shared
value; a per-step start is at least as close and costs nothing extra here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quant.activation import ActivationQuantizer, activation_quantizers

# Values kept per sample and layer to score the candidates. EfficientDM scores ~1,024 whole calibration inputs; a
# random subset of each (the range still sees every value) keeps the search's cost flat in the layer's size.
VALUES_PER_SAMPLE = 256


@dataclass
class _Observed:
    low: torch.Tensor      # [rows] running minimum (asymmetric) or -max|x| (symmetric)
    high: torch.Tensor     # [rows] running maximum / max|x|
    seen: torch.Tensor     # [rows] bool: the row saw data
    kept: list[list[torch.Tensor]] = field(default_factory=list)  # per row: kept value subsets
    calls: int = 0


def _candidate_tables(quantizer: ActivationQuantizer, observed: _Observed, fractions: torch.Tensor):
    """Scale (and zero point) tables ``[rows, K]`` of every candidate clipping range."""
    grid = quantizer.grid
    if grid.symmetric:
        # Symmetric grids have one more level below zero: max|x| maps to qmax, so nothing positive clips at k = K.
        scale = (observed.high[:, None] * fractions[None, :]) / grid.qmax
        return scale.clamp_min(1e-12), None
    low, high = observed.low.clamp(max=0.0), observed.high.clamp(min=0.0)
    scale = ((high - low)[:, None] * fractions[None, :] / (grid.qmax - grid.qmin)).clamp_min(1e-12)
    zero = torch.round(-low[:, None] * fractions[None, :] / scale).clamp(grid.qmin, grid.qmax)
    return scale, zero


def _observe(quantizer: ActivationQuantizer, observed: _Observed, x: torch.Tensor) -> None:
    # The statistics live on the CPU, whatever device the student runs on (qat/device.py).
    rows = quantizer.rows(x.shape[0]).cpu()
    flat = x.detach().float().flatten(1).cpu()
    high = flat.abs().amax(1) if quantizer.grid.symmetric else flat.amax(1)
    low = -high if quantizer.grid.symmetric else flat.amin(1)
    observed.high.scatter_reduce_(0, rows, high, reduce="amax")
    observed.low.scatter_reduce_(0, rows, low, reduce="amin")
    observed.seen[rows] = True
    if flat.shape[1] > VALUES_PER_SAMPLE:
        generator = torch.Generator().manual_seed(observed.calls)
        flat = flat[:, torch.randperm(flat.shape[1], generator=generator)[:VALUES_PER_SAMPLE]]
    observed.calls += 1
    for row in rows.unique().tolist():
        observed.kept[row].append(flat[rows == row].reshape(-1))


def _errors(quantizer: ActivationQuantizer, values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
            norm_p: float) -> torch.Tensor:
    """``sum |x - qdq(x)|^p`` over ``values`` for each of the K candidate (scale, zero point) pairs."""
    s = scale[:, None]
    z = 0.0 if zero is None else zero[:, None]
    quantized = torch.clamp(torch.round(values[None, :] / s) + z, quantizer.grid.qmin, quantizer.grid.qmax)
    return ((quantized - z) * s - values[None, :]).abs().pow(norm_p).sum(1)


@torch.no_grad()
def calibrate_activations(student: torch.nn.Module, teacher: torch.nn.Module, bundle, schedule_steps: int,
                          section) -> dict[str, dict]:
    """Set every activation quantizer's table of ``student`` from ``section`` (a recipe's
    ``quantize.activations``); returns per layer the chosen scales' range and the rows without data."""
    from .trajectory import guided_output, teacher_trajectory
    from ..validate.sampling import make_scheduler

    quantizers = activation_quantizers(student)
    if not quantizers:
        return {}
    scheduler = make_scheduler(bundle.scheduler_config, schedule_steps)
    trajectories = []
    for first in range(0, section.calibration_samples, section.calibration_batch):
        batch = min(section.calibration_batch, section.calibration_samples - first)
        trajectories.append(teacher_trajectory(teacher, bundle, bundle.scheduler_config, schedule_steps, batch,
                                               section.guidance_scale, section.seed + first))
    fractions = torch.arange(1, section.candidates + 1, dtype=torch.float32) / section.candidates
    observed = {name: _Observed(torch.full((q.steps,), float("inf")), torch.full((q.steps,), -float("inf")),
                                torch.zeros(q.steps, dtype=torch.bool), [[] for _ in range(q.steps)])
                for name, q in quantizers.items()}

    def replay(observe) -> None:  # the student over every recorded step
        hooks = [quantizer.register_forward_pre_hook(lambda module, args, name=name: observe(module, name, args[0]))
                 for name, quantizer in quantizers.items()]
        try:
            for recorded in trajectories:
                for index, timestep in enumerate(recorded.timesteps):
                    guided_output(student, recorded.latents[index], timestep, recorded.conditions, recorded.null,
                                  section.guidance_scale, scheduler)
        finally:
            for hook in hooks:
                hook.remove()

    was_training = student.training
    student.eval()
    for quantizer in quantizers.values():
        quantizer.enabled = False
    try:
        replay(lambda module, name, x: _observe(module, observed[name], x))
    finally:
        for quantizer in quantizers.values():
            quantizer.enabled = True
        student.train(was_training)
    return {name: _choose(quantizer, observed[name], fractions, section.norm_p)
            for name, quantizer in quantizers.items()}


def _choose(quantizer: ActivationQuantizer, observed: _Observed, fractions: torch.Tensor, norm_p: float) -> dict:
    scales, zeros = _candidate_tables(quantizer, observed, fractions)
    best = torch.zeros(quantizer.steps, dtype=torch.int64)
    for row, kept in enumerate(observed.kept):
        if kept:
            errors = _errors(quantizer, torch.cat(kept), scales[row], None if zeros is None else zeros[row], norm_p)
            best[row] = int(errors.argmin())  # the first minimum: the smallest clipping range among ties
    rows = torch.arange(quantizer.steps)
    scale = scales[rows, best]
    zero = None if zeros is None else zeros[rows, best]
    # A row that saw no activation (a step never sampled) keeps the mean of the calibrated ones.
    if not bool(observed.seen.all()) and bool(observed.seen.any()):
        scale = torch.where(observed.seen, scale, scale[observed.seen].mean())
        if zero is not None:
            zero = torch.where(observed.seen, zero, torch.round(zero[observed.seen].mean()))
    quantizer.set_table(scale, zero)
    chosen = quantizer.deployed_scale()
    return {"steps": quantizer.steps, "scale_min": float(chosen.min()), "scale_max": float(chosen.max()),
            "clip_fraction_mean": float(fractions[best].mean()), "rows_without_data": int((~observed.seen).sum())}
