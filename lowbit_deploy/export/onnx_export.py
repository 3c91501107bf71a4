"""Export a trained UNet to ONNX with truly packed low-bit weights, through the deployed-model contract.

The trained model is rewritten by the export handlers (:mod:`.handlers`: packed ``lowbit::UnpackDequantize`` layers,
cached time tables, float parameters stored in fp16) into a :class:`~.deployed.DeployedUNet`, which is traced once
with the input names, dtypes and dynamic axes of its :class:`~lowbit_deploy.signature.DeployedSignature`. The op's
model-local function is attached so any ONNX runtime executes the file; the signature (and, for cached time
features, the timestep of every step index) is written into the model's metadata.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import UserError
from ..io import atomic_path, remove_stale_temporaries, update_report
from ..quant.apply import quantized_layers
from ..quant.fake_quant import deployed_float_layer
from ..runtime.ort import METADATA_SIGNATURE
from ..signature import DeployedSignature, signature_for
from .deployed import DeployedUNet, deploy_unet
from .handlers import ExportOptions
from .activation_ops import ACTIVATION_OP_TYPE, attach_activation_function
from .lowbit_ops import OP_DOMAIN, OP_TYPE, attach_function
from .native_int4 import NATIVE_INT4_OPSET, TRACE_OPSET, finalize_native_int4, int4_storage, native_int4_layers

# ONNX Runtime 1.31 rejects IR versions above 13 and TensorRT's parser lags further; 10 is read by all of them.
IR_VERSION = 10
# A protobuf message cannot pass 2 GiB: tensors of a larger model go to one external data file beside it
# (``<name>.data``); 64 MiB are kept for the graph itself.
EXTERNAL_DATA_ABOVE = 2**31 - 2**26
METADATA_PLAN = "lowbit.plan"


@dataclass
class ExportReport:
    onnx_path: str
    onnx_bytes: int
    lowbit_nodes: int
    op_version: int                   # of the lowbit nodes; 0 when every quantized layer is native INT4
    packed_weight_bytes: int          # packed words + fp16 scales of every packed (lowbit) layer
    quantized_weights: int            # weights of the packed layers (native INT4 ones are counted below)
    stored_bits_per_weight: float     # packed words only, per packed weight
    counted_average_bits: float       # BitsFusion's formula (plan + cached values)
    float_storage: str
    time_input: str
    cached_values: int
    fp16_onnx_path: str | None = None
    fp16_onnx_bytes: int | None = None
    onnx_opset: int | None = None     # the default domain's: export.opset, or 21 when layers are native INT4
    native_int4_layers: int = 0
    native_int4_weights: int = 0
    native_int4_bytes: int = 0        # INT4 codes + float32 scales as stored
    native_int4_bytes_per_weight: float | None = None
    activation_nodes: int = 0         # lowbit::QuantizeDequantizeActivation (per-step tables, < 8 bits, asymmetric)
    activation_qdq_pairs: int = 0     # standard QuantizeLinear/DequantizeLinear (one constant 8-bit scale)

    @property
    def size_ratio_vs_fp16(self) -> float | None:
        return self.fp16_onnx_bytes / self.onnx_bytes if self.fp16_onnx_bytes else None

    def to_dict(self) -> dict:
        return {**asdict(self), "size_ratio_vs_fp16": self.size_ratio_vs_fp16}


def float_reference_unet(unet: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """A plain float UNet (float activations) holding ``unet``'s deployed weights in ``dtype``, built without copying
    ``unet``: each quantized layer is dequantized on its own and the model is assembled on the meta device, so the
    only new memory is the reference's own weights (an SD1.5 UNet in fp16: 1.7 GB)."""
    quantized = quantized_layers(unet)
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in quantized.items():
            for key, tensor in deployed_float_layer(layer).state_dict().items():
                state[f"{name}.{key}"] = tensor.to(dtype)
        for key, tensor in unet.state_dict().items():
            if key.rpartition(".")[0] in quantized or any(key.startswith(f"{name}.") for name in quantized):
                continue  # the layer's training state (quantizer, LoRA factors): its deployed weight is above
            key = key.replace("time_proj.inner.", "time_proj.")  # StepTracking (activation scales) wraps time_proj
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    with torch.device("meta"):
        reference = type(unet).from_config(unet.config)
    reference.load_state_dict(state, strict=True, assign=True)
    missing = [name for name, tensor in (*reference.named_parameters(), *reference.named_buffers()) if tensor.is_meta]
    if missing:  # a non-persistent buffer the state does not carry
        raise RuntimeError(f"the float reference has no values for {missing[:3]}")
    return reference.eval().requires_grad_(False)


