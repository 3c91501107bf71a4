"""The realized per-layer quantization plan: what every Conv2d/Linear of a UNet becomes when it is deployed.

Recipes (ordered pattern rules) and the sensitivity analysis (``lowbit-deploy analyze``) produce a plan; training,
the checkpoint, export, build and validate consume it. A plan is saved with every checkpoint and read back without
the recipe, so a checkpoint always rebuilds exactly the model it was trained as.

Roles:
  ``quantized`` -- weights on an integer grid (bits, signed/balanced), stored as the layer's :class:`WeightExport`
                   says: packed words decoded by ``lowbit::UnpackDequantize`` (default) or a native INT4 initializer
                   decoded by a standard ``DequantizeLinear``.
  ``float``     -- kept as it is (stored in fp16 where the graph allows it).
  ``cached``    -- a time-embedding layer whose outputs are precomputed for every step of the inference schedule
                   (BitsFusion): the deployed graph gathers them by step index instead of computing them.

This module imports no torch; :func:`layer_inventory` (which reads a model) imports it lazily.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import UserError
from .activation_grid import ActivationGrid
from .grids import GridKind, IntegerGrid

PLAN_FORMAT = "lowbit-deploy/quant-plan/1"
# Written only when some layer is exported natively: a reader of format 1 would ignore the per-layer `export` key and
# pack those layers silently, so it must refuse the file instead. Plans without native layers stay format 1.
PLAN_FORMAT_EXPORTS = "lowbit-deploy/quant-plan/2"
# Written only when some layer quantizes its input activations (EfficientDM): an older reader would deploy those layers
# with float activations silently.
PLAN_FORMAT_ACTIVATIONS = "lowbit-deploy/quant-plan/3"
PLAN_FORMATS = (PLAN_FORMAT, PLAN_FORMAT_EXPORTS, PLAN_FORMAT_ACTIVATIONS)
# Bits BitsFusion counts for each cached time-feature value (the tables are stored in fp16).
CACHED_VALUE_BITS = 16
TIME_EMBEDDING_PREFIX = "time_embedding."
TIME_PROJECTION_SUFFIX = "time_emb_proj"


class LayerRole(str, Enum):
    QUANTIZED = "quantized"
    FLOAT = "float"
    CACHED = "cached"


class WeightExport(str, Enum):
    """How a quantized layer's weight is stored in the ONNX file (and so which TensorRT path runs it)."""

    PACKED = "packed"            # lowbit::UnpackDequantize over packed words: any grid, 1..8 bits; a TensorRT plugin
    NATIVE_INT4 = "native_int4"  # INT4 initializer + standard DequantizeLinear (zero point 0): TensorRT's own INT4


# The one grid each export stores exactly: ONNX INT4 holds [-8, 7], which is the signed 4-bit grid and nothing wider
# (the balanced 4-bit grid has 17 levels). None: every grid.
EXPORT_GRID: dict[WeightExport, IntegerGrid | None] = {
    WeightExport.PACKED: None,
    WeightExport.NATIVE_INT4: IntegerGrid(GridKind.SIGNED, 4),
}
# A native INT4 Linear is blocked along its inputs (export/native_int4.py says why); TensorRT's INT4 blocks are 16..256
# wide (docs TENSORRT.md), so in_features must split into blocks of at least this size.
NATIVE_INT4_MIN_BLOCK = 16


def export_problem(export: WeightExport, grid: IntegerGrid | None, layer_type: str | None = None,
                   in_features: int | None = None) -> str | None:
    """Why ``export`` cannot store a layer on ``grid`` (None: it can). The fix is part of the message."""
    required = EXPORT_GRID[export]
    if grid is None and export is not WeightExport.PACKED:
        return f"export: {export.value} applies to quantized layers only (a rule with `bits`), not float or cached ones"
    if required is not None and grid != required:
        return (f"export: {export.value} stores exactly the {required.describe()}, not the {grid.describe()}; set "
                f"`bits: {required.bits}, grid: {required.kind.value}` or drop `export`")
    if (export is WeightExport.NATIVE_INT4 and layer_type == "Linear" and in_features is not None
            and in_features % NATIVE_INT4_MIN_BLOCK):
        return (f"export: native_int4 blocks a Linear's weight along its {in_features} inputs, which must be a "
                f"multiple of {NATIVE_INT4_MIN_BLOCK} (TensorRT's INT4 block sizes); export this layer packed")
    return None


