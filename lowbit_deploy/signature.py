"""The deployed graph's signature: the one place that spells out the inputs and outputs of a deployed UNet.

Export names the ONNX inputs from it, build derives TensorRT optimisation profiles from it, every runtime checks and
orders its feeds with it, validate draws parity inputs from it and the sampler drives a model through it. Nothing
else writes input names, dtypes or shapes.

The time input is either the float ``timestep`` (the UNet computes its time features) or an int64 ``step_index``
into the inference schedule the time features were cached for (BitsFusion's cached time embeddings); the timestep
each index stands for is part of the signature and is written into the ONNX metadata and the report.

Added conditions come from the UNet config (:func:`added_conditions_for`): SDXL's ``text_embeds`` and ``time_ids``
(``addition_embed_type: text_time``) and class-conditional UNets' ``class_labels``; they follow
``encoder_hidden_states`` as graph inputs and reach diffusers' call as :func:`unet_keywords` spells them.

Importing this module is cheap (no torch); the helpers that build tensors import torch when called.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Mapping, Sequence

from .errors import UserError

if TYPE_CHECKING:
    import torch

# Version 2 adds added conditions (and their value range); a signature without them is still written as version 1,
# so older readers keep reading what they could deploy.
SIGNATURE_VERSION = 2
READABLE_VERSIONS = (1, 2)
OUTPUT_NAME = "noise_pred"
BATCH_AXIS = "batch"
TOKENS_AXIS = "tokens"


class TimeInput(str, Enum):
    """What the deployed graph takes to say where in the diffusion process a sample is."""

    TIMESTEP = "timestep"      # float32 [batch]: the scheduler's timestep value, any value in [0, T_train)
    STEP_INDEX = "step_index"  # int64 [batch]: index i into ``step_timesteps`` (cached time features)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` holds ints for fixed axes and axis names for dynamic ones."""

    name: str
    dtype: str  # numpy dtype name: "float32" | "int64"
    shape: tuple[int | str, ...]
    meaning: str
    high: int | None = None  # integer inputs that index a table (class labels): valid values are 0..high-1

    def dynamic_axes(self) -> dict[int, str]:
        return {axis: dim for axis, dim in enumerate(self.shape) if isinstance(dim, str)}

    def concrete_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(sizes[dim] if isinstance(dim, str) else dim for dim in self.shape)


