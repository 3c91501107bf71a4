"""Quality on the embedded default, fixed seeds: digit-classifier accuracy of generated digits (vs the prompted
class) and PSNR of samples vs the float model's, for FP, 2-bit post-training quantization and 2-bit QAT.

Usage: python benchmarks/quality.py [--samples 100] [--qat-steps N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import print_table, recipe_with

from lowbit_deploy.models import load_model
from lowbit_deploy.qat.checkpoint import load_checkpoint
from lowbit_deploy.qat.trainer import train
from lowbit_deploy.signature import signature_for
from lowbit_deploy.validate import sampling


def generate(unet, bundle, labels, steps: int, seed: int) -> torch.Tensor:
    cond = bundle.condition.for_labels(labels)
    with torch.no_grad():
        return sampling.sample(sampling.unet_runner(unet), signature_for(unet, cond.shape[1]), cond,
                               bundle.condition.null(len(labels)), scheduler_config=bundle.scheduler_config,
                               num_steps=steps, guidance_scale=3.0, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--qat-steps", type=int, default=None, help="default: the demo recipe's train.steps")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    bundle = load_model(None)
    labels = [index % 10 for index in range(args.samples)]
    target = torch.tensor(labels)
    root = Path(tempfile.mkdtemp(prefix="lowbit-quality-"))
    models = {"FP": bundle.unet}
    for name, steps in [("PTQ W2 balanced", 0), ("QAT W2 balanced", args.qat_steps)]:
        recipe = recipe_with(2, "balanced")
        train(recipe, root / name.replace(" ", "-"), steps=steps, progress=False)
        models[name] = load_checkpoint(root / name.replace(" ", "-")).unet
    fp_images = None
    rows = []
    for name, unet in models.items():
        images = generate(unet, bundle, labels, args.sampling_steps, args.seed)
        fp_images = images if fp_images is None else fp_images
        accuracy = float((bundle.classifier.predict(images) == target).float().mean())
        rows.append([name, accuracy, sampling.psnr(images, fp_images) if name != "FP" else "-"])
    print_table(f"quality ({args.samples} samples, DDIM {args.sampling_steps} steps, CFG 3, seed {args.seed})",
                ["model", "digit accuracy", "PSNR vs FP (dB)"], rows)


if __name__ == "__main__":
    main()
