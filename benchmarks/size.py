"""Size benchmark: packed ONNX and engine bytes vs a plain fp16 ONNX / fp16 engine of the same UNet.

Sizes do not depend on training, so the weights are post-training quantized (calibrated scales, 0 QAT steps).
Usage: python benchmarks/size.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import print_table, recipe_with

from lowbit_deploy.engines import backend_unavailable_reason
from lowbit_deploy.export.onnx_export import export_run
from lowbit_deploy.pipeline import build_run
from lowbit_deploy.qat.trainer import train

VARIANTS = [(2, "balanced"), (4, "signed"), (1, "balanced")]
# Stable Diffusion 1.5's widest convolution (1280 -> 1280, 3x3): 14.7 M weights, where weights dominate an engine.
SD_LAYER = (1280, 1280, 3, 3)
LEVELS = {"balanced W1": 3, "balanced W2": 5, "signed W4": 16}


def sd_scale_layer_rows(root: Path) -> list[list[object]]:
    """Engine bytes of one SD-sized conv: packed through the plugin vs dense float16 weights."""
    import numpy as np
    import onnx

    from lowbit_deploy.engines.engine import build_engine
    from lowbit_deploy.engines.toy_models import conv_chain_model, plain_conv_model, random_weight
    from lowbit_deploy.quant.packing import best_format

    rows = []
    fp16_path = None
    for name, levels in LEVELS.items():
        weight = random_weight("w0", SD_LAYER, levels, best_format(levels), np.random.default_rng(0))
        packed_path = root / f"sd-layer-{levels}.onnx"
        onnx.save(conv_chain_model([weight], (1, SD_LAYER[1], 8, 8)), packed_path)
        if fp16_path is None:
            fp16_path = root / "sd-layer-fp16.onnx"
            onnx.save(plain_conv_model([weight], (1, SD_LAYER[1], 8, 8), np.float16), fp16_path)
            fp16_bytes = build_engine(fp16_path, fp16_path.with_suffix(".engine")).engine_bytes
        packed_bytes = build_engine(packed_path, packed_path.with_suffix(".engine")).engine_bytes
        rows.append([f"{name} 1280x1280x3x3", weight.nbytes, 2 * int(np.prod(SD_LAYER)), packed_bytes, fp16_bytes,
                     fp16_bytes / packed_bytes])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="lowbit-size-"))
    reason = backend_unavailable_reason()
    rows = []
    for bits, grid in VARIANTS:
        run = root / f"{grid}-w{bits}"
        recipe = recipe_with(bits, grid, steps=0)
        train(recipe, run, steps=0, progress=False)
        export = export_run(run).to_dict()
        row = [f"{grid} W{bits}", export["packed_weight_bytes"], 2 * export["quantized_weights"],
               (2 * export["quantized_weights"]) / export["packed_weight_bytes"], export["onnx_bytes"],
               export["fp16_onnx_bytes"], export["size_ratio_vs_fp16"]]
        if reason:
            row += [f"not run: {reason}", "-", "-"]
        else:
            build = build_run(run).report
            row += [build["engine_bytes"], build["fp16_engine_bytes"], build["size_ratio_vs_fp16_engine"]]
        rows.append(row)
    print_table("size (bytes; ratio = fp16 / packed)",
                ["weights", "packed w", "fp16 w", "w ratio", "onnx", "fp16 onnx", "onnx ratio", "engine",
                 "fp16 engine", "engine ratio"], rows)
    if not reason:
        print_table("one SD1.5-sized conv layer, engine bytes (ratio = fp16 / packed)",
                    ["layer", "packed w", "fp16 w", "engine", "fp16 engine", "engine ratio"],
                    sd_scale_layer_rows(root))
    print(f"artifacts in {root}")


if __name__ == "__main__":
    main()
