"""Recipes: strict, versioned YAML that configures every stage. Unknown keys are errors, never ignored.

A recipe is the only configuration a run has; each stage reads its own typed section (``quantize``, ``train``,
``export``, ``build``, ``validate``). Layers are chosen by ordered fnmatch rules on module names (first match wins),
so bits can differ per pattern.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import Field, ValidationError, model_validator

from .errors import UserError
from .recipe_types import (  # noqa: F401 -- re-exported: the recipe's value types are used as recipes.X
    DataSource,
    LossKind,
    LrSchedule,
    StageKind,
    TimestepSampling,
    _BetaParameter,
    _Strict,
    _Probability,
    _Rate,
)
from .recipe_efficientdm import ActivationSection, LoraSection
from .recipe_validate import (  # noqa: F401 -- re-exported: the validate section's types are used as recipes.X
    ONNXRUNTIME_GATES,
    PER_LAYER_MIN_SQNR_DB,
    TENSORRT_GATES,
    FloorGates,
    Gates,
    SamplingSection,
    Tolerances,
    ValidateSection,
)
from .quant.activation_grid import MAX_ACTIVATION_BITS, MIN_ACTIVATION_BITS
from .quant.grids import MAX_BITS, MIN_BITS, GridKind, IntegerGrid, ScaleInit
from .quant.plan import WeightExport, export_problem

RECIPE_VERSION = 1


class LayerRule(_Strict):
    """One rule: modules whose qualified name matches ``pattern`` get ``bits`` on ``grid``, stay float, or (time
    layers only) become tables cached for every step of the inference schedule."""

    pattern: str
    bits: Optional[Annotated[int, Field(ge=MIN_BITS, le=MAX_BITS)]] = None
    grid: GridKind = GridKind.BALANCED
    keep_float: bool = False
    cache: bool = False
    export: WeightExport = Field(WeightExport.PACKED, description="how quantized weights are stored: `packed` "
                                 "(lowbit plugin) or `native_int4` (INT4 DequantizeLinear; bits 4, grid signed)")
    act_bits: Optional[Annotated[int, Field(ge=MIN_ACTIVATION_BITS, le=MAX_ACTIVATION_BITS)]] = Field(
        None, description="quantize the layer's input activation to this many bits (EfficientDM); null: float")
    act_per_step: bool = Field(True, description="one learned activation scale per denoising step (TALSQ, selected "
                                                 "by step index); false: one scale for all steps")

    @model_validator(mode="after")
    def _bits_or_float(self) -> "LayerRule":
        if [self.bits is not None, self.keep_float, self.cache].count(True) != 1:
            raise ValueError(f"rule {self.pattern!r}: give exactly one of `bits`, `keep_float: true`, `cache: true`")
        if self.act_bits is not None and self.bits is None:
            raise ValueError(f"rule {self.pattern!r}: `act_bits` quantizes the input of a quantized layer; give "
                             f"`bits` too, or drop `act_bits`")
        if self.bits == 1 and self.grid is GridKind.SIGNED:
            raise ValueError(f"rule {self.pattern!r}: a signed 1-bit grid is {{-1, 0}} and zeroes every positive "
                             f"weight; use `grid: balanced` ({{-1, 0, 1}}) for 1 bit")
        problem = export_problem(self.export, self.integer_grid() if self.bits is not None else None)
        if problem:
            raise ValueError(f"rule {self.pattern!r}: {problem}")
        return self

    def integer_grid(self) -> IntegerGrid:
        assert self.bits is not None
        return IntegerGrid(self.grid, self.bits)


class ModelSection(_Strict):
    path: Optional[str] = Field(None, description="local diffusers checkpoint folder; null = the embedded default")
    subfolder: Optional[str] = None
    variant: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_-]+$", description="weight-file variant, e.g. "
                                   "`fp16` for diffusion_pytorch_model.fp16.safetensors; `--variant` overrides it")


class ConditionsSection(_Strict):
    prompts_file: Optional[str] = Field(None, description="text file, one prompt per line (path relative to the "
                                        "recipe), encoded by the checkpoint's text encoder; null: random conditions "
                                        "for checkpoints without the embedded default's prompts")


class QuantizeSection(_Strict):
    layers: list[LayerRule] = Field(default_factory=list)
    plan: Optional[str] = Field(None, description="a plan file from `lowbit-deploy analyze` (path relative to the "
                                                  "recipe); it decides every layer and replaces `layers`")
    scale_init: ScaleInit = ScaleInit.ALTERNATING
    scale_init_iterations: Annotated[int, Field(ge=0, le=1000)] = 10
    activations: ActivationSection = ActivationSection()

    @model_validator(mode="after")
    def _rules_or_plan(self) -> "QuantizeSection":
        if bool(self.layers) == bool(self.plan):
            raise ValueError("give either `layers` (pattern rules) or `plan` (a plan file), exactly one")
        return self

    def rule_for(self, module_name: str) -> Optional[LayerRule]:
        """The first rule whose pattern matches ``module_name``; None when no rule matches (layer stays float)."""
        return next((rule for rule in self.layers if fnmatch.fnmatchcase(module_name, rule.pattern)), None)


class ScheduleSection(_Strict):
    """The inference schedule the model is deployed for: cached time tables hold one row per step, and sampling
    (validate, analyze) runs it."""

    scheduler: Literal["ddim"] = "ddim"
    num_steps: Annotated[int, Field(ge=1, le=1000)] = 20

    def describe(self) -> str:
        return f"{self.scheduler}, {self.num_steps} steps"


# Defaults of a recipe without `train.stages` (one distillation stage, as before stages existed).
SINGLE_STAGE_STEPS = 300
SINGLE_STAGE_LOSS = "mse"
# Defaults of an explicit stage, by kind: BitsFusion's Stage I is |eps_fp - eps_q| + 0.01 * L_feat; Stage II is
# the plain (squared-error) diffusion loss.
STAGE_LOSS = {StageKind.DISTILL: "l1", StageKind.NOISE: "mse", StageKind.TRAJECTORY: "mse"}
FEATURE_WEIGHT = 0.01
TRAJECTORY_GUIDANCE = 3.0  # the validate sampler's default, so training follows the trajectories that are judged


class TrainStage(_Strict):
    """One training stage. Unset keys fall back to the train section's value (lr, timestep sampling, condition
    dropping, data) or to the stage kind's default (loss, feature_weight)."""

    kind: StageKind
    steps: Annotated[int, Field(ge=1)]
    lr: Optional[_Rate] = None
    lr_schedule: Optional[LrSchedule] = None
    loss: Optional[LossKind] = None
    feature_weight: Optional[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        None, description="distill only: weight of the block-output distillation term; 0 switches it off")
    timestep_sampling: Optional[TimestepSampling] = None
    beta_alpha: Optional[_BetaParameter] = None
    beta_beta: Optional[_BetaParameter] = None
    condition_drop_prob: Optional[_Probability] = None
    data: Optional[DataSource] = None
    guidance_scale: Optional[Annotated[float, Field(ge=1)]] = Field(
        None, description=f"trajectory only: classifier-free guidance of the teacher's sampler (null = "
                          f"{TRAJECTORY_GUIDANCE})")

    @model_validator(mode="after")
    def _kind_specific_keys(self) -> "TrainStage":
        if self.kind is not StageKind.DISTILL and self.feature_weight is not None:
            raise ValueError(f"feature_weight applies to `distill` stages only (a `{self.kind.value}` stage does not "
                             f"match block outputs); remove it from this stage")
        if self.kind is not StageKind.TRAJECTORY and self.guidance_scale is not None:
            raise ValueError("guidance_scale applies to `trajectory` stages only; remove it from this stage")
        return self


