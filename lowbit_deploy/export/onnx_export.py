"""Export a quantized UNet to ONNX with truly packed low-bit weights.

The UNet is traced once with its deployed (dequantized) weights in place, so the graph is the ordinary float
graph; then every quantized weight initializer is swapped for its packed words + float16 scales feeding a
``lowbit::UnpackDequantize`` node whose output carries the weight's original name. Consumers are untouched, and
the function body makes the file run in any ONNX runtime.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import UserError
from ..io import atomic_path, update_report
from ..models import sample_shape
from ..quant.apply import quantized_layers
from ..quant.fake_quant import deployed_float_layer
from ..quant.packing import PackingFormat, best_format
from .lowbit_ops import PackedWeight, attach_function, make_initializers, make_node

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")
OUTPUT_NAME = "noise_pred"
# ONNX Runtime 1.31 rejects IR versions above 13 and TensorRT's parser lags further; 10 is read by all of them.
IR_VERSION = 10
_PARAM_PREFIX = "unet."


class UNetForExport(nn.Module):
    """Positional (sample, timestep, encoder_hidden_states) -> noise prediction, with a float timestep input."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


@dataclass
class ExportReport:
    onnx_path: str
    onnx_bytes: int
    lowbit_nodes: int
    packed_weight_bytes: int
    quantized_weights: int
    fp16_onnx_path: str | None = None
    fp16_onnx_bytes: int | None = None

    @property
    def size_ratio_vs_fp16(self) -> float | None:
        return self.fp16_onnx_bytes / self.onnx_bytes if self.fp16_onnx_bytes else None

    def to_dict(self) -> dict:
        return {**asdict(self), "size_ratio_vs_fp16": self.size_ratio_vs_fp16}


def example_inputs(unet: nn.Module, batch: int = 2, seq_len: int = 8, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, *sample_shape(unet), generator=generator).to(dtype)
    timestep = torch.linspace(1, 999, batch).to(dtype)
    states = torch.randn(batch, seq_len, unet.config.cross_attention_dim, generator=generator).to(dtype)
    return sample, timestep, states


def packed_weights(unet: nn.Module, packing: str = "auto") -> dict[str, PackedWeight]:
    """Packed form of every quantized layer's weight, keyed by the layer's module name."""
    packed: dict[str, PackedWeight] = {}
    for name, layer in quantized_layers(unet).items():
        quantizer = layer.weight_quantizer
        grid = quantizer.grid
        fmt = best_format(grid.levels) if packing == "auto" else PackingFormat(packing)
        q = quantizer.integer_weight(layer.weight).numpy()
        scale16 = quantizer.deployed_scale().numpy().astype(np.float16)
        try:
            packed[name] = PackedWeight.from_integers(name, q, grid.qmin, grid.levels, scale16, fmt)
        except ValueError as error:
            raise UserError(f"layer {name}: {error} (set export.packing to auto or int32_words)") from None
    return packed


def deployed_float_unet(unet: nn.Module) -> nn.Module:
    """A plain float UNet whose quantized layers hold their deployed (dequantized) weights."""
    deployed = copy.deepcopy(unet)
    for name, layer in quantized_layers(deployed).items():
        parent_name, _, child = name.rpartition(".")
        setattr(deployed.get_submodule(parent_name) if parent_name else deployed, child, deployed_float_layer(layer))
    return deployed.eval()


def trace_to_onnx(unet: nn.Module, path: Path, opset: int, dtype=torch.float32, seq_len: int = 8) -> onnx.ModelProto:
    from diffusers.utils import logging as diffusers_logging

    # diffusers warns on every ModelMixin.to(dtype) about fp32-only modules; the UNet has none, so silence it here.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        model = UNetForExport(unet.to(dtype)).eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)
    batch_axes = {name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    batch_axes["encoder_hidden_states"][1] = "tokens"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about diffusers' shape checks are expected and harmless
        # The TorchScript exporter keeps parameter names as initializer names, which the packing pass relies on;
        # constant folding is off so no weight is transposed into an anonymous initializer.
        torch.onnx.export(model, example_inputs(unet, seq_len=seq_len, dtype=dtype), str(path), dynamo=False,
                          input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], opset_version=opset,
                          dynamic_axes=batch_axes, do_constant_folding=False)
    return onnx.load(str(path))


def replace_with_packed(model: onnx.ModelProto, weights: dict[str, PackedWeight], opset: int) -> None:
    initializers = {init.name: index for index, init in enumerate(model.graph.initializer)}
    new_nodes = []
    for name, weight in weights.items():
        onnx_name = f"{_PARAM_PREFIX}{name}.weight"
        if onnx_name not in initializers:
            raise RuntimeError(f"exported graph has no initializer {onnx_name}; the exporter renamed weights")
        model.graph.initializer[initializers[onnx_name]].CopyFrom(make_initializers(weight)[0])
        model.graph.initializer.append(make_initializers(weight)[1])
        new_nodes.append(make_node(weight, onnx_name))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes + nodes)
    attach_function(model, opset)
    model.ir_version = IR_VERSION


def _save(model: onnx.ModelProto, target: Path) -> int:
    with atomic_path(target) as tmp:
        onnx.save(model, str(tmp))
    return target.stat().st_size


def export_onnx(unet: nn.Module, out_path: str | Path, *, opset: int = 17, packing: str = "auto",
                fp16_reference_path: str | Path | None = None, seq_len: int = 8) -> ExportReport:
    """Write the packed ONNX (and optionally a plain fp16 ONNX of the same deployed UNet for size comparison)."""
    out_path = Path(out_path)
    weights = packed_weights(unet, packing)
    if not weights:
        raise UserError("the model has no quantized layer to export; train it with a recipe that quantizes layers")
    deployed = deployed_float_unet(unet)
    with tempfile.TemporaryDirectory(prefix="lowbit-export-") as scratch:
        model = trace_to_onnx(deployed, Path(scratch) / "trace.onnx", opset, seq_len=seq_len)
    replace_with_packed(model, weights, opset)
    onnx.checker.check_model(model)
    report = ExportReport(str(out_path), _save(model, out_path), len(weights),
                          sum(w.nbytes for w in weights.values()), sum(int(np.prod(w.shape)) for w in weights.values()))
    if fp16_reference_path is not None:
        fp16_path = Path(fp16_reference_path)
        with atomic_path(fp16_path) as tmp:
            fp16_model = trace_to_onnx(copy.deepcopy(deployed), tmp, opset, dtype=torch.float16, seq_len=seq_len)
            fp16_model.ir_version = IR_VERSION
            onnx.save(fp16_model, str(tmp))
        report.fp16_onnx_path, report.fp16_onnx_bytes = str(fp16_path), fp16_path.stat().st_size
    return report


def export_run(run_dir: str | Path) -> ExportReport:
    """The ``export`` stage: read ``run_dir``'s checkpoint, write ``model.onnx`` (+ ``model_fp16.onnx``)."""
    from ..qat.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir)
    config = checkpoint.recipe.export
    if not config.export_fp16_reference:
        # A reference left by an earlier export would otherwise be built and compared against this model.
        (run_dir / "model_fp16.onnx").unlink(missing_ok=True)
    report = export_onnx(checkpoint.unet, run_dir / "model.onnx", opset=config.opset, packing=config.packing,
                         fp16_reference_path=run_dir / "model_fp16.onnx" if config.export_fp16_reference else None,
                         seq_len=checkpoint.condition_seq_len)
    update_report(run_dir, "export", report.to_dict())
    return report
