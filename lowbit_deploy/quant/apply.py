"""Turn a float model into its fake-quantized training twin, following a realized :class:`QuantPlan`."""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from .activation import ActivationQuantizer, install_step_tracking
from .fake_quant import QUANTIZABLE_LAYERS, QuantizedLayer
from .grids import ScaleInit
from .plan import QuantPlan, layer_inventory, plan_from_rules
from .scale_init import initialize_scale, quantization_mse


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLayer)}


def plan_for(model: nn.Module, section, source: str = "") -> QuantPlan:
    """The plan a recipe's ``quantize`` section gives ``model``: its plan file (checked against the model) or its
    pattern rules."""
    inventory, total_params = layer_inventory(model)
    if section.plan:
        plan = QuantPlan.load(section.plan)
        plan.check_matches(inventory)
        return plan
    return plan_from_rules(inventory, section, total_params, source)


def apply_plan(model: nn.Module, plan: QuantPlan, *, scale_init: ScaleInit | None = ScaleInit.ALTERNATING,
               iterations: int = 10, step_timesteps: tuple[int, ...] = ()) -> dict[str, float]:
    """Replace every layer the plan quantizes by its fake-quantized twin (in place, sharing parameters).

    With ``scale_init`` the weight scales are calibrated and the per-layer initial quantization MSE is returned; with
    None they keep a placeholder until a checkpoint is loaded over them. Layers whose plan quantizes activations get
    an ``input_quantizer`` (one scale per step of ``step_timesteps`` where per step), calibrated later
    (:mod:`lowbit_deploy.quant.calibrate`). Float and cached layers stay as they are: the student computes time
    features in float, and export turns cached layers into tables.
    """
    inventory, _ = layer_inventory(model)
    plan.check_matches(inventory)
    context = None
    if any(decision.act_per_step for decision in plan.quantized):
        if not step_timesteps:
            raise UserError("per-step activation scales need the deployed schedule's timesteps (a step-index "
                            "signature); this model was rebuilt without them")
        context = install_step_tracking(model, step_timesteps)
    init_mse: dict[str, float] = {}
    for decision in plan.quantized:
        module = model.get_submodule(decision.name)
        quantized = QUANTIZABLE_LAYERS[type(module)](module, decision.integer_grid())
        _set_submodule(model, decision.name, quantized)
        grid = decision.activation_grid()
        if grid is not None:
            steps = len(step_timesteps) if decision.act_per_step else 1
            quantized.input_quantizer = ActivationQuantizer(grid, steps, context)
        if scale_init is not None:
            initialize_scale(quantized.weight, quantized.weight_quantizer, scale_init, iterations)
            init_mse[decision.name] = quantization_mse(quantized.weight, quantized.weight_quantizer)
    return init_mse


def quantize_model(model: nn.Module, section, *, initialize: bool = True) -> QuantPlan:
    """Plan ``model`` from a recipe's ``quantize`` section and apply the plan; returns the plan."""
    plan = plan_for(model, section)
    if not plan.quantized:
        raise UserError("the quantization plan quantizes no layer; quantize at least one Conv2d/Linear")
    apply_plan(model, plan, scale_init=section.scale_init if initialize else None,
               iterations=section.scale_init_iterations)
    return plan
