"""Recipes: strict, versioned YAML that configures every stage. Unknown keys are errors, never ignored.

A recipe is the only configuration a run has; each stage reads its own typed section (``quantize``, ``train``,
``export``, ``build``, ``validate``). Layers are chosen by ordered fnmatch rules on module names (first match wins),
so bits can differ per pattern.
"""

from __future__ import annotations

import fnmatch
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError
from .quant.grids import MAX_BITS, MIN_BITS, GridKind, IntegerGrid, ScaleInit

RECIPE_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class LayerRule(_Strict):
    """One rule: modules whose qualified name matches ``pattern`` get ``bits`` on ``grid``, or stay float."""

    pattern: str
    bits: Optional[Annotated[int, Field(ge=MIN_BITS, le=MAX_BITS)]] = None
    grid: GridKind = GridKind.BALANCED
    keep_float: bool = False

    @model_validator(mode="after")
    def _bits_or_float(self) -> "LayerRule":
        if self.keep_float == (self.bits is not None):
            raise ValueError(f"rule {self.pattern!r}: give either `bits` or `keep_float: true`, exactly one")
        if self.bits == 1 and self.grid is GridKind.SIGNED:
            raise ValueError(f"rule {self.pattern!r}: a signed 1-bit grid is {{-1, 0}} and zeroes every positive "
                             f"weight; use `grid: balanced` ({{-1, 0, 1}}) for 1 bit")
        return self

    def integer_grid(self) -> IntegerGrid:
        assert self.bits is not None
        return IntegerGrid(self.grid, self.bits)


class ModelSection(_Strict):
    path: Optional[str] = Field(None, description="local diffusers checkpoint folder; null = the embedded default")
    subfolder: Optional[str] = None


class QuantizeSection(_Strict):
    layers: list[LayerRule] = Field(min_length=1)
    scale_init: ScaleInit = ScaleInit.ALTERNATING
    scale_init_iterations: Annotated[int, Field(ge=0, le=1000)] = 10

    def rule_for(self, module_name: str) -> Optional[LayerRule]:
        """The first rule whose pattern matches ``module_name``; None when no rule matches (layer stays float)."""
        return next((rule for rule in self.layers if fnmatch.fnmatchcase(module_name, rule.pattern)), None)


class TimestepSampling(str, Enum):
    UNIFORM = "uniform"
    BETA = "beta"


class DataSource(str, Enum):
    AUTO = "auto"
    DIGITS = "digits"
    GAUSSIAN = "gaussian"


class TrainSection(_Strict):
    steps: Annotated[int, Field(ge=0)] = 300
    batch_size: Annotated[int, Field(ge=1)] = 32
    lr: Annotated[float, Field(gt=0)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    seed: int = 0
    loss: Literal["mse", "l1"] = "mse"
    timestep_sampling: TimestepSampling = TimestepSampling.BETA
    beta_alpha: Annotated[float, Field(gt=0)] = 3.0
    beta_beta: Annotated[float, Field(gt=0)] = 1.0
    condition_drop_prob: Annotated[float, Field(ge=0, le=1)] = 0.1
    data: DataSource = DataSource.AUTO
    checkpoint_every: Annotated[int, Field(ge=1)] = 100
    threads: Optional[Annotated[int, Field(ge=1)]] = None


class ExportSection(_Strict):
    opset: Annotated[int, Field(ge=17, le=21)] = 17
    packing: Literal["auto", "int8_words", "int32_words"] = "auto"
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


class Tolerances(_Strict):
    max_abs: Annotated[float, Field(ge=0)] = 1e-3
    max_rel: Optional[Annotated[float, Field(ge=0)]] = None
    min_cosine: Annotated[float, Field(ge=-1, le=1)] = 0.99999
    min_sqnr_db: float = 60.0


class SamplingSection(_Strict):
    num_samples: Annotated[int, Field(ge=1)] = 10
    num_steps: Annotated[int, Field(ge=1)] = 20
    guidance_scale: Annotated[float, Field(ge=1)] = 3.0
    seed: int = 1234
    min_psnr_db: float = 40.0


class ValidateSection(_Strict):
    batches: Annotated[int, Field(ge=1)] = 2
    batch_size: Annotated[int, Field(ge=1)] = 4
    seed: int = 0
    tolerances: Tolerances = Tolerances()
    sampling: SamplingSection = SamplingSection()


class Recipe(_Strict):
    version: Literal[1]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    model: ModelSection = ModelSection()
    quantize: QuantizeSection
    train: TrainSection = TrainSection()
    export: ExportSection = ExportSection()
    build: BuildSection = BuildSection()
    validate_: ValidateSection = Field(ValidateSection(), alias="validate")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)


def _format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"recipe {source} is invalid:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
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
    return parse_recipe(data, str(path))


def recipe_from_json(text: str) -> Recipe:
    return parse_recipe(json.loads(text), "<embedded in checkpoint>")
