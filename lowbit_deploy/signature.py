"""The deployed graph's signature: the one place that spells out the inputs and outputs of a deployed UNet.

Export names the ONNX inputs from it, build derives TensorRT optimisation profiles from it, every runtime checks and
orders its feeds with it, validate draws parity inputs from it and the sampler drives a model through it. Nothing
else writes input names, dtypes or shapes.

The time input is either the float ``timestep`` (the UNet computes its time features) or an int64 ``step_index``
into the inference schedule the time features were cached for (BitsFusion's cached time embeddings); the timestep
each index stands for is part of the signature and is written into the ONNX metadata and the report.

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

SIGNATURE_VERSION = 1
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
        if self.time_input is TimeInput.STEP_INDEX:
            index = feeds["step_index"]
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_steps):
                raise UserError(f"step_index {index.tolist()} is out of range: this model's time features are cached "
                                f"for {self.num_steps} steps ({self.schedule}), so indexes run 0..{self.num_steps - 1}; "
                                f"sample with that schedule or re-export with another `schedule.num_steps`")

    def random_feeds(self, batch: int, generator: "torch.Generator", conditions: "torch.Tensor") -> dict:
        """Seeded parity inputs spanning the time range (every step index, or timesteps in [0, 1000))."""
        import torch

        sample = torch.randn(batch, *self.sample_shape, generator=generator)
        if self.time_input is TimeInput.STEP_INDEX:
            time = torch.randint(0, self.num_steps, (batch,), generator=generator)
        else:
            time = torch.randint(0, 1000, (batch,), generator=generator).float()
        return self.feeds(sample, time, conditions.float())

    # ---- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": SIGNATURE_VERSION, "sample_shape": list(self.sample_shape), "seq_len": self.seq_len,
                "cross_attention_dim": self.cross_attention_dim, "time_input": self.time_input.value,
                "step_timesteps": list(self.step_timesteps), "schedule": self.schedule,
                "added_conditions": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "meaning": s.meaning}
                                     for s in self.added_conditions],
                "inputs": [spec.name for spec in self.inputs], "outputs": [OUTPUT_NAME]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping) -> "DeployedSignature":
        if data.get("version") != SIGNATURE_VERSION:
            raise UserError(f"deployed signature version {data.get('version')!r} is not readable by this "
                            f"lowbit-deploy (reads {SIGNATURE_VERSION}); re-export with this version")
        added = tuple(TensorSpec(s["name"], s["dtype"], tuple(s["shape"]), s["meaning"])
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


def signature_for(unet, seq_len: int, step_timesteps: Sequence[int] = (), schedule: str = "") -> DeployedSignature:
    """The signature of ``unet`` deployed with (``step_timesteps`` given) or without cached time features."""
    from .models import sample_shape

    config = unet.config
    unsupported = {key: config.get(key) for key in ("class_embed_type", "addition_embed_type", "num_class_embeds",
                                                    "time_cond_proj_dim")
                   if config.get(key) is not None}
    if unsupported:
        details = ", ".join(f"{key}={value!r}" for key, value in unsupported.items())
        raise UserError(f"this UNet takes added conditions ({details}); lowbit-deploy deploys UNets conditioned by "
                        f"timestep and encoder_hidden_states only for now (SD1.x/2.x layout). Use such a "
                        f"checkpoint, or remove the added-condition embedding from the model config")
    time_input = TimeInput.STEP_INDEX if step_timesteps else TimeInput.TIMESTEP
    return DeployedSignature(sample_shape(unet), int(seq_len), int(config.cross_attention_dim), time_input,
                             tuple(int(t) for t in step_timesteps), schedule)


def deployed_signature(unet, seq_len: int, plan, scheduler_config: dict, schedule) -> DeployedSignature:
    """The signature ``unet`` is deployed with under ``plan``: a step index into ``schedule`` (a recipe's
    :class:`~lowbit_deploy.recipes.ScheduleSection`) when the plan caches time features or selects activation
    scales per step, else a float timestep."""
    if not plan.needs_step_index:
        return signature_for(unet, seq_len)
    from .validate.sampling import schedule_timesteps

    return signature_for(unet, seq_len, schedule_timesteps(scheduler_config, schedule.num_steps),
                         schedule.describe())