def smallest_side(unet: nn.Module) -> int:
    """The smallest latent side the UNet takes: one pixel after every downsampling."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def trace_to_onnx(model: nn.Module, signature: DeployedSignature, path: Path, opset: int,
                  dtype: torch.dtype = torch.float32, trace_side: int | None = None) -> onnx.ModelProto:
    """Trace ``model`` (positional inputs in the signature's order) into an ONNX file named by the signature.

    ``trace_side``: trace at a ``trace_side`` x ``trace_side`` latent with dynamic spatial axes, then fix them to the
    signature's size. The graph is the same (tests/unit/export/test_onnx_export.py compares them node for node) and
    the tracer's forward pass is far cheaper: an SD1.5 UNet in fp16 at 64x64 takes ~25 min on a CPU, at 8x8 ~1 min."""
    from diffusers.utils import logging as diffusers_logging

    traced = signature if trace_side is None else dataclasses.replace(
        signature, sample_shape=(signature.sample_shape[0], trace_side, trace_side))
    dynamic_axes = signature.dynamic_axes()
    if trace_side is not None:
        for name in ("sample", signature.outputs[0].name):
            dynamic_axes[name] = {**dynamic_axes.get(name, {}), 2: "height", 3: "width"}
    feeds = traced.random_feeds(2, torch.Generator().manual_seed(0),
                                torch.randn(2, signature.seq_len, signature.cross_attention_dim))
    example = tuple(value.to(dtype) if value.is_floating_point() else value for value in feeds.values())
    # diffusers warns on every ModelMixin.to(dtype) about fp32-only modules; the UNet has none, so silence it here.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        model = model.to(dtype).eval() if dtype != torch.float32 else model.eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about diffusers' shape checks are expected and harmless
        # The TorchScript exporter keeps module paths as initializer names (packed words stay named after their
        # layer) and runs each PackedLayer's autograd symbolic; constant folding would decode the packed weights.
        torch.onnx.export(model, example, str(path), dynamo=False, input_names=list(signature.input_names),
                          output_names=[spec.name for spec in signature.outputs], opset_version=opset,
                          dynamic_axes=dynamic_axes, do_constant_folding=False)
    model = onnx.load(str(path))
    _declare_signature_shapes(model, signature)
    if trace_side is not None:
        del model.graph.value_info[:]  # intermediate shape hints still name the traced symbolic axes
    return model


def _declare_signature_shapes(model: onnx.ModelProto, signature: DeployedSignature) -> None:
    """Declare every graph input and output with the signature's shape (fixed extents as values, dynamic axes by
    name). The tracer's own declaration depends on what its shape inference got through: the spatial axes traced
    dynamic, or an output behind a custom op left as ``Convnoise_pred_dim_1``-style names."""
    specs = {spec.name: spec for spec in (*signature.inputs, *signature.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        shape = specs[value.name].shape
        if len(dims) != len(shape):
            raise RuntimeError(f"traced {value.name} has rank {len(dims)}, the signature says {shape}")
        for dim, extent in zip(dims, shape):
            if isinstance(extent, str):
                dim.dim_param = extent
            else:
                dim.dim_value = extent  # setting the value clears a symbolic name


def _count_nodes(model: onnx.ModelProto, op_type: str, domain: str = OP_DOMAIN) -> int:
    return sum(1 for node in model.graph.node if node.domain == domain and node.op_type == op_type)


def _tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(init.raw_data) for init in model.graph.initializer)


def external_data_path(target: Path) -> Path:
    return target.with_name(target.name + ".data")


def _file_bytes(target: Path) -> int:
    data = external_data_path(target)
    return target.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _save(model: onnx.ModelProto, target: Path) -> int:
    """Write ``model`` atomically; past EXTERNAL_DATA_ABOVE its tensors go to ``<target>.data`` (both files appear
    by rename, the data first: a reader never sees a model without its data). Returns the bytes written."""
    data = external_data_path(target)
    if _tensor_bytes(model) <= EXTERNAL_DATA_ABOVE:
        with atomic_path(target) as tmp:
            onnx.save(model, str(tmp))
        data.unlink(missing_ok=True)  # left by an earlier, larger export
        return target.stat().st_size
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as scratch:
        # onnx appends to an existing data file, so it is written fresh in the scratch folder and moved.
        staged = Path(scratch) / target.name
        onnx.save(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
        onnx.checker.check_model(str(staged))  # by path: the in-memory check cannot hold a model past 2 GiB
        os.replace(staged.with_name(data.name), data)
        os.replace(staged, target)
    # Saving moved the tensors out of ``model``; the caller still reads some (native INT4 storage): load them back.
    onnx.load_external_data_for_model(model, str(target.parent))
    return target.stat().st_size + data.stat().st_size


def export_deployed(deployed: DeployedUNet, out_path: str | Path, *, opset: int = 17,
                    trace_side: int | None = -1) -> onnx.ModelProto:
    """Trace the deployed UNet, attach the op's local function and the metadata, check and write the file.

    ``trace_side`` -1 (the default) traces at the smallest latent (:func:`trace_to_onnx`): the tracer keeps every
    intermediate activation alive until the graph is done, which at full size is the export's peak (an SDXL UNet at
    128x128: +8 GB over the model). None traces at the signature's size."""
    out_path = Path(out_path)
    native = native_int4_layers(deployed)
    side = smallest_side(deployed.unet) if trace_side == -1 else trace_side
    with tempfile.TemporaryDirectory(prefix="lowbit-export-") as scratch:
        # INT4 DequantizeLinear exists from opset 21 on, past the TorchScript exporter's last opset: trace at that
        # and let finalize_native_int4 declare 21 (whatever export.opset asks for, which cannot hold INT4).
        model = trace_to_onnx(deployed, deployed.signature, Path(scratch) / "trace.onnx",
                              TRACE_OPSET if native else opset, trace_side=side)
    if native:
        finalize_native_int4(model, native)
        opset = NATIVE_INT4_OPSET
    # The exporter declares every custom domain at version 1; the op version is the nodes' (attach_function's) call.
    kept = [entry for entry in model.opset_import if entry.domain != OP_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    attach_function(model, opset)
    attach_activation_function(model, opset)
    model.ir_version = IR_VERSION
    onnx.helper.set_model_props(model, {METADATA_SIGNATURE: deployed.signature.to_json(),
                                        METADATA_PLAN: json.dumps(deployed.plan.summary(deployed.signature.num_steps))})
    if _tensor_bytes(model) <= EXTERNAL_DATA_ABOVE:
        onnx.checker.check_model(model)
    _save(model, out_path)  # checks a model past 2 GiB by path
    return model


def export_onnx(unet: nn.Module, out_path: str | Path, *, plan, signature: DeployedSignature, opset: int = 17,
                options: ExportOptions = ExportOptions(), fp16_reference_path: str | Path | None = None,
                inplace: bool = False) -> ExportReport:
    """Write the packed ONNX of a trained UNet (and optionally a plain fp16 ONNX of it for size comparison)."""
    out_path = Path(out_path)
    if not plan.quantized:
        raise UserError("the model has no quantized layer to export; train it with a recipe that quantizes layers")
    fp16_bytes = None
    if fp16_reference_path is not None:  # before deploying in place: it reads the trained layers
        fp16_bytes = export_float_reference(unet, plan, signature, Path(fp16_reference_path), opset)
    deployed = deploy_unet(unet, plan, signature, options, inplace=inplace)
    model = export_deployed(deployed, out_path, opset=opset)
    packed = [layer.packed_weight for layer in deployed.packed_layers().values()]
    quantized_weights = sum(int(np.prod(weight.shape)) for weight in packed)
    words_bytes = sum(weight.packed_words.nbytes for weight in packed)
    report = ExportReport(
        str(out_path), _file_bytes(out_path), _count_nodes(model, OP_TYPE),
        max((imp.version for imp in model.opset_import if imp.domain == "lowbit"), default=0),  # 0: all native
        sum(weight.nbytes for weight in packed), quantized_weights, 8 * words_bytes / max(quantized_weights, 1),
        plan.average_bits(signature.num_steps), options.float_storage, signature.time_input.value,
        signature.num_steps * plan.cached_table_rows() if plan.caches_time else 0,
        onnx_opset=next(imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")),
        **int4_storage(model, native_int4_layers(deployed)),
        activation_nodes=_count_nodes(model, ACTIVATION_OP_TYPE),
        activation_qdq_pairs=_count_nodes(model, "QuantizeLinear", ""))
    if fp16_bytes is not None:
        report.fp16_onnx_path, report.fp16_onnx_bytes = str(fp16_reference_path), fp16_bytes
    return report


def export_float_reference(unet: nn.Module, plan, signature: DeployedSignature, path: Path, opset: int,
                           trace_side: int | None = -1) -> int:
    """Write the plain fp16 ONNX of the trained UNet's deployed weights (float activations, timestep input): the
    size reference. Built without copying ``unet`` (:func:`float_reference_unet`) and traced at the smallest latent
    (``trace_side`` -1; None traces at full size). Returns the bytes written."""
    reference_unet = float_reference_unet(unet)
    float_signature = signature_for(reference_unet, signature.seq_len)
    side = smallest_side(reference_unet) if trace_side == -1 else trace_side
    with tempfile.TemporaryDirectory(prefix="lowbit-export-") as scratch:
        # The same deployed wrapper, around the dequantized float UNet with its timestep signature.
        reference = DeployedUNet(reference_unet, float_signature, plan)
        model = trace_to_onnx(reference, float_signature, Path(scratch) / "reference.onnx", opset,
                              dtype=torch.float16, trace_side=side)
    del reference, reference_unet
    model.ir_version = IR_VERSION
    onnx.helper.set_model_props(model, {METADATA_SIGNATURE: float_signature.to_json()})
    return _save(model, path)


def export_run(run_dir: str | Path, fp16_reference: bool | None = None) -> ExportReport:
    """The ``export`` stage: read ``run_dir``'s checkpoint, write ``model.onnx`` (+ ``model_fp16.onnx`` where
    ``fp16_reference``, by default the recipe's ``export.export_fp16_reference``). Refused before anything is loaded
    when the memory it needs is not available (export/memory.py)."""
    from ..qat.checkpoint import checkpoint_file, checkpoint_recipe, load_checkpoint
    from ..run_dir import check_output_dir, check_run_dir_exists, run_lock
    from .memory import check_export_memory, checkpoint_parameters

    run_dir = check_run_dir_exists(run_dir, "lowbit-deploy train RECIPE --out RUN_DIR")
    weights = checkpoint_file(run_dir)
    if fp16_reference is None:
        fp16_reference = checkpoint_recipe(weights).export.export_fp16_reference
    check_export_memory(checkpoint_parameters(weights), fp16_reference)
    checkpoint = load_checkpoint(run_dir)
    check_output_dir(run_dir, "RUN_DIR")
    with run_lock(run_dir):
        remove_stale_temporaries(run_dir)
        return _export_locked(run_dir, checkpoint, fp16_reference)


def _export_locked(run_dir: Path, checkpoint, fp16_reference: bool) -> ExportReport:
    config = checkpoint.recipe.export
    if not fp16_reference:
        # A reference left by an earlier export would otherwise be built and compared against this model.
        (run_dir / "model_fp16.onnx").unlink(missing_ok=True)
        external_data_path(run_dir / "model_fp16.onnx").unlink(missing_ok=True)
    options = ExportOptions(packing=config.packing, float_storage=config.float_storage)
    report = export_onnx(checkpoint.unet, run_dir / "model.onnx", plan=checkpoint.plan,
                         signature=checkpoint.signature, opset=config.opset, options=options,
                         fp16_reference_path=run_dir / "model_fp16.onnx" if fp16_reference else None,
                         inplace=True)
    entry = {**report.to_dict(), "signature": checkpoint.signature.describe()}
    if checkpoint.plan.caches_time:
        entry["time_cache_png"] = str(_write_time_cache_png(run_dir / "model.onnx", run_dir / "time_cache.png"))
    update_report(run_dir, "export", entry)
    return report


def _write_time_cache_png(onnx_path: Path, png_path: Path) -> Path:
    """Render the cached tables as stored in the exported file (what the graph gathers by step index)."""
    from onnx import numpy_helper

    from ..runtime.ort import read_signature
    from ..validate.report import write_time_table_png

    model = onnx.load(str(onnx_path))
    tables = {init.name: torch.from_numpy(numpy_helper.to_array(init).astype(np.float32))
              for init in model.graph.initializer if init.name.endswith(".table") and init.dims[0] > 1}
    write_time_table_png(png_path, tables, read_signature(onnx_path).step_timesteps)
    return png_path
