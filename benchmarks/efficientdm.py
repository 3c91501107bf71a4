"""EfficientDM vs full QAT on the embedded default model, at W4A8 and W2A8.

Both methods quantize the same layers the same way (recipes/tiny-efficientdm-w{4,2}a8.yaml: signed weight grids,
8-bit activations with per-step scales calibrated on teacher trajectories, conv_in/conv_out/time-embedding at W8A8):

* full QAT -- this project's BitsFusion-style training: every weight trains, Stage I distillation on digits at the
  deployed schedule's timesteps (``--full-steps`` steps, batch 32, lr 2e-4, cosine);
* EfficientDM -- QALoRA (only LoRA and quantizer parameters train, scale-aware rates) with data-free distillation
  along the teacher's trajectories (the recipe's stage, each of ``--edm-steps`` steps).

Each training runs in its own process (``lowbit-deploy train``), so its wall time and peak resident memory are its
own. Evaluation as in benchmarks/ablation.py: deployed model, fixed seeds, one prompt per digit class, DDIM 20 steps,
CFG 3 -- PSNR vs the FP model's samples, digit accuracy, feature-FID against real held-out digits.

Usage: python benchmarks/efficientdm.py [--bits 4,2] [--full-steps 500] [--edm-steps 100,200] [--edm-batch N]
       [--edm-set KEY=VALUE ...] [--samples 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import REPO, print_table
from ablation import evaluate, generate

from lowbit_deploy.models import load_digits, load_model
from lowbit_deploy.signature import signature_for
from lowbit_deploy.validate import quality, sampling

RECIPES = {4: REPO / "recipes" / "tiny-efficientdm-w4a8.yaml", 2: REPO / "recipes" / "tiny-efficientdm-w2a8.yaml"}


def full_qat_recipe(efficientdm: dict, steps: int) -> dict:
    """The EfficientDM recipe's quantization with this project's full QAT instead of LoRA + trajectories."""
    data = copy.deepcopy(efficientdm)
    data["name"] = data["name"].replace("efficientdm", "full-qat")
    train = data["train"]
    train.pop("lora")
    train.update(batch_size=32, lr=2.0e-4, lr_schedule="cosine", timestep_sampling="schedule",
                 condition_drop_prob=0.1, stages=[{"kind": "distill", "steps": steps, "feature_weight": 0.01}])
    return data


def efficientdm_recipe(efficientdm: dict, steps: int, batch: int | None = None,
                       overrides: tuple[str, ...] = ()) -> dict:
    data = copy.deepcopy(efficientdm)
    data["train"]["stages"][0]["steps"] = steps
    if batch is not None:
        data["train"]["batch_size"] = batch
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        section = data["train"]
        for parent in parents:
            section = section[parent]
        section[leaf] = yaml.safe_load(value)
    return data


def train_in_process(recipe: dict, run_dir: Path) -> dict:
    """``lowbit-deploy train`` in a child process: wall seconds, peak RSS of the child, trainable parameters."""
    recipe_path = run_dir.with_suffix(".yaml")
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "lowbit_deploy", "--quiet", "train", str(recipe_path),
                                "--out", str(run_dir)])
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"training {recipe['name']} failed (exit {os.waitstatus_to_exitcode(status)})")
    report = json.loads((run_dir / "report.json").read_text())["train"]
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20, "trainable": report["trainable_parameters"],
            "fraction": report["trainable_fraction"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="4,2", help="weight bits to compare (4 and/or 2)")
    parser.add_argument("--full-steps", type=int, default=500)
    parser.add_argument("--edm-steps", default="100,200", help="EfficientDM trajectory steps, one row each")
    parser.add_argument("--edm-batch", type=int, default=None,
                        help="prompts per EfficientDM trajectory (default: the recipe's train.batch_size)")
    parser.add_argument("--edm-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train key of the EfficientDM runs, e.g. lr=3e-3 or lora.weight_scale_lr=1e-4 "
                             "(repeatable; the value is read as YAML)")
    parser.add_argument("--samples", type=int, default=100, help="generated digits per row (a multiple of 10)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args()

    bundle = load_model(None)
    labels = [index % 10 for index in range(args.samples)]
    real, _ = load_digits("val")
    fp_signature = signature_for(bundle.unet, bundle.condition.seq_len)
    fp_images = generate(sampling.unet_runner(bundle.unet), fp_signature, bundle, labels, 20, args.seed)
    fp_accuracy = float((bundle.classifier.predict(fp_images) == torch.tensor(labels)).float().mean())
    rows = [["FP (float teacher)", "-", "inf", f"{fp_accuracy:.3f}",
             f"{quality.feature_fid(bundle.classifier, fp_images, real):.2f}", "-", "-", "-"]]
    root = args.out or Path(tempfile.mkdtemp(prefix="lowbit-efficientdm-"))
    root.mkdir(parents=True, exist_ok=True)
    timings = {}
    for bits in (int(item) for item in args.bits.split(",")):
        base = yaml.safe_load(RECIPES[bits].read_text())
        runs = [("full QAT", full_qat_recipe(base, args.full_steps))]
        for steps in (int(item) for item in args.edm_steps.split(",")):
            recipe = efficientdm_recipe(base, steps, args.edm_batch, tuple(args.edm_set))
            recipe["name"] += f"-{steps}-b{recipe['train']['batch_size']}"
            runs.append((f"EfficientDM {steps} x{recipe['train']['batch_size']}", recipe))
        for method, recipe in runs:
            run_dir = root / recipe["name"]
            cost = train_in_process(recipe, run_dir)
            figures = evaluate(run_dir, bundle, labels, fp_images, real, 20, args.seed)
            timings[(bits, method)] = (cost["seconds"], figures["psnr"])
            rows.append([f"W{bits}A8 {method}", f"{recipe['train']['stages'][0]['steps']}", f"{figures['psnr']:.2f}",
                         f"{figures['accuracy']:.3f}", f"{figures['fid']:.2f}", f"{cost['seconds']:.0f}",
                         f"{cost['trainable']:,} ({100 * cost['fraction']:.1f}%)", f"{cost['peak_rss_gib']:.2f}"])
            print(f"done: {rows[-1]}", flush=True)
    print_table(f"EfficientDM vs full QAT, default model ({args.samples} samples, DDIM 20 steps, CFG 3, seed "
                f"{args.seed})", ["row", "steps", "PSNR vs FP dB", "digit acc", "feature-FID", "train s (wall)",
                                  "trainable params", "peak RSS GiB"], rows)
    for (bits, method), (edm_s, edm_psnr) in timings.items():
        if method != "full QAT" and (bits, "full QAT") in timings:
            full_s, full_psnr = timings[(bits, "full QAT")]
            print(f"W{bits}A8 {method}: {edm_s / full_s:.2f}x full QAT's wall time (target <= 0.20), "
                  f"{edm_psnr - full_psnr:+.2f} dB PSNR vs FP relative to it (target >= -1.00)")


if __name__ == "__main__":
    main()
