"""Export handlers: a registry keyed by what a layer becomes in the deployed graph (its plan role).

Each handler turns the layers of its role in the trained (fake-quantized) UNet into the modules the deployed graph
is traced from; the tracer itself never looks at layers. A quantized layer becomes a :class:`PackedLayer` whose
weight is produced by ``lowbit::UnpackDequantize`` from packed words + fp16 scales (one autograd Function carries both
the torch value and the ONNX emission, so they cannot drift); cached time layers become step-index table lookups;
float layers stay. Quantized layers are rewritten by their plan's weight export (:data:`QUANTIZED_EXPORTS`): packed
(the plugin) or native INT4 (:mod:`.native_int4`: a standard INT4 ``DequantizeLinear``); LoRA is merged into the
weight first and a quantized input activation becomes a :class:`~.activation_ops.DeployedActivationQuantizer` (its
stored tables).

Every handler also names its *tap*: the module whose output per-layer bisection compares across backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..quant.apply import quantized_layers
from ..quant.fake_quant import QUANTIZABLE_LAYERS, QuantizedLayer, quantized_input, reclassed
from ..quant.packing import PackingFormat, best_format
from ..quant.plan import LayerDecision, LayerRole, QuantPlan, WeightExport
from ..signature import DeployedSignature
from .activation_ops import DeployedActivationQuantizer
from .lowbit_ops import PackedWeight, node_spec
from .native_int4 import native_int4_layer
from .time_cache import compute_time_tables, deployed_step_context, install_time_cache


@dataclass(frozen=True)
class ExportOptions:
    packing: str = "auto"           # "auto" (densest: the v2 bit stream) or a PackingFormat value
    float_storage: str = "fp16"     # how parameters that stay float are stored: "fp16" or "fp32"


def _onnx_attributes(attributes: dict) -> dict:
    """Python attribute values -> the ``name_<type>`` keywords the TorchScript exporter's ``g.op`` takes."""
    keywords = {}
    for name, value in attributes.items():
        if isinstance(value, str):
            keywords[f"{name}_s"] = value
        elif isinstance(value, (list, tuple)):
            keywords[f"{name}_i"] = [int(item) for item in value]
        elif isinstance(value, float):
            keywords[f"{name}_f"] = value
        else:
            keywords[f"{name}_i"] = int(value)
    return keywords


class UnpackDequantizeFunction(torch.autograd.Function):
    """Value: the op's reference decoding (bit-exact with every backend); ONNX: one ``lowbit::UnpackDequantize``."""

    @staticmethod
    def forward(ctx, packed: torch.Tensor, scale: torch.Tensor, layer: "PackedLayer") -> torch.Tensor:
        # A view, not a copy: the ONNX tracer keeps every PythonOp output alive until the graph is done, so copies
        # would hold a second fp32 weight set (an SDXL UNet: +10 GB at the export's peak, docs/scale.md).
        return layer.weight_value.view_as(layer.weight_value)

    @staticmethod
    def symbolic(g, packed, scale, layer: "PackedLayer"):
        domain, op_type, attributes = node_spec(layer.packed_weight)
        output = g.op(f"{domain}::{op_type}", packed, scale, **_onnx_attributes(attributes))
        output.setType(scale.type().with_dtype(torch.float32).with_sizes(list(layer.packed_weight.shape)))
        return output


class PackedLayer(nn.Module):
    """Mixin of the deployed quantized layers: packed words and fp16 scales as buffers, the weight decoded once."""

    packed_weight: PackedWeight
    weight_value: torch.Tensor

    def unpacked_weight(self) -> torch.Tensor:
        return UnpackDequantizeFunction.apply(self.packed, self.scale, self)