class TrainSection(_Strict):
    steps: Optional[Annotated[int, Field(ge=0)]] = Field(
        None, description=f"without `stages`: optimisation steps (null = {SINGLE_STAGE_STEPS}); with `stages` each "
                          f"stage gives its own")
    batch_size: Annotated[int, Field(ge=1)] = 32
    lr: _Rate = 1e-4
    lr_schedule: LrSchedule = LrSchedule.CONSTANT
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    seed: int = 0
    loss: Optional[LossKind] = Field(
        None, description=f"without `stages`: {SINGLE_STAGE_LOSS} (null) or l1; with `stages` each stage gives its own")
    timestep_sampling: TimestepSampling = TimestepSampling.BETA
    beta_alpha: _BetaParameter = 3.0
    beta_beta: _BetaParameter = 1.0
    condition_drop_prob: _Probability = 0.1
    data: DataSource = DataSource.AUTO
    checkpoint_every: Annotated[int, Field(ge=1)] = 100
    threads: Optional[Annotated[int, Field(ge=1)]] = None
    teacher_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="the frozen teacher's precision; auto: float16 on CUDA, float32 on the CPU (the student "
                            "always trains in float32)")
    gradient_checkpointing: bool = Field(False, description="recompute the student's block activations in backward: "
                                                            "less memory for more time; same gradients")
    stages: Optional[Annotated[list[TrainStage], Field(min_length=1)]] = None
    lora: Optional[LoraSection] = Field(None, description="EfficientDM's QALoRA; null: every weight trains")

    @model_validator(mode="after")
    def _stages_own_steps_and_loss(self) -> "TrainSection":
        given = [key for key in ("steps", "loss") if getattr(self, key) is not None]
        if self.stages is not None and given:
            keys = " and ".join(f"train.{key}" for key in given)
            raise ValueError(f"{keys} only apply without `stages`; with `stages` give them per stage "
                             f"(`- {{kind: distill, steps: 300, loss: l1}}`) and remove {keys}")
        return self