def is_time_layer(name: str) -> bool:
    """Layers that only ever see the timestep: the time-embedding MLP and every ResBlock's time projection."""
    return name.startswith(TIME_EMBEDDING_PREFIX) or name.rsplit(".", 1)[-1] == TIME_PROJECTION_SUFFIX


@dataclass(frozen=True)
class LayerInfo:
    """What a plan needs to know about one quantizable layer of a model."""

    name: str
    layer_type: str     # "Conv2d" | "Linear"
    weight_numel: int
    out_features: int   # output channels / features (rows of a cached table)


@dataclass(frozen=True)
class LayerDecision:
    name: str
    layer_type: str
    weight_numel: int
    out_features: int
    role: LayerRole
    grid: GridKind | None = None
    bits: int | None = None
    export: WeightExport = WeightExport.PACKED
    act_bits: int | None = None        # input activations quantized to this many bits (None: float)
    act_symmetric: bool = True
    act_per_step: bool = False         # one scale per denoising step (TALSQ) instead of one for all steps

    def __post_init__(self) -> None:
        quantized = self.role is LayerRole.QUANTIZED
        if self.act_bits is not None:
            if not quantized:
                raise ValueError(f"layer {self.name}: only quantized layers quantize their input activations")
            self.activation_grid()  # validates the bit width
        if quantized != (self.bits is not None and self.grid is not None):
            raise ValueError(f"layer {self.name}: bits and grid are given exactly for quantized layers")
        if self.export is not WeightExport.PACKED:
            problem = export_problem(self.export, self.integer_grid() if quantized else None, self.layer_type,
                                     self.weight_numel // max(self.out_features, 1))
            if problem:
                raise ValueError(f"layer {self.name}: {problem}")
        if self.role is LayerRole.CACHED and not is_time_layer(self.name):
            raise ValueError(f"layer {self.name} cannot be cached: only time-embedding layers "
                             f"({TIME_EMBEDDING_PREFIX}* and *.{TIME_PROJECTION_SUFFIX}) see nothing but the timestep")
        if quantized:
            self.integer_grid()  # validates bits / the signed 1-bit grid

    def integer_grid(self) -> IntegerGrid:
        if self.grid is None or self.bits is None:
            raise ValueError(f"layer {self.name} is {self.role.value}, not quantized")
        if self.bits == 1 and self.grid is GridKind.SIGNED:
            raise ValueError(f"layer {self.name}: a signed 1-bit grid is {{-1, 0}}; use the balanced grid")
        return IntegerGrid(self.grid, self.bits)

    def activation_grid(self) -> ActivationGrid | None:
        return None if self.act_bits is None else ActivationGrid(self.act_bits, self.act_symmetric)

    @property
    def cost_bits(self) -> float:
        """BitsFusion's counted bits per weight: log2(levels)."""
        return self.integer_grid().cost_bits

    def to_dict(self) -> dict:
        data = asdict(self)
        data["role"] = self.role.value
        data["grid"] = self.grid.value if self.grid else None
        # Packed is the default: omitting it keeps plans without native layers byte-identical to format 1.
        if self.export is WeightExport.PACKED:
            del data["export"]
        else:
            data["export"] = self.export.value
        if self.act_bits is None:  # float activations: keeps plans without them byte-identical to formats 1 and 2
            for key in ("act_bits", "act_symmetric", "act_per_step"):
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LayerDecision":
        return cls(data["name"], data["layer_type"], int(data["weight_numel"]), int(data["out_features"]),
                   LayerRole(data["role"]), GridKind(data["grid"]) if data.get("grid") else None, data.get("bits"),
                   WeightExport(data.get("export", WeightExport.PACKED.value)), data.get("act_bits"),
                   bool(data.get("act_symmetric", True)), bool(data.get("act_per_step", False)))


@dataclass(frozen=True)
class QuantPlan:
    layers: tuple[LayerDecision, ...]
    total_params: int   # every parameter of the UNet (the denominator of BitsFusion's average)
    source: str = ""    # where the plan came from ("recipe NAME", "analyze ...")

    def __post_init__(self) -> None:
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("a plan lists a layer twice")
        cached = {layer.name for layer in self.by_role(LayerRole.CACHED)}
        embedding = {layer.name for layer in self.layers if layer.name.startswith(TIME_EMBEDDING_PREFIX)}
        if cached and not embedding <= cached:
            raise ValueError(f"caching time features replaces the timestep input by a step index, so every "
                             f"time-embedding layer must be cached too; not cached: {sorted(embedding - cached)}")

    # ---- queries ---------------------------------------------------------------------------------------------
    def by_role(self, role: LayerRole) -> tuple[LayerDecision, ...]:
        return tuple(layer for layer in self.layers if layer.role is role)

    @property
    def quantized(self) -> tuple[LayerDecision, ...]:
        return self.by_role(LayerRole.QUANTIZED)

    def exported_as(self, export: WeightExport) -> tuple[LayerDecision, ...]:
        return tuple(layer for layer in self.quantized if layer.export is export)

    @property
    def caches_time(self) -> bool:
        return bool(self.by_role(LayerRole.CACHED))

    @property
    def quantizes_activations(self) -> bool:
        return any(layer.act_bits is not None for layer in self.layers)

    @property
    def needs_step_index(self) -> bool:
        """Whether the deployed graph takes a step index: cached time tables and per-step activation scales are
        both selected by it."""
        return self.caches_time or any(layer.act_per_step for layer in self.layers)

    def decision(self, name: str) -> LayerDecision:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def cached_table_rows(self) -> int:
        """Values per step of the cached tables: every cached time projection's outputs, plus the time embedding's
        own output when some consumer of it (a time projection that is not cached) still needs it."""
        projections = [layer for layer in self.layers if not layer.name.startswith(TIME_EMBEDDING_PREFIX)
                       and is_time_layer(layer.name)]
        rows = sum(layer.out_features for layer in projections if layer.role is LayerRole.CACHED)
        if self.caches_time and any(layer.role is not LayerRole.CACHED for layer in projections):
            rows += self.time_embedding_width()
        return rows

    def time_embedding_width(self) -> int:
        embedding = [layer for layer in self.layers if layer.name.startswith(TIME_EMBEDDING_PREFIX)]
        return embedding[-1].out_features if embedding else 0

    def average_bits(self, num_steps: int = 0) -> float:
        """BitsFusion's average: ``[sum_i log2(L_i) * N_i + 16 * N_cached] / N_total`` over every UNet parameter.

        ``N_cached`` is the number of cached time-feature values (``num_steps`` rows of :meth:`cached_table_rows`).
        Float parameters (norms, biases, layers kept in float) add nothing to the numerator, as in the paper; the
        bits each artifact really stores are measured by export (stored bits per weight).
        """
        counted = sum(layer.cost_bits * layer.weight_numel for layer in self.quantized)
        counted += CACHED_VALUE_BITS * num_steps * self.cached_table_rows() if self.caches_time else 0
        return counted / max(self.total_params, 1)

    def bits_histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            key = (f"{layer.grid.value}-{layer.bits}bit" if layer.role is LayerRole.QUANTIZED else layer.role.value)
            key += f"-a{layer.act_bits}{'-per-step' if layer.act_per_step else ''}" if layer.act_bits else ""
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self, num_steps: int = 0) -> dict:
        return {"source": self.source, "layers": self.bits_histogram(),
                "quantized_weights": sum(layer.weight_numel for layer in self.quantized),
                "total_params": self.total_params, "average_bits": round(self.average_bits(num_steps), 4),
                "cached_values": num_steps * self.cached_table_rows() if self.caches_time else 0}

    # ---- matching a model ------------------------------------------------------------------------------------
    def check_matches(self, inventory: Sequence[LayerInfo], what: str = "the model") -> None:
        """Refuse a plan made for another model, listing the layers that differ."""
        planned = {layer.name: layer for layer in self.layers}
        present = {info.name: info for info in inventory}
        problems = [f"{name}: in the plan, not in {what}" for name in sorted(set(planned) - set(present))]
        problems += [f"{name}: in {what}, not in the plan" for name in sorted(set(present) - set(planned))]
        for name in sorted(set(planned) & set(present)):
            layer, info = planned[name], present[name]
            if (layer.layer_type, layer.weight_numel) != (info.layer_type, info.weight_numel):
                problems.append(f"{name}: plan has {layer.layer_type} with {layer.weight_numel} weights, {what} "
                                f"has {info.layer_type} with {info.weight_numel}")
        if problems:
            shown = "\n  - ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20
                                                    else "")
            raise UserError(f"the quantization plan ({self.source or 'plan file'}) was made for another model; "
                            f"{len(problems)} mismatch(es):\n  - {shown}\nRe-run `lowbit-deploy analyze` for this "
                            f"model, or use pattern rules (quantize.layers) instead of a plan file")

    # ---- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        native = any(layer.export is not WeightExport.PACKED for layer in self.layers)
        plan_format = (PLAN_FORMAT_ACTIVATIONS if self.quantizes_activations
                       else PLAN_FORMAT_EXPORTS if native else PLAN_FORMAT)
        return {"format": plan_format, "source": self.source,
                "total_params": self.total_params,
                "layers": [layer.to_dict() for layer in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, origin: str = "plan") -> "QuantPlan":
        if not isinstance(data, dict) or data.get("format") not in PLAN_FORMATS:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise UserError(f"{origin} is not a lowbit-deploy quantization plan (format {found!r}, expected one of "
                            f"{', '.join(map(repr, PLAN_FORMATS))}); write one with `lowbit-deploy analyze`")
        try:
            layers = tuple(LayerDecision.from_dict(item) for item in data["layers"])
            return cls(layers, int(data["total_params"]), data.get("source", ""))
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{origin} is not a valid quantization plan: {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> "QuantPlan":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"quantization plan {path} does not exist; compute it with `lowbit-deploy analyze "
                            f"RECIPE --out DIR` (it writes DIR/plan.json) or fix quantize.plan in the recipe")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"quantization plan {path} is not readable JSON ({error})") from None
        return cls.from_dict(data, str(path))

    def save(self, path: str | Path) -> None:
        from ..io import write_text_atomic

        write_text_atomic(path, self.to_json() + "\n")


