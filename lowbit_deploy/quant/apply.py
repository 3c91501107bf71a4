"""Turn a float model into a fake-quantized one following a recipe's ``quantize`` section."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..errors import UserError
from .fake_quant import QUANTIZABLE_LAYERS, QuantizedLayer
from .grids import IntegerGrid
from .scale_init import initialize_scale, quantization_mse


@dataclass(frozen=True)
class LayerPlan:
    name: str
    layer_type: str
    grid_kind: str
    bits: int
    levels: int
    numel: int
    init_mse: float


@dataclass(frozen=True)
class QuantizationPlan:
    layers: tuple[LayerPlan, ...]
    float_params: int

    @property
    def quantized_params(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def average_bits(self) -> float:
        """Average information cost (log2 levels) over quantized weights, as BitsFusion counts it."""
        import math

        total = sum(math.log2(layer.levels) * layer.numel for layer in self.layers)
        return total / max(self.quantized_params, 1)

    def to_dict(self) -> dict:
        return {"layers": [asdict(layer) for layer in self.layers], "float_params": self.float_params,
                "quantized_params": self.quantized_params, "average_bits": self.average_bits}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLayer)}


def quantize_model(model: nn.Module, section, *, initialize: bool = True) -> QuantizationPlan:
    """Replace every quantizable layer matched by a rule with its fake-quantized twin (in place).

    ``section`` is a :class:`lowbit_deploy.recipes.QuantizeSection`. With ``initialize`` the scales are calibrated
    (``section.scale_init``); without it they keep their placeholder value until a checkpoint is loaded over them.
    """
    plans: list[LayerPlan] = []
    candidates = [(name, module) for name, module in model.named_modules() if type(module) in QUANTIZABLE_LAYERS]
    for name, module in candidates:
        rule = section.rule_for(name)
        if rule is None or rule.keep_float:
            continue
        grid: IntegerGrid = rule.integer_grid()
        quantized = QUANTIZABLE_LAYERS[type(module)](module, grid)
        _set_submodule(model, name, quantized)
        mse = float("nan")
        if initialize:
            initialize_scale(quantized.weight, quantized.weight_quantizer, section.scale_init,
                             section.scale_init_iterations)
            mse = quantization_mse(quantized.weight, quantized.weight_quantizer)
        plans.append(LayerPlan(name, type(module).__name__, grid.kind.value, grid.bits, grid.levels,
                               quantized.weight.numel(), mse))
    if not plans:
        names = ", ".join(name for name, _ in candidates[:5]) or "none"
        raise UserError(
            f"the recipe's quantize.layers rules matched no quantizable layer (Conv2d/Linear) of the model; "
            f"{len(candidates)} candidates exist (first: {names}). Fix the patterns, e.g. `pattern: \"*\"`."
        )
    quantized_ids = {id(module.weight) for module in quantized_layers(model).values()}
    float_params = sum(p.numel() for p in model.parameters() if id(p) not in quantized_ids)
    return QuantizationPlan(tuple(plans), float_params)