class PackedConv2d(nn.Conv2d, PackedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(quantized_input(self, x), self.unpacked_weight(), self.bias)


class PackedLinear(nn.Linear, PackedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantized_input(self, x), self.unpacked_weight(), self.bias)


PACKED_LAYERS: dict[type[nn.Module], type[PackedLayer]] = {nn.Conv2d: PackedConv2d, nn.Linear: PackedLinear}


def packed_weight_of(name: str, layer: QuantizedLayer, packing: str) -> PackedWeight:
    quantizer = layer.weight_quantizer
    grid = quantizer.grid
    fmt = best_format(grid.levels) if packing == "auto" else PackingFormat(packing)
    q = quantizer.integer_weight(layer.latent_weight()).numpy()
    scale16 = quantizer.deployed_scale().numpy().astype(np.float16)
    try:
        return PackedWeight.from_integers(name, q, grid.qmin, grid.levels, scale16, fmt)
    except ValueError as error:
        raise UserError(f"layer {name}: {error} (set export.packing to auto or int32_words)") from None


def packed_layer(name: str, layer: QuantizedLayer, packing: str) -> PackedLayer:
    """The deployed twin of a fake-quantized layer (shares its bias and hyper-parameters)."""
    float_type = next(base for base in type(layer).__mro__[1:] if base in QUANTIZABLE_LAYERS)
    weight = packed_weight_of(name, layer, packing)
    module = reclassed(PACKED_LAYERS[float_type], layer)
    del module._modules["weight_quantizer"]
    del module._parameters["weight"]
    module.register_buffer("packed", torch.from_numpy(weight.packed_words.copy()))
    module.register_buffer("scale", torch.from_numpy(weight.scale_fp16.copy()))
    module.packed_weight = weight
    module.weight_value = torch.from_numpy(weight.dequantized())
    return module


@dataclass(frozen=True)
class ExportHandler:
    """What the layers of one role become. ``apply`` rewrites the UNet in place for all of them at once (caching
    needs the whole model to compute its tables); ``tap`` names the module whose output bisection compares."""

    role: LayerRole
    apply: Callable[[nn.Module, Sequence[LayerDecision], QuantPlan, DeployedSignature, ExportOptions], None]
    tap: Callable[[LayerDecision], str]


# What a quantized layer's deployed twin is, by the weight export its plan decision names.
QUANTIZED_EXPORTS: dict[WeightExport, Callable[[str, QuantizedLayer, ExportOptions], nn.Module]] = {
    WeightExport.PACKED: lambda name, layer, options: packed_layer(name, layer, options.packing),
    WeightExport.NATIVE_INT4: lambda name, layer, options: native_int4_layer(name, layer),
}


# What a trained layer carries that its deployed twin replaces or drops: LoRA is merged (latent_weight), the trained
# activation quantizer becomes its stored tables.
_TRAINING_ONLY_MODULES = ("lora", "input_quantizer")


def _export_quantized(unet, decisions, plan, signature, options) -> None:
    layers = quantized_layers(unet)
    context = deployed_step_context(unet, signature)
    for decision in decisions:
        if decision.name not in layers:
            raise UserError(f"layer {decision.name} is quantized in the plan but not in the model; the checkpoint "
                            f"and its plan disagree - re-run training")
        parent_name, _, child = decision.name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        # pop: the trained fp32 weight is freed as soon as its deployed twin replaces it (peak memory at SD scale).
        trained = layers.pop(decision.name)
        twin = QUANTIZED_EXPORTS[decision.export](decision.name, trained, options)
        for name in _TRAINING_ONLY_MODULES:
            twin._modules.pop(name, None)
        activation = trained._modules.get("input_quantizer")
        if activation is not None:
            twin.input_quantizer = DeployedActivationQuantizer(activation, context)
        setattr(parent, child, twin)


def _cache_time(unet, decisions, plan, signature, options) -> None:
    if decisions:
        install_time_cache(unet, plan, signature, compute_time_tables(unet, plan, signature))


def _keep_float(unet, decisions, plan, signature, options) -> None:
    """Float layers stay; their storage type is applied to every remaining float parameter afterwards."""


# Order matters: caching runs first, on the student's own float time layers.
EXPORT_HANDLERS: dict[LayerRole, ExportHandler] = {
    LayerRole.CACHED: ExportHandler(LayerRole.CACHED, _cache_time, lambda d: "time_embedding"),
    LayerRole.QUANTIZED: ExportHandler(LayerRole.QUANTIZED, _export_quantized, lambda d: d.name),
    LayerRole.FLOAT: ExportHandler(LayerRole.FLOAT, _keep_float, lambda d: d.name),
}
