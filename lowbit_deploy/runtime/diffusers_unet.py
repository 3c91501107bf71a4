"""A diffusers drop-in: a deployed file (``model.onnx`` or ``model.engine``) behind the UNet2DConditionModel call.

``DeployedUNet2D("runs/demo/model.onnx")(sample, timestep, encoder_hidden_states)`` returns a
``UNet2DConditionOutput``, so a diffusers scheduler loop (or the project's sampler, through
``validate.sampling.unet_runner``) drives a deployed model as it drives the float one. Callers always pass timestep
values; a model with cached time features (BitsFusion) takes a step index, so each timestep is looked up in the
schedule the features were cached for -- exactly, since a timestep between two cached rows has no features.

Added conditions the deployed graph takes (its signature's ``added_conditions``: SDXL ``text_embeds`` / ``time_ids``
from ``added_cond_kwargs``, ``class_labels``) are fed by name; they are required when the graph has them. Other
arguments that would change the math (LoRA scales, ControlNet residuals, IP-Adapter embeddings, attention masks)
are refused: the deployed graph has no input for them, and ignoring them would silently produce other images than
the caller asked for.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import UserError
from ..signature import UNET_ARGUMENT, DeployedSignature, TimeInput
from .runners import Runner, open_runner

# diffusers arguments the deployed graph has no input for, and what they carry (for the error message).
REFUSED_ARGUMENTS: dict[str, str] = {
    "class_labels": "class-embedding labels",
    "timestep_cond": "a timestep condition embedding (LCM guidance embedding)",
    "attention_mask": "an attention mask",
    "encoder_attention_mask": "an encoder attention mask",
    "cross_attention_kwargs": "attention-processor arguments (LoRA scale, IP-Adapter)",
    "added_cond_kwargs": "added conditions (SDXL text_embeds / time_ids, IP-Adapter image embeddings)",
    "down_block_additional_residuals": "ControlNet down-block residuals",
    "mid_block_additional_residual": "a ControlNet mid-block residual",
    "down_intrablock_additional_residuals": "T2I-Adapter residuals",
}


def _is_unset(value: Any) -> bool:
    # Pipelines pass None or an empty dict/tuple when a feature is off; anything else carries content.
    return value is None or (isinstance(value, (dict, tuple, list)) and len(value) == 0)


def time_input_for(signature: DeployedSignature, timestep: Any, batch: int) -> torch.Tensor:
    """The graph's time input for a diffusers ``timestep`` (number, 0-d or 1-d tensor) broadcast to ``batch``: the
    float timestep, or the int64 index of each timestep in ``signature.step_timesteps``."""
    values = torch.as_tensor(timestep).detach().to("cpu")
    if values.dim() > 1:
        raise UserError(f"timestep has shape {tuple(values.shape)}; pass a number, a 0-d tensor or one value per "
                        f"sample ([batch])")
    values = values.reshape(-1)
    if values.numel() == 1:
        values = values.expand(batch)
    elif values.numel() != batch:
        raise UserError(f"timestep has {values.numel()} values for a batch of {batch}; pass one value or one per "
                        f"sample")
    if signature.time_input is TimeInput.TIMESTEP:
        return values.float().contiguous()
    cached = torch.tensor(signature.step_timesteps, dtype=torch.float64)
    matches = values.double()[:, None] == cached[None, :]
    found = matches.any(dim=1)
    if not bool(found.all()):
        missing = sorted({float(v) for v in values[~found].tolist()})
        raise UserError(
            f"timestep(s) {', '.join(f'{v:g}' for v in missing)} not in this model's cached schedule "
            f"({signature.schedule}: timesteps {list(signature.step_timesteps)}); its time features exist only for "
            f"those. Drive it with the same scheduler and step count (e.g. DDIMScheduler with "
            f"set_timesteps({signature.num_steps}) on the model's scheduler config), or re-export with another "
            f"schedule.num_steps")
    # argmax returns the first maximal position: the first cached row holding that timestep.
    return matches.to(torch.int8).argmax(dim=1).to(torch.int64)


class DeployedUNet2D:
    """A deployed UNet with the ``UNet2DConditionModel`` call: ``unet(sample, timestep, encoder_hidden_states)``.

    ``source`` is a file (``.onnx`` -> ONNX Runtime, ``.engine`` -> TensorRT; ``backend`` and the other keywords as
    in :func:`~lowbit_deploy.runtime.runners.open_runner`) or an open :class:`Runner`. Outputs come back on the
    sample's device and dtype; the graph itself computes in float32."""

    def __init__(self, source: str | os.PathLike[str] | Runner, backend: str | None = None, **options: Any) -> None:
        if isinstance(source, (str, os.PathLike)):
            self.runner: Runner = open_runner(source, backend, **options)
        elif isinstance(source, Runner):
            if backend is not None or options:
                raise UserError("backend and runner options apply to a file; an open runner is used as it is")
            self.runner = source
        else:
            raise UserError(f"DeployedUNet2D takes a path to model.onnx / model.engine or a runner, not "
                            f"{type(source).__name__}")
        self.signature: DeployedSignature = self.runner.signature
        self.config = _unet_config(self.signature)

    # ---- what diffusers reads from a UNet ----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # every runner returns CPU tensors (an engine's output is copied back)

    @property
    def in_channels(self) -> int:
        return self.signature.sample_shape[0]

    @property
    def timestep_signature(self) -> DeployedSignature:
        """The signature as callers see it (a float ``timestep``), e.g. for ``validate.sampling.sample`` with
        ``unet_runner(drop_in)``; step indexes are looked up inside."""
        from dataclasses import replace

        return replace(self.signature, time_input=TimeInput.TIMESTEP, step_timesteps=(), schedule="")

    def __repr__(self) -> str:
        return (f"DeployedUNet2D({self.runner.name}, sample {list(self.signature.sample_shape)}, "
                f"time input {self.signature.time_input.value})")

    # ---- the call ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                 class_labels: Any = None, timestep_cond: Any = None, attention_mask: Any = None,
                 cross_attention_kwargs: Any = None, added_cond_kwargs: Any = None,
                 down_block_additional_residuals: Any = None, mid_block_additional_residual: Any = None,
                 down_intrablock_additional_residuals: Any = None, encoder_attention_mask: Any = None,
                 return_dict: bool = True):
        passed = {"class_labels": class_labels, "timestep_cond": timestep_cond, "attention_mask": attention_mask,
                  "cross_attention_kwargs": cross_attention_kwargs, "added_cond_kwargs": added_cond_kwargs,
                  "down_block_additional_residuals": down_block_additional_residuals,
                  "mid_block_additional_residual": mid_block_additional_residual,
                  "down_intrablock_additional_residuals": down_intrablock_additional_residuals,
                  "encoder_attention_mask": encoder_attention_mask}
        added = self._added_conditions(passed)
        given = [name for name, value in passed.items() if not _is_unset(value)]
        if given:
            details = "; ".join(f"{name} ({REFUSED_ARGUMENTS[name]})" for name in given)
            raise UserError(f"the deployed graph has no input for {details}: it takes "
                            f"{', '.join(self.signature.input_names)} only, so these would be ignored and change the "
                            f"images. Remove them (unload the LoRA / adapter / ControlNet), or deploy a model with "
                            f"them baked into its weights")
        if sample.dim() != 4 or tuple(sample.shape[1:]) != self.signature.sample_shape:
            raise UserError(f"sample has shape {tuple(sample.shape)}; this model denoises "
                            f"[batch, {', '.join(map(str, self.signature.sample_shape))}] (config.in_channels, "
                            f"config.sample_size)")
        batch = sample.shape[0]
        time = time_input_for(self.signature, timestep, batch)
        feeds = self.signature.feeds(sample.detach().cpu(), time, encoder_hidden_states.detach().cpu(), **added)
        output = self.runner(feeds).to(device=sample.device, dtype=sample.dtype)
        if not return_dict:
            return (output,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=output)

    forward = __call__

    def _added_conditions(self, passed: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Take the graph's added conditions out of ``passed`` (by diffusers' keyword), leaving only what the graph
        has no input for; a missing one is an error (the graph cannot run without it)."""
        added = {}
        for spec in self.signature.added_conditions:
            group = UNET_ARGUMENT[spec.name]
            if group is None:  # a keyword of its own (class_labels)
                value, passed[spec.name] = passed.get(spec.name), None
                where = spec.name
            else:  # an entry of a dict keyword (added_cond_kwargs)
                entries = dict(passed.get(group) or {})
                value, passed[group] = entries.pop(spec.name, None), entries
                where = f"{group}[{spec.name!r}]"
            if value is None:
                raise UserError(f"this model takes {spec.name} ({spec.meaning}); pass it as {where}")
            added[spec.name] = torch.as_tensor(value).detach().cpu()
        return added


def _unet_config(signature: DeployedSignature):
    """The UNet config keys schedulers and pipelines read, derived from the signature (attribute access, frozen)."""
    from diffusers.configuration_utils import FrozenDict

    channels, height, width = signature.sample_shape
    names = {spec.name for spec in signature.added_conditions}
    return FrozenDict(
        _class_name="DeployedUNet2D", in_channels=channels, out_channels=channels,
        sample_size=height if height == width else (height, width),
        cross_attention_dim=signature.cross_attention_dim,
        # Pipelines branch on these; the deployed graph takes only the added conditions its signature names.
        time_cond_proj_dim=None, class_embed_type=None, encoder_hid_dim_type=None,
        addition_embed_type="text_time" if "time_ids" in names else None,
        num_class_embeds=next((spec.high for spec in signature.added_conditions if spec.high is not None), None),
        time_input=signature.time_input.value, step_timesteps=list(signature.step_timesteps),
        schedule=signature.schedule,
    )


__all__ = ["DeployedUNet2D", "REFUSED_ARGUMENTS", "time_input_for"]
