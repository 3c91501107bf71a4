"""BitsFusion's cached time features: time-embedding outputs precomputed for every step of the inference schedule.

The time-embedding MLP and each ResBlock's time projection only ever see the T timesteps of the schedule, so their
outputs are computed once (with the model's own modules, at batch T) and stored as fp16 tables ``[T, features]``.
The deployed graph then takes an int64 step index and gathers rows instead of running those layers:

* ``time_proj`` (sinusoidal features) passes the step index through (the UNet casts it to float; exact for T < 2^24);
* ``time_embedding`` becomes :class:`CachedTimeEmbedding`: it gathers the embedding row (used only by time
  projections that are not cached) and publishes the index to the cached projections of this forward;
* every cached ``*.time_emb_proj`` becomes :class:`CachedTimeProjection`, which ignores its input and gathers its row.

The tables are the model's fp32 outputs rounded to fp16 (the stored type); the deployed model uses exactly those
values, widened to fp32, in torch and in every runtime. Against the uncached model the difference is that rounding
(relative 2^-11 at most per value), reported by export.

UNets with added conditions (SDXL's text_embeds / time_ids, class labels) add their embeddings to the time
embedding's output before any ResBlock sees it: only ``time_embedding.*`` can be cached there (the gathered row is
then summed with the input-dependent embeddings, which stay in the graph); caching a ``*.time_emb_proj`` would drop
the conditions and is refused (:func:`check_cacheable`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..quant.activation import StepContext, StepTracking
from ..quant.plan import TIME_EMBEDDING_PREFIX, LayerRole, QuantPlan
from ..signature import BATCH_AXIS, DeployedSignature, TimeInput, conditions_reach_time_embedding, unet_keywords

EMBEDDING_TABLE = "time_embedding"


def _check_range(index: torch.Tensor, num_steps: int, what: str) -> None:
    if not torch.jit.is_tracing() and index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_steps):
        raise UserError(f"step index {index.tolist()} is out of range: {what} {num_steps} steps (indexes "
                        f"0..{num_steps - 1})")


def as_index(step_index: torch.Tensor) -> torch.Tensor:
    """``step_index`` as int64, converted only where it is not: the tracer maps a tensor to its last recorded value,
    so a no-op ``.to(torch.int64)`` would put an int64 -> int64 Cast in front of every later use of the input."""
    return step_index if step_index.dtype == torch.int64 else step_index.to(torch.int64)


class StepIndexProjection(nn.Module):
    """Stands in for ``time_proj`` when time features are cached: the UNet's "timesteps" are step indexes, passed
    through unchanged (and published for the per-step activation scales)."""

    def __init__(self, context: StepContext) -> None:
        super().__init__()
        self.context = context

    def forward(self, step_index: torch.Tensor) -> torch.Tensor:
        self.context.index = as_index(step_index)
        return step_index


class StepIndexToTimestep(nn.Module):
    """Stands in for ``time_proj`` of a step-index model whose time features are computed (per-step activation scales
    without caching): publishes the index, then computes the features of the step's timestep (a float32 table
    gather: the value the sampler feeds a timestep-input model)."""

    def __init__(self, inner: nn.Module, step_timesteps: tuple[int, ...], context: StepContext) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("step_timestep", torch.tensor(step_timesteps, dtype=torch.float32))
        self.context = context

    def forward(self, step_index: torch.Tensor) -> torch.Tensor:
        index = as_index(step_index)
        _check_range(index, self.step_timestep.numel(), "this model's activation scales are trained for")
        self.context.index = index
        return self.inner(self.step_timestep.index_select(0, index))


def deployed_step_context(unet: nn.Module, signature: DeployedSignature) -> StepContext | None:
    """The StepContext the deployed graph publishes its ``step_index`` input into (None for a timestep signature).
    Caching already put a :class:`StepIndexProjection` in place; otherwise ``time_proj`` (unwrapped from training's
    :class:`~lowbit_deploy.quant.activation.StepTracking`) is fed the step's timestep."""
    if signature.time_input is not TimeInput.STEP_INDEX:
        return None
    projection = unet.time_proj
    if isinstance(projection, (StepIndexProjection, StepIndexToTimestep)):
        return projection.context
    inner = projection.inner if isinstance(projection, StepTracking) else projection
    context = StepContext()
    unet.time_proj = StepIndexToTimestep(inner, signature.step_timesteps, context)
    return context


def _widened(table: torch.Tensor) -> torch.Tensor:
    """The stored table in the type the model computes in: fp16 -> float32 (the deployed graph's Cast); a float64
    twin (validate/floor.py) keeps float64, so the embedding meets float64 layers (SDXL's added embedding, uncached
    time projections) in their type."""
    return table.to(torch.promote_types(table.dtype, torch.float32))