@dataclass(frozen=True)
class DeployedSignature:
    """Inputs/outputs of one deployed UNet. Build it with :func:`signature_for` or read it with :meth:`from_json`."""

    sample_shape: tuple[int, int, int]            # (channels, height, width) of one latent / image
    seq_len: int                                  # tokens of encoder_hidden_states the model was validated with
    cross_attention_dim: int
    time_input: TimeInput = TimeInput.TIMESTEP
    step_timesteps: tuple[int, ...] = ()          # timestep of each step index (STEP_INDEX only)
    schedule: str = ""                            # how step_timesteps were made, e.g. "ddim, 20 steps"
    added_conditions: tuple[TensorSpec, ...] = field(default_factory=tuple)  # e.g. SDXL text_embeds / time_ids

    def __post_init__(self) -> None:
        if (self.time_input is TimeInput.STEP_INDEX) != bool(self.step_timesteps):
            raise ValueError("a step_index signature needs step_timesteps, and only it")

    # ---- the specs -------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.step_timesteps)

    @property
    def time_spec(self) -> TensorSpec:
        if self.time_input is TimeInput.STEP_INDEX:
            return TensorSpec("step_index", "int64", (BATCH_AXIS,),
                              f"index into the {self.num_steps}-step inference schedule ({self.schedule}); "
                              f"index i means timestep step_timesteps[i]")
        return TensorSpec("timestep", "float32", (BATCH_AXIS,), "diffusion timestep value per batch item")

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("sample", "float32", (BATCH_AXIS, *self.sample_shape), "noisy latent (or image) x_t"),
            self.time_spec,
            TensorSpec("encoder_hidden_states", "float32", (BATCH_AXIS, TOKENS_AXIS, self.cross_attention_dim),
                       "cross-attention conditions (prompt embeddings)"),
            *self.added_conditions,
        )

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(OUTPUT_NAME, "float32", (BATCH_AXIS, *self.sample_shape),
                           "the model output the scheduler's prediction_type names (noise for epsilon models)"),)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {spec.name: spec.dynamic_axes() for spec in (*self.inputs, *self.outputs)}

    def shape_ranges(self, batches: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape of every input for TensorRT profiles: batch varies, tokens stay ``seq_len``."""
        return {spec.name: tuple(spec.concrete_shape({BATCH_AXIS: b, TOKENS_AXIS: self.seq_len}) for b in batches)
                for spec in self.inputs}

    # ---- feeds -----------------------------------------------------------------------------------------------
    def time_feed(self, timesteps: "torch.Tensor", step_index: int | None, batch: int) -> "torch.Tensor":
        """The time input for one sampler step: the timestep values, or the step index the schedule gives them."""
        import torch

        if self.time_input is TimeInput.TIMESTEP:
            return timesteps.reshape(-1).float().expand(batch).contiguous()
        if step_index is None:
            raise ValueError("this model takes a step index; drive it with its own schedule")
        return torch.full((batch,), int(step_index), dtype=torch.int64)

    def feeds(self, sample: "torch.Tensor", time: "torch.Tensor", encoder_hidden_states: "torch.Tensor",
              **added: "torch.Tensor") -> dict[str, "torch.Tensor"]:
        """Named, checked inputs in graph order (dense tensors of the declared dtypes)."""
        import torch

        values = {"sample": sample, self.time_spec.name: time, "encoder_hidden_states": encoder_hidden_states,
                  **added}
        feeds = {}
        for spec in self.inputs:
            if spec.name not in values:
                raise UserError(f"input {spec.name!r} is missing; this model takes {', '.join(self.input_names)}")
            feeds[spec.name] = values[spec.name].to(getattr(torch, spec.dtype)).contiguous()
        self.check_feeds(feeds)
        return feeds

    def check_feeds(self, feeds: Mapping[str, "torch.Tensor"]) -> None:
        """Refuse inputs the graph would misread: unknown names, wrong rank, step indexes outside the schedule."""
        unknown = sorted(set(feeds) - set(self.input_names))
        if unknown:
            raise UserError(f"unknown input(s) {', '.join(unknown)}; this model takes {', '.join(self.input_names)}")
        batch = feeds["sample"].shape[0]
        for spec in self.inputs:
            value = feeds[spec.name]
            if value.dim() != len(spec.shape) or value.shape[0] != batch:
                raise UserError(f"input {spec.name!r} has shape {tuple(value.shape)}; expected "
                                f"{spec.shape} with batch {batch}")
        for spec in self.added_conditions:
            value = feeds[spec.name]
            if any(isinstance(dim, int) and dim != size for dim, size in zip(spec.shape, value.shape)):
                raise UserError(f"input {spec.name!r} has shape {tuple(value.shape)}; this model takes "
                                f"{list(spec.shape)} ({spec.meaning})")
            if spec.high is not None and value.numel() and (int(value.min()) < 0 or int(value.max()) >= spec.high):
                raise UserError(f"{spec.name} {value.tolist()} is out of range: this model has {spec.high} "
                                f"classes (0..{spec.high - 1})")
        if self.time_input is TimeInput.STEP_INDEX:
            index = feeds["step_index"]
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_steps):
                raise UserError(f"step_index {index.tolist()} is out of range: this model's time features are cached "
                                f"for {self.num_steps} steps ({self.schedule}), so indexes run 0..{self.num_steps - 1}; "
                                f"sample with that schedule or re-export with another `schedule.num_steps`")

    def random_feeds(self, batch: int, generator: "torch.Generator", conditions) -> dict:
        """Seeded parity inputs spanning the time range (every step index, or timesteps in [0, 1000)).

        ``conditions`` is the ``encoder_hidden_states`` tensor or a
        :class:`~lowbit_deploy.models.conditioning.Conditions`; added conditions it does not carry are drawn here
        (after the sample and time, so models without them draw what they always drew)."""
        import torch

        from .models.conditioning import as_conditions, draw_added

        conditions = as_conditions(conditions)
        sample = torch.randn(batch, *self.sample_shape, generator=generator)
        if self.time_input is TimeInput.STEP_INDEX:
            time = torch.randint(0, self.num_steps, (batch,), generator=generator)
        else:
            time = torch.randint(0, 1000, (batch,), generator=generator).float()
        missing = tuple(spec for spec in self.added_conditions if spec.name not in conditions.added)
        added = {**conditions.added, **draw_added(missing, batch, generator, self.sample_shape)}
        return self.feeds(sample, time, conditions.encoder_hidden_states.float(), **added)

    # ---- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        added = [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "meaning": s.meaning,
                  **({"high": s.high} if s.high is not None else {})} for s in self.added_conditions]
        return {"version": SIGNATURE_VERSION if added else 1, "sample_shape": list(self.sample_shape),
                "seq_len": self.seq_len, "cross_attention_dim": self.cross_attention_dim,
                "time_input": self.time_input.value, "step_timesteps": list(self.step_timesteps),
                "schedule": self.schedule, "added_conditions": added,
                "inputs": [spec.name for spec in self.inputs], "outputs": [OUTPUT_NAME]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping) -> "DeployedSignature":
        if data.get("version") not in READABLE_VERSIONS:
            raise UserError(f"deployed signature version {data.get('version')!r} is not readable by this "
                            f"lowbit-deploy (reads {', '.join(map(str, READABLE_VERSIONS))}); re-export with this "
                            f"version")
        added = tuple(TensorSpec(s["name"], s["dtype"], tuple(s["shape"]), s["meaning"], s.get("high"))
                      for s in data.get("added_conditions", []))
        return cls(tuple(data["sample_shape"]), int(data["seq_len"]), int(data["cross_attention_dim"]),
                   TimeInput(data["time_input"]), tuple(int(t) for t in data["step_timesteps"]),
                   data.get("schedule", ""), added)

    @classmethod
    def from_json(cls, text: str) -> "DeployedSignature":
        return cls.from_dict(json.loads(text))

    def describe(self) -> list[str]:
        """One line per input/output, for reports and ``--help``-style listings."""
        rows = [f"{spec.name}: {spec.dtype} {list(spec.shape)} - {spec.meaning}" for spec in (*self.inputs,
                                                                                             *self.outputs)]
        if self.time_input is TimeInput.STEP_INDEX:
            rows.append(f"step_timesteps ({self.schedule}): {list(self.step_timesteps)}")
        return rows


# ---- added conditions: read from the UNet config ---------------------------------------------------------------
# SDXL's micro-conditioning: original (height, width), crop (top, left), target (height, width) in pixels.
TIME_IDS = 6
# Latent UNets (SD, SDXL) denoise latents 8x smaller than the image their time_ids describe.
LATENT_SCALE = 8
# diffusers' UNet2DConditionModel keyword each added condition is passed with (None: a keyword of its own).
UNET_ARGUMENT: dict[str, str | None] = {"text_embeds": "added_cond_kwargs", "time_ids": "added_cond_kwargs",
                                        "class_labels": None}
_SUPPORTED = ("`addition_embed_type: text_time` (SDXL: text_embeds, time_ids), `num_class_embeds` with "
              "`class_embed_type` unset (class indexes), and `class_embed_type` projection / simple_projection / "
              "identity (class vectors)")


def _refusal(key: str, value, why: str) -> UserError:
    return UserError(f"this UNet's config has {key}={value!r}: {why}. lowbit-deploy deploys UNets conditioned by "
                     f"timestep and encoder_hidden_states plus {_SUPPORTED}; use such a checkpoint")


def check_output_channels(config) -> None:
    """The deployed output has the sample's shape (``OUTPUT_NAME``); a UNet whose output has other channels (inpainting
    takes 9 and returns 4, learned-variance models return twice their input) is refused with the key named."""
    in_channels, out_channels = config.get("in_channels", 4), config.get("out_channels", 4)
    if out_channels != in_channels:
        raise _refusal("out_channels", out_channels, f"its output has {out_channels} channels for {in_channels} "
                       f"input channels (inpainting or learned variance), and the deployed output has the input's "
                       f"shape")


def _time_embed_dim(config) -> int:
    return int(config.get("time_embedding_dim") or 4 * config["block_out_channels"][0])


def _text_time(config) -> tuple[TensorSpec, ...]:
    per_id = config.get("addition_time_embed_dim")
    total = config.get("projection_class_embeddings_input_dim")
    if not per_id or not total or int(total) <= TIME_IDS * int(per_id):
        raise _refusal("addition_embed_type", "text_time", f"it needs addition_time_embed_dim and "
                       f"projection_class_embeddings_input_dim > {TIME_IDS} x addition_time_embed_dim (got "
                       f"{per_id!r} and {total!r})")
    width = int(total) - TIME_IDS * int(per_id)
    return (TensorSpec("text_embeds", "float32", (BATCH_AXIS, width),
                       "pooled text embedding (SDXL added condition; zeros for the empty prompt)"),
            TensorSpec("time_ids", "float32", (BATCH_AXIS, TIME_IDS),
                       "SDXL micro-conditioning: original height, width, crop top, left, target height, width "
                       "(pixels)"))


def _class_indexes(config) -> tuple[TensorSpec, ...]:
    classes = config.get("num_class_embeds")
    if classes is None:
        return ()
    return (TensorSpec("class_labels", "int64", (BATCH_AXIS,),
                       f"class index per batch item, 0..{int(classes) - 1}; the last, {int(classes) - 1}, stands "
                       f"for 'no class' (classifier-free guidance, dropped conditions)", high=int(classes)),)


def _class_vectors(width_of):
    def specs(config) -> tuple[TensorSpec, ...]:
        width = width_of(config)
        if not width:
            raise _refusal("class_embed_type", config["class_embed_type"], "its class vector width is not in the "
                           "config (projection_class_embeddings_input_dim)")
        return (TensorSpec("class_labels", "float32", (BATCH_AXIS, int(width)),
                           f"class conditioning vector (class_embed_type {config['class_embed_type']}; zeros stand "
                           f"for 'no class')"),)
    return specs


# Registries: the config value -> the added inputs it makes. A new family adds an entry (and, where it needs one,
# a draw in models/conditioning.py's ADDED_DRAWS).
ADDITION_EMBEDDINGS = {None: lambda config: (), "text_time": _text_time}
CLASS_EMBEDDINGS = {
    None: _class_indexes,
    "projection": _class_vectors(lambda config: config.get("projection_class_embeddings_input_dim")),
    "simple_projection": _class_vectors(lambda config: config.get("projection_class_embeddings_input_dim")),
    "identity": _class_vectors(_time_embed_dim),
}
ENCODER_HIDDEN_STATES = (None, "text_proj")  # encoder_hid_dim_type values that keep the plain text input


def added_conditions_for(config) -> tuple[TensorSpec, ...]:
    """The inputs a UNet2DConditionModel ``config`` (its config.json as a dict, or ``unet.config``) takes besides
    sample, time and encoder_hidden_states; a UserError naming the key for configs whose extra inputs are not
    supported."""
    if config.get("time_cond_proj_dim") is not None:
        raise _refusal("time_cond_proj_dim", config.get("time_cond_proj_dim"),
                       "it takes a guidance-scale embedding (timestep_cond, LCM distilled models)")
    if config.get("encoder_hid_dim_type") not in ENCODER_HIDDEN_STATES:
        raise _refusal("encoder_hid_dim_type", config.get("encoder_hid_dim_type"),
                       "it takes image embeddings (IP-Adapter / Kandinsky)")
    if config.get("class_embed_type") == "timestep":
        raise _refusal("class_embed_type", "timestep", "its class labels go through the UNet's timestep projection, "
                       "which lowbit-deploy replaces with a step-index lookup for cached time features")
    addition, class_type = config.get("addition_embed_type"), config.get("class_embed_type")
    if addition not in ADDITION_EMBEDDINGS:
        raise _refusal("addition_embed_type", addition, "its added embedding takes inputs lowbit-deploy does not feed")
    if class_type not in CLASS_EMBEDDINGS:
        raise _refusal("class_embed_type", class_type, "its class embedding takes inputs lowbit-deploy does not feed")
    return (*ADDITION_EMBEDDINGS[addition](config), *CLASS_EMBEDDINGS[class_type](config))


def conditions_reach_time_embedding(config) -> bool:
    """Whether the UNet adds conditions to the time embedding (class / SDXL embeddings), so that every ResBlock's
    time projection depends on them and not on the timestep alone."""
    return (config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None
            or config.get("addition_embed_type") is not None)


def unet_keywords(added: Mapping) -> dict:
    """Added conditions by input name -> the keywords of diffusers' UNet2DConditionModel call
    (``added_cond_kwargs={"text_embeds": ..., "time_ids": ...}``, ``class_labels=...``)."""
    keywords: dict = {}
    for name, value in added.items():
        group = UNET_ARGUMENT[name]
        if group is None:
            keywords[name] = value
        else:
            keywords.setdefault(group, {})[name] = value
    return keywords


def encoder_states_width(config) -> int:
    """Width of the ``encoder_hidden_states`` input a UNet config takes (one source for loading and export)."""
    # diffusers projects encoder_hid_dim-wide states to cross_attention_dim when encoder_hid_dim is set (text_proj)
    dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    if isinstance(dim, (list, tuple)):
        if len(set(dim)) != 1:
            raise UserError(f"per-block cross_attention_dim {list(dim)} is not supported; use a checkpoint with one "
                            f"cross-attention width")
        dim = dim[0]
    return int(dim)


def signature_for(unet, seq_len: int, step_timesteps: Sequence[int] = (), schedule: str = "") -> DeployedSignature:
    """The signature of ``unet`` deployed with (``step_timesteps`` given) or without cached time features."""
    from .models import sample_shape

    config = unet.config
    check_output_channels(config)
    added = added_conditions_for(config)
    time_input = TimeInput.STEP_INDEX if step_timesteps else TimeInput.TIMESTEP
    return DeployedSignature(sample_shape(unet), int(seq_len), encoder_states_width(config), time_input,
                             tuple(int(t) for t in step_timesteps), schedule, added)


def deployed_signature(unet, seq_len: int, plan, scheduler_config: dict, schedule) -> DeployedSignature:
    """The signature ``unet`` is deployed with under ``plan``: a step index into ``schedule`` (a recipe's
    :class:`~lowbit_deploy.recipes.ScheduleSection`) when the plan caches time features or selects activation
    scales per step, else a float timestep. Refuses plans that cache what the model's conditions change."""
    if plan.caches_time:
        from .export.time_cache import check_cacheable

        check_cacheable(unet.config, plan)
    if not plan.needs_step_index:
        return signature_for(unet, seq_len)
    from .validate.sampling import schedule_timesteps

    return signature_for(unet, seq_len, schedule_timesteps(scheduler_config, schedule.num_steps),
                         schedule.describe())
