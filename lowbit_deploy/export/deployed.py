"""The deployed UNet: the trained model rewritten by the export handlers, callable with the deployed signature.

This torch module is exactly what the ONNX file and the engine compute (packed weights decoded by the op's reference,
cached time tables, float parameters in their stored type), so parity against it is compared for equality; the
trained (fake-quantized) model differs from it only by the storage roundings that export reports.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..quant.plan import QuantPlan
from ..signature import DeployedSignature, unet_keywords
from .handlers import EXPORT_HANDLERS, ExportOptions, PackedLayer


class StoredAs(nn.Module):
    """Parametrization: the parameter is stored in ``dtype`` and used as float32 (a Cast in the graph)."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


FLOAT_STORAGE: dict[str, torch.dtype | None] = {"fp16": torch.float16, "fp32": None}


def store_float_parameters(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Store every remaining float parameter in ``dtype`` (None: leave fp32); returns how many were converted."""
    if dtype is None:
        return 0
    converted = 0
    for module in list(model.modules()):
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.dtype == torch.float32:
                # The stored tensor changes type first: a parametrization's right_inverse may not change dtypes.
                module._parameters[name] = nn.Parameter(parameter.detach().to(dtype), requires_grad=False)
                parametrize.register_parametrization(module, name, StoredAs(), unsafe=True)
                converted += 1
    return converted


class DeployedUNet(nn.Module):
    """Positional inputs in the signature's order -> the model output (``noise_pred``). Inputs after
    encoder_hidden_states are the signature's added conditions (SDXL text_embeds / time_ids, class_labels)."""

    def __init__(self, unet: nn.Module, signature: DeployedSignature, plan: QuantPlan) -> None:
        super().__init__()
        self.unet = unet
        self.signature = signature
        self.plan = plan

    def forward(self, sample: torch.Tensor, time: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *added: torch.Tensor) -> torch.Tensor:
        names = [spec.name for spec in self.signature.added_conditions]
        if len(added) != len(names):
            raise TypeError(f"the deployed UNet takes {len(names)} added condition(s) ({', '.join(names) or 'none'}) "
                            f"after encoder_hidden_states, got {len(added)}")
        keywords = unet_keywords(dict(zip(names, added)))
        return self.unet(sample, time, encoder_hidden_states, return_dict=False, **keywords)[0]

    def packed_layers(self) -> dict[str, PackedLayer]:
        return {name: module for name, module in self.unet.named_modules() if isinstance(module, PackedLayer)}


def deploy_unet(trained: nn.Module, plan: QuantPlan, signature: DeployedSignature,
                options: ExportOptions = ExportOptions(), *, inplace: bool = False) -> DeployedUNet:
    """Rewrite a trained UNet into its deployed form, one export handler per plan role."""
    unet = trained if inplace else copy.deepcopy(trained)
    unet.eval().requires_grad_(False)
    for role, handler in EXPORT_HANDLERS.items():
        handler.apply(unet, plan.by_role(role), plan, signature, options)
    store_float_parameters(unet, FLOAT_STORAGE[options.float_storage])
    return DeployedUNet(unet, signature, plan).eval()
