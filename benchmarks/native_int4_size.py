"""ONNX and TensorRT-RTX engine bytes of the embedded default UNet at signed 4 bits: plugin-packed vs native INT4.

Both variants quantize the same layers the same way (the demo recipe's rules, catch-all at signed 4-bit; conv_in /
conv_out at 8 bits packed, time layers float) from calibrated scales (``--steps 0``: post-training quantization, the
sizes do not depend on training). ``native`` stores every catch-all layer as INT4 + DequantizeLinear; ``packed``
keeps them as lowbit::UnpackDequantize bit streams. Each file is checked against its deployed torch model in ONNX
Runtime (the validate gates and the exact weight check) and built ahead of time for SM 8.9 with the Python plugin
(no GPU needed; the engines are built, never run here).

``--widen K`` multiplies every block's channels by K (a randomly initialised UNet of the default's layout): the
default UNet's engines are mostly TensorRT's fixed part, a wider one shows what the weights cost. A wider model has a
lower float32 noise floor (ONNX Runtime vs torch ~113 dB at x4 against 131 dB at x1), which is why validate's ONNX
Runtime gates follow each model's floor (validate/floor.py, docs/gates.md) instead of one fixed value.

Usage: python benchmarks/native_int4_size.py [--steps 0] [--widen 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import print_table, recipe_with

from lowbit_deploy.export.onnx_export import export_run
from lowbit_deploy.pipeline import build_run
from lowbit_deploy.qat.trainer import train
from lowbit_deploy.quant.plan import WeightExport
from lowbit_deploy.validate.parity import check_onnx, prepare_validation

VARIANTS = {"packed": WeightExport.PACKED, "native": WeightExport.NATIVE_INT4}


def widened_model(folder: Path, factor: int) -> str:
    """The default UNet's config with ``factor`` times the channels, randomly initialised, saved as ``unet/``."""
    import torch
    from diffusers import UNet2DConditionModel

    from lowbit_deploy.models.loading import default_unet_config

    config = default_unet_config()
    config["block_out_channels"] = tuple(channels * factor for channels in config["block_out_channels"])
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    return str(folder)


def measure(out: Path, variant: str, steps: int, model_path: str | None) -> list[object]:
    recipe = recipe_with(4, "signed", steps=steps)
    rules = list(recipe.quantize.layers)
    rules[-1] = rules[-1].model_copy(update={"export": VARIANTS[variant]})
    recipe = recipe.model_copy(update={"quantize": recipe.quantize.model_copy(update={"layers": rules})})
    run = out / variant
    train(recipe, run, model_path=model_path, progress=False)
    export = export_run(run)
    context = prepare_validation(run)
    gates, _ = context.effective_gates(recipe.validate_.gates, recipe.validate_.sampling)
    outputs, weights = check_onnx(run / "model.onnx", context, gates)
    build = build_run(run, ["8.9"], plugin="python").report
    return [variant, export.onnx_bytes, export.fp16_onnx_bytes, export.lowbit_nodes, export.native_int4_layers,
            export.native_int4_weights, export.native_int4_bytes_per_weight or "-", build["engine_bytes"],
            build["fp16_engine_bytes"], f"{outputs.status} ({outputs.stats.sqnr_db:.1f} dB vs gate {gates.onnxruntime.min_sqnr_db})", weights.status]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--widen", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="native-int4-") as scratch:
        out = args.out or Path(scratch)
        model_path = widened_model(out / "model", args.widen) if args.widen > 1 else None
        rows = [measure(out, variant, args.steps, model_path) for variant in VARIANTS]
    wide = f" x{args.widen} wide" if args.widen > 1 else ""
    print_table(f"signed 4-bit default UNet{wide}: plugin-packed vs native INT4 (TensorRT-RTX AOT, SM 8.9)",
                ["variant", "onnx B", "fp16 onnx B", "lowbit nodes", "int4 layers", "int4 weights",
                 "int4 B/weight", "engine B", "fp16 engine B", "ORT parity", "exact weights"], rows)


if __name__ == "__main__":
    main()