class ExportSection(_Strict):
    opset: Annotated[int, Field(ge=17, le=21)] = 17
    packing: Literal["auto", "int8_words", "int32_words", "bitstream"] = "auto"
    float_storage: Literal["fp16", "fp32"] = "fp16"
    export_fp16_reference: bool = True


class BuildSection(_Strict):
    compute_capabilities: list[Annotated[str, Field(pattern=r"^\d+\.\d+$")]] = Field(default_factory=lambda: ["8.9"])
    min_batch: Annotated[int, Field(ge=1)] = 1
    opt_batch: Annotated[int, Field(ge=1)] = 2
    max_batch: Annotated[int, Field(ge=1)] = 8

    @model_validator(mode="after")
    def _ordered(self) -> "BuildSection":
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("build: need min_batch <= opt_batch <= max_batch")
        return self


class AnalyzeSection(_Strict):
    """``lowbit-deploy analyze``: BitsFusion's per-layer sensitivity analysis (Alg. 1) that writes a plan file.

    Candidates are the layers ``quantize.layers`` quantizes and ``exclude`` does not match; the other layers keep
    what the rules give them (e.g. conv_in/out at 8 bits, cached time layers)."""

    candidate_bits: list[Annotated[int, Field(ge=MIN_BITS, le=MAX_BITS)]] = Field(default_factory=lambda: [1, 2, 3],
                                                                                  min_length=1)
    grid: GridKind = GridKind.BALANCED
    exclude: list[str] = Field(default_factory=lambda: ["conv_in", "conv_out", "time_embedding.*",
                                                        "*.time_emb_proj"])
    fallback_bits: Annotated[int, Field(ge=MIN_BITS, le=MAX_BITS)] = 4
    max_bits: Annotated[int, Field(ge=MIN_BITS, le=MAX_BITS)] = 7
    percentiles: list[Annotated[float, Field(gt=0, lt=100)]] = Field(default_factory=lambda: [90.0, 95.0, 98.0])
    eta: Annotated[float, Field(ge=0)] = 0.3
    target_average_bits: Annotated[float, Field(gt=0)] = 1.99
    tolerance: Annotated[float, Field(gt=0)] = 0.01
    tune_steps: Annotated[int, Field(ge=0)] = 0
    num_samples: Annotated[int, Field(ge=1)] = 10
    seed: int = 0
    workers: Annotated[int, Field(ge=1)] = 2

    @model_validator(mode="after")
    def _consistent(self) -> "AnalyzeSection":
        bits = self.candidate_bits
        if sorted(set(bits)) != bits:
            raise ValueError(f"analyze.candidate_bits {bits}: list each bit width once, ascending")
        if self.grid is GridKind.SIGNED and 1 in bits:
            raise ValueError("analyze: a signed 1-bit grid is {-1, 0}; use `grid: balanced` with 1-bit candidates")
        if not bits[-1] < self.fallback_bits <= self.max_bits:
            raise ValueError(f"analyze: need max(candidate_bits)={bits[-1]} < fallback_bits={self.fallback_bits} "
                             f"<= max_bits={self.max_bits}")
        if sorted(set(self.percentiles)) != self.percentiles:
            raise ValueError(f"analyze.percentiles {self.percentiles}: list each percentile once, ascending")
        return self


