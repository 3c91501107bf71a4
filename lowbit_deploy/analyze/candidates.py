"""Measuring one candidate: the float UNet with a single layer quantized (optionally briefly tuned), sampled with
the recipe's schedule and compared with the float model's samples from the same seeds.

A :class:`CandidateEvaluator` loads the model and computes the float reference once; worker processes each hold
one (see :mod:`lowbit_deploy.analyze.runner`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..quant.apply import apply_plan
from ..quant.plan import LayerDecision, LayerRole, QuantPlan, layer_inventory
from ..validate.sampling import schedule_timesteps
from ..recipes import Recipe

# Which semantic term a model gets (written into sensitivity.json and report.md).
METRIC_CLASSIFIER = "digit-classifier confidence on the prompted class (FP minus candidate)"
METRIC_NONE = "none (this model has no classifier; bits follow the sample MSE only)"


def metric_for(bundle) -> str:
    """The semantic term this model gets: the digit classifier where it has one and class prompts to judge."""
    judged = bundle.classifier is not None and bundle.condition.num_classes is not None
    return METRIC_CLASSIFIER if judged else METRIC_NONE


def settings_key(recipe: Recipe, model_source: str) -> dict:
    """Everything a candidate's measurement depends on. Cached results are reused only under the same key; eta, the
    percentiles and the target only act afterwards, so changing them re-uses every candidate."""
    section = recipe.analyze
    key = {"model": model_source, "grid": section.grid.value, "num_samples": section.num_samples,
           "seed": section.seed, "num_steps": recipe.schedule.num_steps,
           "guidance_scale": recipe.validate_.sampling.guidance_scale,
           "scale_init": recipe.quantize.scale_init.value,
           "scale_init_iterations": recipe.quantize.scale_init_iterations, "tune_steps": section.tune_steps}
    # Other weight files or other prompts are another model to measure (keys absent when unset: old caches stay).
    key.update({name: value for name, value in (("variant", recipe.model.variant),
                                                ("prompts_file", recipe.conditions.prompts_file)) if value})
    if section.tune_steps:
        train = recipe.train
        key["tune"] = {"lr": train.lr, "batch_size": train.batch_size, "data": train.data.value,
                       "timestep_sampling": train.timestep_sampling.value, "beta": [train.beta_alpha, train.beta_beta],
                       "condition_drop_prob": train.condition_drop_prob}
    return key


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def single_layer_plan(inventory, total_params: int, layer: str, grid, bits: int) -> QuantPlan:
    """Every layer float except ``layer`` (time layers too: caching is lossless, so it changes no sample)."""
    decisions = tuple(
        LayerDecision(info.name, info.layer_type, info.weight_numel, info.out_features, LayerRole.QUANTIZED, grid,
                      bits) if info.name == layer else
        LayerDecision(info.name, info.layer_type, info.weight_numel, info.out_features, LayerRole.FLOAT)
        for info in inventory)
    return QuantPlan(decisions, total_params, f"analyze candidate {layer} @ {bits} bits")


def tune_layer(student, teacher, layer: str, bundle, train, steps: int, seed: int,
               schedule: Sequence[int] = ()) -> float:
    """BitsFusion's brief per-candidate QAT: ``steps`` AdamW steps on this layer's weight and scale only, matching
    the float teacher's noise prediction (train.lr / batch_size / data / timestep sampling / condition dropping).
    Returns the last loss."""
    from diffusers import DDPMScheduler

    from ..models.conditioning import Conditions
    from ..qat.data import make_sampler
    from ..qat.step import sample_timesteps

    module = student.get_submodule(layer)
    parameters = [module.weight, module.weight_quantizer.scale]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=train.lr, weight_decay=0.0)
    sampler = make_sampler(train.data, bundle)
    noise_scheduler = DDPMScheduler.from_config(bundle.scheduler_config)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for _ in range(steps):
        batch = sampler(train.batch_size, generator)
        drop = torch.rand(train.batch_size, generator=generator) < train.condition_drop_prob
        conditions = Conditions(batch.encoder_hidden_states, batch.added).replace_rows(
            drop, bundle.condition.null_conditions(train.batch_size)).unet_keywords()
        timesteps = sample_timesteps(train, train.batch_size, num_train_timesteps, generator, schedule)
        noisy = noise_scheduler.add_noise(batch.x0, torch.randn(batch.x0.shape, generator=generator), timesteps)
        with torch.no_grad():
            target = teacher(noisy, timesteps, **conditions).sample
        loss = F.mse_loss(student(noisy, timesteps, **conditions).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for parameter in parameters:
        parameter.requires_grad_(False)
    return float(loss.detach())


@dataclass
class Reference:
    images: torch.Tensor
    confidence: float | None
    accuracy: float | None


class CandidateEvaluator:
    """The float model, its sampling conditions and its reference samples; scores candidates one by one."""

    def __init__(self, recipe: Recipe, model_path: str | None, bundle=None):
        from ..models import load_recipe_model
        from ..signature import signature_for

        self.recipe = recipe
        self.section = recipe.analyze
        self.bundle = bundle if bundle is not None else load_recipe_model(recipe, model_path)
        self.inventory, self.total_params = layer_inventory(self.bundle.unet)
        condition = self.bundle.condition
        count = self.section.num_samples
        if condition.num_classes is not None:
            # One prompt per class, cycling, so every class is judged.
            self.labels = torch.tensor([index % condition.num_classes for index in range(count)])
            self.cond = condition.label_conditions(self.labels.tolist(), self.section.seed)
        else:
            self.labels = None
            self.cond = condition.sample_conditions(count, torch.Generator().manual_seed(self.section.seed))
        self.null = condition.null_conditions(count)
        self.signature = signature_for(self.bundle.unet, condition.seq_len)
        self.metric = metric_for(self.bundle)
        self.judged = self.metric == METRIC_CLASSIFIER
        self.reference = self._reference()

    def _sample(self, unet) -> torch.Tensor:
        from ..validate.sampling import sample, unet_runner

        return sample(unet_runner(unet), self.signature, self.cond, self.null,
                      scheduler_config=self.bundle.scheduler_config, num_steps=self.recipe.schedule.num_steps,
                      guidance_scale=self.recipe.validate_.sampling.guidance_scale, seed=self.section.seed)

    @torch.no_grad()
    def _judge(self, images: torch.Tensor) -> tuple[float | None, float | None]:
        if not self.judged:
            return None, None
        classifier = self.bundle.classifier.eval()
        probabilities = torch.softmax(classifier(images), dim=1)
        picked = probabilities[torch.arange(images.shape[0]), self.labels]
        accuracy = (probabilities.argmax(dim=1) == self.labels).float().mean()
        return float(picked.mean()), float(accuracy)

    def _reference(self) -> Reference:
        images = self._sample(self.bundle.unet)
        return Reference(images, *self._judge(images))

    def evaluate(self, layer: str, bits: int) -> dict:
        """One candidate's record (JSON-ready): MSE of its samples vs the reference and its semantic drop."""
        started = time.perf_counter()
        student = copy.deepcopy(self.bundle.unet)
        plan = single_layer_plan(self.inventory, self.total_params, layer, self.section.grid, bits)
        weight_mse = apply_plan(student, plan, scale_init=self.recipe.quantize.scale_init,
                                iterations=self.recipe.quantize.scale_init_iterations)[layer]
        tune_loss = None
        if self.section.tune_steps:
            with torch.enable_grad():
                schedule = schedule_timesteps(self.bundle.scheduler_config, self.recipe.schedule.num_steps)
                tune_loss = tune_layer(student, self.bundle.unet, layer, self.bundle, self.recipe.train,
                                       self.section.tune_steps, self.section.seed, schedule)
        student.eval()
        images = self._sample(student)
        confidence, accuracy = self._judge(images)
        info = next(item for item in self.inventory if item.name == layer)
        return {
            "layer": layer, "bits": bits, "grid": self.section.grid.value, "weight_numel": info.weight_numel,
            "mse": float(torch.mean((images.double() - self.reference.images.double()) ** 2)),
            "semantic_drop": None if confidence is None else self.reference.confidence - confidence,
            "accuracy_drop": None if accuracy is None else self.reference.accuracy - accuracy,
            "confidence": confidence, "accuracy": accuracy, "weight_mse": weight_mse, "tune_loss": tune_loss,
            "seconds": round(time.perf_counter() - started, 3),
        }