class CachedTimeEmbedding(nn.Module):
    def __init__(self, table: torch.Tensor | None, context: StepContext, num_steps: int,
                 width: int) -> None:
        super().__init__()
        # Without a consumer the embedding table is not stored; the output is then a zero row that nothing reads.
        self.register_buffer("table", table if table is not None else torch.zeros(1, width, dtype=torch.float16))
        self.has_table = table is not None
        self.context = context
        self.num_steps = num_steps

    def forward(self, step_index: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        index = as_index(step_index)
        _check_range(index, self.num_steps, "time features are cached for")
        self.context.index = index
        rows = index if self.has_table else torch.zeros_like(index)
        return _widened(self.table).index_select(0, rows)


class CachedTimeProjection(nn.Module):
    def __init__(self, table: torch.Tensor, context: StepContext) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.context = context

    def forward(self, time_features: torch.Tensor) -> torch.Tensor:
        del time_features  # the row is looked up by step index; the embedding it would be computed from is unused
        if self.context.index is None:
            raise RuntimeError("CachedTimeProjection ran before the time embedding published the step index")
        return _widened(self.table).index_select(0, self.context.index)


def check_cacheable(config, plan: QuantPlan) -> None:
    """Refuse a plan that caches ResBlock time projections of a UNet whose conditions reach them."""
    projections = [layer.name for layer in plan.by_role(LayerRole.CACHED)
                   if not layer.name.startswith(TIME_EMBEDDING_PREFIX)]
    if projections and conditions_reach_time_embedding(config):
        raise UserError(f"this UNet adds its class / SDXL embeddings to the time embedding, so its ResBlock time "
                        f"projections depend on those inputs, not only on the timestep, and cannot be cached "
                        f"({len(projections)} cached, e.g. {projections[0]}); cache only `time_embedding.*` and keep "
                        f"`*.time_emb_proj` float or quantized in the recipe's quantize.layers")


def _capture_outputs(unet: nn.Module, names: list[str], signature: DeployedSignature) -> dict[str, torch.Tensor]:
    """Run the UNet once at batch T on the schedule's timesteps and record the named modules' outputs (which do not
    depend on the sample or the conditions)."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        def record(module, args, output, name=name):
            outputs[name] = output.detach().float()
        hooks.append(unet.get_submodule(name).register_forward_hook(record))
    timesteps = torch.tensor(signature.step_timesteps, dtype=torch.int64)
    steps = len(timesteps)
    # Time features depend on the timestep alone: run the smallest latent the UNet accepts (one pixel after every
    # downsampling) and one token, so an SD-sized UNet computes its tables in seconds instead of an hour.
    side = 2 ** (len(unet.config.block_out_channels) - 1)
    # Added conditions only change what is summed after the time embedding (check_cacheable): zeros do.
    added = {spec.name: torch.zeros(spec.concrete_shape({BATCH_AXIS: steps}), dtype=getattr(torch, spec.dtype))
             for spec in signature.added_conditions}
    try:
        with torch.no_grad():
            unet(torch.zeros(steps, signature.sample_shape[0], side, side), timesteps,
                 encoder_hidden_states=torch.zeros(steps, 1, signature.cross_attention_dim), **unet_keywords(added))
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def compute_time_tables(unet: nn.Module, plan: QuantPlan, signature: DeployedSignature,
                        dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Tables ``[T, features]`` in the stored ``dtype``: one per cached time projection, plus the embedding's when
    still consumed."""
    check_cacheable(unet.config, plan)
    cached = [layer.name for layer in plan.by_role(LayerRole.CACHED)
              if not layer.name.startswith(TIME_EMBEDDING_PREFIX)]
    width = plan.cached_table_rows() - sum(plan.decision(name).out_features for name in cached)
    names = cached + ([EMBEDDING_TABLE] if width else [])
    outputs = _capture_outputs(unet, names, signature)
    return {name: value.to(dtype).contiguous() for name, value in outputs.items()}


def install_time_cache(unet: nn.Module, plan: QuantPlan, signature: DeployedSignature,
                       tables: dict[str, torch.Tensor]) -> None:
    """Swap the time layers of ``unet`` for table lookups by step index (in place)."""
    if not plan.caches_time:
        return
    context = StepContext()
    width = unet.time_embedding.linear_2.out_features
    unet.time_proj = StepIndexProjection(context)
    unet.time_embedding = CachedTimeEmbedding(tables.get(EMBEDDING_TABLE), context, signature.num_steps, width)
    for name, table in tables.items():
        if name == EMBEDDING_TABLE:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name), child, CachedTimeProjection(table, context))