class Recipe(_Strict):
    version: Literal[1]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    model: ModelSection = ModelSection()
    conditions: ConditionsSection = ConditionsSection()
    schedule: ScheduleSection = ScheduleSection()
    quantize: QuantizeSection
    train: TrainSection = TrainSection()
    export: ExportSection = ExportSection()
    build: BuildSection = BuildSection()
    validate_: ValidateSection = Field(ValidateSection(), alias="validate")
    analyze: AnalyzeSection = AnalyzeSection()

    @model_validator(mode="after")
    def _sampling_follows_cache(self) -> "Recipe":
        steps = self.validate_.sampling.num_steps
        per_step = {"time features are cached": any(rule.cache for rule in self.quantize.layers),
                    "activation scales are per step": any(rule.act_bits is not None and rule.act_per_step
                                                          for rule in self.quantize.layers)}
        reasons = [reason for reason, applies in per_step.items() if applies]
        if reasons and steps is not None and steps != self.schedule.num_steps:
            raise ValueError(f"validate.sampling.num_steps={steps} but the {' and '.join(reasons)} for "
                             f"schedule.num_steps={self.schedule.num_steps} (the deployed graph takes a step index); "
                             f"drop validate.sampling.num_steps or make them equal")
        return self

    def sampling_steps(self, override: int | None = None) -> int:
        return override or self.validate_.sampling.num_steps or self.schedule.num_steps

    def with_variant(self, variant: str | None) -> "Recipe":
        """This recipe with ``model.variant`` set to ``variant`` (``--variant``); None keeps the recipe's."""
        if variant is None:
            return self
        return parse_recipe({**json.loads(self.to_json()), "model": {**self.model.model_dump(), "variant": variant}},
                            f"{self.name} with --variant {variant}")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


def _location(loc: tuple) -> str:
    """A pydantic error location as a recipe author counts: list items from 1 ("quantize.layers (rule 1).bits")."""
    where = ""
    for previous, part in zip((None, *loc), loc):
        if isinstance(part, int):
            where += f" ({'rule' if previous == 'layers' else 'item'} {part + 1})"
        else:
            where += f".{part}" if where else str(part)
    return where or "(top level)"


def _format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"recipe {source} is invalid:"]
    for item in error.errors():
        where = _location(tuple(item["loc"]))
        if item["type"] == "extra_forbidden":
            lines.append(f"  - {where}: unknown key; remove it or fix its spelling (see recipes/README.md)")
        elif item["type"] == "literal_error" and where == "version":
            lines.append(f"  - version: this lowbit-deploy reads recipe version {RECIPE_VERSION}; set `version: 1`")
        else:
            lines.append(f"  - {where}: {item['msg']}")
    return "\n".join(lines)


def parse_recipe(data: object, source: str = "<dict>") -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"recipe {source} must be a YAML mapping with keys version, name, quantize, ...")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise UserError(_format_validation_error(source, error)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist; pass a YAML file such as recipes/tiny-w2-balanced.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"recipe {path} is not valid YAML: {error}") from None
    recipe = parse_recipe(data, str(path))
    plan = recipe.quantize.plan
    if plan and not Path(plan).is_absolute():
        # A plan file sits beside its recipe; keep an absolute path so later stages find it from anywhere.
        resolved = str((path.parent / plan).resolve())
        recipe = recipe.model_copy(update={"quantize": recipe.quantize.model_copy(update={"plan": resolved})})
    prompts = recipe.conditions.prompts_file
    if prompts and not Path(prompts).is_absolute():
        # The run records the recipe: later stages (validate, resume) read the prompts from anywhere.
        resolved = str((path.parent / prompts).resolve())
        recipe = recipe.model_copy(update={"conditions": recipe.conditions.model_copy(
            update={"prompts_file": resolved})})
    return recipe


def recipe_from_json(text: str) -> Recipe:
    return parse_recipe(json.loads(text), "<embedded in checkpoint>")
