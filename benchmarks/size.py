"""Size benchmark: packed ONNX and engine bytes vs a plain fp16 ONNX / fp16 engine of the same UNet.

Sizes do not depend on training, so the weights are post-training quantized (calibrated scales, 0 QAT steps).
Usage: python benchmarks/size.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import print_table, recipe_with

from lowbit_deploy.build import backend_unavailable_reason
from lowbit_deploy.export.onnx_export import export_run
from lowbit_deploy.pipeline import build_run
from lowbit_deploy.qat.trainer import train

VARIANTS = [(2, "balanced"), (4, "signed"), (1, "balanced")]


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
    print(f"artifacts in {root}")


if __name__ == "__main__":
    main()
