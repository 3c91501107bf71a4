"""BitsFusion's ablation on the embedded default model, one row per added ingredient (the paper's Table 5 order).

Every row trains the same number of Stage I steps from the same seed and is evaluated as deployed (packed weights
decoded, cached tables, fp16 float storage): samples from fixed seeds, one prompt per digit class, DDIM with CFG.

Columns: counted average bits (BitsFusion's formula), stored bits per quantized weight (the packed stream, measured),
PSNR of samples vs the FP model's (same seeds), digit accuracy, feature-FID against real held-out digits (the digit
classifier's penultimate features; the FP model's own value is printed first), training wall time.

Usage: python benchmarks/ablation.py [--steps 400] [--samples 200] [--rows 1,2,...] [--out DIR]
       python benchmarks/ablation.py --evaluate RUN_DIR [RUN_DIR ...]   # the same columns for trained runs
                                                                        # (e.g. runs/demo after `make demo`)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import REPO, print_table

from lowbit_deploy.export.deployed import deploy_unet
from lowbit_deploy.models import load_digits, load_model
from lowbit_deploy.qat.checkpoint import load_checkpoint
from lowbit_deploy.qat.trainer import train
from lowbit_deploy.recipes import parse_recipe
from lowbit_deploy.signature import signature_for
from lowbit_deploy.validate import quality, sampling

BASE_RECIPE = REPO / "recipes" / "tiny-w2-balanced.yaml"
PLAN_FILE = REPO / "recipes" / "tiny-bitsfusion-1.99.plan.json"
UNIFORM_RULES = [
    {"pattern": "conv_in", "bits": 8, "grid": "signed"},
    {"pattern": "conv_out", "bits": 8, "grid": "signed"},
    {"pattern": "time_embedding.*", "keep_float": True},
    {"pattern": "*.time_emb_proj", "keep_float": True},
    {"pattern": "*", "bits": 2, "grid": "signed"},
]
# Each row adds one ingredient to the previous one.
ROWS: list[tuple[str, dict]] = [
    ("uniform signed 2-bit QAT", {}),
    ("+ balanced grid", {"grid": "balanced"}),
    ("+ alternating-opt. init", {"scale_init": "alternating"}),
    ("+ mixed precision 1.99 & caching", {"plan": True}),
    ("+ feature distillation", {"feature_weight": 0.01}),
    ("+ Beta(3,1) timesteps", {"timestep_sampling": "beta"}),
    ("+ Stage II", {"stage_two": True}),
]
START = {"grid": "signed", "scale_init": "minmax", "plan": False, "feature_weight": 0.0,
         "timestep_sampling": "uniform", "stage_two": False}


def row_recipe(name: str, settings: dict, steps: int) -> dict:
    data = copy.deepcopy(yaml.safe_load(BASE_RECIPE.read_text()))
    data["name"] = name
    if settings["plan"]:
        data["quantize"] = {"plan": str(PLAN_FILE), "scale_init": settings["scale_init"]}
        data["validate"]["sampling"].pop("num_steps", None)
    else:
        rules = copy.deepcopy(UNIFORM_RULES)
        rules[-1]["grid"] = settings["grid"]
        data["quantize"] = {"layers": rules, "scale_init": settings["scale_init"]}
    train_section = {key: value for key, value in data["train"].items() if key not in ("steps", "loss")}
    train_section["timestep_sampling"] = settings["timestep_sampling"]
    stages = [{"kind": "distill", "steps": steps, "feature_weight": settings["feature_weight"]}]
    if settings["stage_two"]:
        stages.append({"kind": "noise", "steps": max(1, steps // 4), "data": "digits"})
    train_section["stages"] = stages
    data["train"] = train_section
    return data


def generate(runner, signature, bundle, labels: list[int], steps: int, seed: int) -> torch.Tensor:
    cond = bundle.condition.for_labels(labels)
    return sampling.sample(runner, signature, cond, bundle.condition.null(len(labels)),
                           scheduler_config=bundle.scheduler_config, num_steps=steps, guidance_scale=3.0, seed=seed)


def evaluate(run_dir: Path, bundle, labels, fp_images, real, steps: int, seed: int) -> dict:
    checkpoint = load_checkpoint(run_dir)
    deployed = deploy_unet(checkpoint.unet, checkpoint.plan, checkpoint.signature)
    images = generate(sampling.module_runner(deployed, checkpoint.signature), checkpoint.signature, bundle, labels,
                      steps, seed)
    packed = [layer.packed_weight for layer in deployed.packed_layers().values()]
    stored = 8 * sum(w.packed_words.nbytes for w in packed) / sum(w.layout.numel for w in packed)
    target = torch.tensor(labels)
    return {"avg_bits": checkpoint.plan.average_bits(checkpoint.signature.num_steps), "stored_bits": stored,
            "psnr": sampling.psnr(images, fp_images),
            "accuracy": float((bundle.classifier.predict(images) == target).float().mean()),
            "fid": quality.feature_fid(bundle.classifier, images, real)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="Stage I steps per row (Stage II adds steps/4)")
    parser.add_argument("--samples", type=int, default=200, help="generated digits per row (a multiple of 10)")
    parser.add_argument("--sampling-steps", type=int, default=20, help="DDIM steps (the 1.99 plan caches 20)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--rows", default=",".join(str(i + 1) for i in range(len(ROWS))),
                        help="comma-separated row numbers to run (1-based)")
    parser.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    parser.add_argument("--evaluate", type=Path, nargs="+", default=None,
                        help="only evaluate these trained run directories (no training)")
    args = parser.parse_args()

    bundle = load_model(None)
    labels = [index % 10 for index in range(args.samples)]
    real, _ = load_digits("val")
    fp_signature = signature_for(bundle.unet, bundle.condition.seq_len)
    fp_images = generate(sampling.unet_runner(bundle.unet), fp_signature, bundle, labels, args.sampling_steps,
                         args.seed)
    fp_fid = quality.feature_fid(bundle.classifier, fp_images, real)
    fp_accuracy = float((bundle.classifier.predict(fp_images) == torch.tensor(labels)).float().mean())
    rows = [["FP (float teacher)", "32", "32", "inf", f"{fp_accuracy:.3f}", f"{fp_fid:.3f}", "-"]]
    if args.evaluate:
        for run_dir in args.evaluate:
            figures = evaluate(run_dir, bundle, labels, fp_images, real, args.sampling_steps, args.seed)
            rows.append([str(run_dir), f"{figures['avg_bits']:.3f}", f"{figures['stored_bits']:.3f}",
                         f"{figures['psnr']:.2f}", f"{figures['accuracy']:.3f}", f"{figures['fid']:.3f}", "-"])
        print_table(f"trained runs ({args.samples} samples, DDIM {args.sampling_steps} steps, CFG 3, seed {args.seed})",
                    ["run", "avg bits (counted)", "stored bits/w", "PSNR vs FP dB", "digit acc", "feature-FID",
                     "train s"], rows)
        return
    wanted = {int(item) for item in args.rows.split(",")}
    settings = dict(START)
    root = args.out or Path(tempfile.mkdtemp(prefix="lowbit-ablation-"))
    for number, (label, change) in enumerate(ROWS, start=1):
        settings.update(change)
        if number not in wanted:
            continue
        run_dir = root / f"row{number}"
        recipe = parse_recipe(row_recipe(f"ablation-row{number}", settings, args.steps), f"ablation row {number}")
        started = time.perf_counter()
        train(recipe, run_dir, progress=False)
        seconds = time.perf_counter() - started
        figures = evaluate(run_dir, bundle, labels, fp_images, real, args.sampling_steps, args.seed)
        rows.append([label, f"{figures['avg_bits']:.3f}", f"{figures['stored_bits']:.3f}", f"{figures['psnr']:.2f}",
                     f"{figures['accuracy']:.3f}", f"{figures['fid']:.3f}", f"{seconds:.0f}"])
        print(f"row {number} done: {rows[-1]}", flush=True)
    print_table(f"BitsFusion ablation, default model ({args.steps} Stage I steps, {args.samples} samples, DDIM "
                f"{args.sampling_steps} steps, CFG 3, seed {args.seed}; FID: classifier features vs {len(real)} real "
                f"held-out digits)",
                ["row", "avg bits (counted)", "stored bits/w", "PSNR vs FP dB", "digit acc", "feature-FID",
                 "train s"], rows)


if __name__ == "__main__":
    main()
