"""The float32 noise floor of a deployed model: how far two correct float32 executions of it can differ.

ONNX Runtime computes the deployed torch model's float32 math in another op order, so the two differ by float32
rounding, and how much depends on the model (deeper reductions, wider layers, larger activations round more): 131 dB
SQNR on the default model, ~113 dB on a 4x wider random UNet. A fixed gate is either too loose for the first or
fails clean artifacts of the second. The floor is measured instead: the deployed model run in float64 (every stored
value -- fp16 parameters, packed-weight decodes, cached tables -- converted exactly) against the float32 model on the
validation inputs. Measured on the default model: torch float32 vs float64 131.3 dB, ONNX Runtime vs torch float32
130.5 dB -- the torch floor predicts ONNX Runtime's disagreement (docs/gates.md).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from .stats import OutputStats, compare, merge


class _StoredAsFloat64(nn.Module):
    """Replaces the fp16-storage parametrization: the stored value, exactly, in float64."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.double()


def float64_twin(deployed: nn.Module) -> nn.Module:
    """A float64 copy of a DeployedUNet computing the same function without float32 rounding."""
    twin = copy.deepcopy(deployed)
    for module in twin.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                module.parametrizations[name][0] = _StoredAsFloat64()
        # Decoded quantized weights live in a plain attribute (the op reference's output), not a buffer.
        if isinstance(getattr(module, "weight_value", None), torch.Tensor):
            module.weight_value = module.weight_value.double()
    return twin.double().eval()


@contextlib.contextmanager
def float64_in_place(deployed: nn.Module) -> Iterator[nn.Module]:
    """``deployed`` itself turned into its float64 twin for the ``with`` body, then restored exactly (float32 and
    fp16 values survive the round trip through float64): no second copy of the model (an SD1.5 UNet: 7 GB less)."""
    dtypes = {id(tensor): tensor.dtype for tensor in (*deployed.parameters(), *deployed.buffers())}
    swapped, values = [], []
    for module in deployed.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                swapped.append((module.parametrizations[name], module.parametrizations[name][0]))
                module.parametrizations[name][0] = _StoredAsFloat64()
        if isinstance(getattr(module, "weight_value", None), torch.Tensor):
            values.append((module, module.weight_value.dtype))
            module.weight_value = module.weight_value.double()
    # Tensors are converted through .data so their identity (and the recorded dtype) stays with them.
    for tensor in (*deployed.parameters(), *deployed.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.double()
    try:
        yield deployed.eval()
    finally:
        for tensor in (*deployed.parameters(), *deployed.buffers()):
            if id(tensor) in dtypes and tensor.dtype != dtypes[id(tensor)]:
                tensor.data = tensor.data.to(dtypes[id(tensor)])
        for module, dtype in values:
            module.weight_value = module.weight_value.to(dtype)
        for parametrizations, original in swapped:
            parametrizations[0] = original


@dataclass(frozen=True)
class NoiseFloor:
    stats: OutputStats  # torch float32 vs float64, worst case over the inputs

    @property
    def sqnr_db(self) -> float:
        return self.stats.sqnr_db

    @property
    def max_abs(self) -> float:
        return self.stats.max_abs

    def to_dict(self) -> dict:
        return {"what": "deployed torch model, float32 vs float64 on the parity inputs", **self.stats.to_dict()}


def measure_floor(deployed: nn.Module, inputs: list[dict[str, torch.Tensor]],
                  float32_outputs: list[torch.Tensor]) -> NoiseFloor:
    """Compare ``float32_outputs`` (the deployed model's on ``inputs``) with its float64 twin's outputs."""
    names = deployed.signature.input_names
    stats = []
    with torch.no_grad(), float64_in_place(deployed) as twin:
        for feeds, output in zip(inputs, float32_outputs):
            args = [feeds[name].double() if feeds[name].is_floating_point() else feeds[name] for name in names]
            stats.append(compare(twin(*args).numpy(), output.numpy()))
    return NoiseFloor(merge(stats))


def cosine_implied_by(sqnr_db: float) -> float:
    """The smallest cosine similarity an output with SQNR ``sqnr_db`` can have: ``sqrt(1 - 10^(-sqnr/10))`` (the
    error orthogonal to the reference)."""
    import math

    return math.sqrt(max(1.0 - 10.0 ** (-sqnr_db / 10.0), 0.0))


def floor_gates(gates, sampling, floor: NoiseFloor | None):
    """``(gates, sampling)`` with every floor-following value (``gates.follow_floor``) replaced by its value for
    ``floor``; fixed values stay. A floor without noise (outputs equal in float32 and float64) keeps fixed gates."""
    import math

    follow = gates.follow_floor
    if follow is None or floor is None or not math.isfinite(floor.sqnr_db) or floor.max_abs == 0.0:
        return gates, sampling
    ort = gates.onnxruntime
    if follow.output_margin_db is not None:
        min_sqnr_db = round(floor.sqnr_db - follow.output_margin_db, 1)
        # The fixed cosine gate (1 - 1e-10) is what ~97 dB SQNR implies. A model whose floor puts the SQNR gate
        # lower (quantized activations: an ulp of accumulation order flips a rounding, docs/gates.md) would fail it
        # while meeting its SQNR gate, so the cosine gate becomes the one that SQNR gate implies -- never stricter
        # than the fixed one, never looser than the SQNR gate itself.
        min_cosine = min(ort.min_cosine, float(f"{cosine_implied_by(min_sqnr_db) - 5e-13:.12f}"))
        ort = ort.model_copy(update={"min_sqnr_db": min_sqnr_db, "min_cosine": min_cosine})
    if follow.max_abs_factor is not None:
        ort = ort.model_copy(update={"max_abs": float(f"{floor.max_abs * follow.max_abs_factor:.3g}")})
    updates = {"onnxruntime": ort}
    if follow.per_layer_margin_db is not None:
        updates["per_layer_min_sqnr_db"] = round(floor.sqnr_db - follow.per_layer_margin_db, 1)
    if follow.sampling_margin_db is not None:
        sampling = sampling.model_copy(update={"min_psnr_db": round(floor.sqnr_db - follow.sampling_margin_db, 1)})
    return gates.model_copy(update=updates), sampling

__all__ = ["NoiseFloor", "cosine_implied_by", "float64_in_place", "float64_twin", "floor_gates",
           "measure_floor"]