def plan_from_rules(inventory: Iterable[LayerInfo], section, total_params: int, source: str = "") -> QuantPlan:
    """Apply a recipe's ordered ``quantize.layers`` rules (first match wins; no match = float) to every layer.

    ``section`` is a :class:`lowbit_deploy.recipes.QuantizeSection`.
    """
    decisions = []
    for info in inventory:
        rule = section.rule_for(info.name)
        base = (info.name, info.layer_type, info.weight_numel, info.out_features)
        try:
            if rule is None or rule.keep_float:
                decisions.append(LayerDecision(*base, LayerRole.FLOAT))
            elif rule.cache:
                decisions.append(LayerDecision(*base, LayerRole.CACHED))
            else:
                activations = (dict(act_bits=rule.act_bits, act_symmetric=section.activations.symmetric,
                                    act_per_step=rule.act_per_step) if rule.act_bits is not None else {})
                decisions.append(LayerDecision(*base, LayerRole.QUANTIZED, rule.grid, rule.bits, rule.export,
                                               **activations))
        except ValueError as error:
            number = section.layers.index(rule) + 1
            raise UserError(f"recipe rule {number} ({rule.pattern!r}): {error}") from None
    try:
        plan = QuantPlan(tuple(decisions), total_params, source)
    except ValueError as error:
        raise UserError(f"the recipe's quantize.layers: {error}") from None
    if not plan.quantized:
        names = ", ".join(info.name for info in list(inventory)[:5]) or "none"
        raise UserError(f"the recipe's quantize.layers rules matched no quantizable layer (Conv2d/Linear) of the "
                        f"model; {len(plan.layers)} candidates exist (first: {names}). Fix the patterns, e.g. "
                        f"`pattern: \"*\"`.")
    return plan


def layer_inventory(model) -> tuple[list[LayerInfo], int]:
    """Every quantizable layer of a float ``model`` (in module order) and the model's total parameter count."""
    from .fake_quant import QUANTIZABLE_LAYERS

    infos = []
    for name, module in model.named_modules():
        if type(module) in QUANTIZABLE_LAYERS:
            infos.append(LayerInfo(name, type(module).__name__, module.weight.numel(), module.weight.shape[0]))
    return infos, sum(parameter.numel() for parameter in model.parameters())


def cost_bits(grid: GridKind, bits: int) -> float:
    return math.log2(IntegerGrid(grid, bits).levels)
