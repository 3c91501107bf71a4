"""Every stage at SD1.5 (or SDXL) size on this machine: wall time and peak RSS per stage against the targets.

What it does (nothing is downloaded): writes a diffusers UNet folder with the SD1.5 UNet config (860M parameters;
``--unet sdxl``: 2.6B, ``--unet tiny``: the same layout at toy width, a minute) and seeded random weights, then runs
each stage as the CLI does, each in its own child process (``lowbit-deploy ...``), watching the child's resident
memory and stopping it past ``--max-rss-gb``:

  model     build + save the random UNet (setup, not a target)
  ptq       ``train --steps 0`` of recipes/sd15-w2-balanced.yaml (PTQ: the scale init is the whole quantization)
  export    ``export`` (packed ONNX; ``--fp16-reference`` adds the fp16 reference)
  build     ``build`` (TensorRT; "not run" on a machine without it)
  validate  ``validate --skip-nothing``: ONNX Runtime (packed weights), one parity batch, and the sampling
            comparison at its size-scaled default (2 images x 2 steps for SD1.5)
  ort       benchmarks/ort_weights.py on the exported file: RSS growth and latency of packed vs folded sessions
  qat       (``--qat``) one CPU QAT step at batch 1 with gradient checkpointing

Peak RSS per stage is the child's own ``ru_maxrss`` (``os.wait4``). Before starting, the library's memory
pre-flight (lowbit_deploy/export/memory.py) estimates export and validate for the parameter count: a stage that will
not fit is reported with its refusal (the message the CLI gives) instead of being started.

Usage: python benchmarks/scale.py [--unet sd15|sdxl|tiny] [--out DIR] [--stages ptq,export,...] [--qat]
       [--fp16-reference] [--max-rss-gb 14]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

# diffusers' SD1.5 UNet config (runwayml/stable-diffusion-v1-5 unet/config.json, defaults omitted).
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "act_fn": "silu",
    "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5,
}
# diffusers' SDXL base UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, defaults omitted).
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True, "norm_num_groups": 32,
    "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
}
TINY_UNET = {**SD15_UNET, "sample_size": 16, "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 32,
             "layers_per_block": 1}
CONFIGS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "tiny": TINY_UNET}
# The targets per model (GiB, minutes); None: no target of its own. SDXL: export within 24 GB (22.3 GiB);
# the toy model has none.
TARGETS = {"sd15": {"export": (8.0, 10.0), "ptq+export+build+validate": (16.0, 30.0), "qat": (20.0, None)},
           "sdxl": {"export": (22.3, None)}, "tiny": {}}
STAGES = ("model", "ptq", "export", "build", "validate", "ort", "qat")


def _rss_kib(pid: int) -> int:
    """Resident KiB of ``pid`` and every process below it (a stage may start its own children)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            own = int(next(line for line in status if line.startswith("VmRSS:")).split()[1])
        children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                    for child in (task / "children").read_text().split()]
    except (OSError, StopIteration, ValueError):
        return 0
    return own + sum(_rss_kib(child) for child in children)


def run_child(name: str, command: list[str], max_rss_gb: float, log: Path) -> dict:
    """Run ``command``; kill it past ``max_rss_gb`` resident. Returns wall seconds, peak RSS (its ru_maxrss), rc."""
    print(f"-- {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        killed = False
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if not killed and _rss_kib(child.pid) > max_rss_gb * 2**20:
                os.killpg(child.pid, signal.SIGKILL)  # the stage and its own children
                killed = True
            time.sleep(0.5)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    result = {"stage": name, "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
              "returncode": child.returncode, "killed_over_gib": max_rss_gb if killed else None,
              "log": str(log)}
    tail = log.read_text().strip().splitlines()[-3:]
    print(f"   {name}: {seconds:.1f} s, peak RSS {result['peak_rss_gib']:.2f} GiB, exit {child.returncode}"
          + (f" (KILLED past {max_rss_gb} GiB)" if killed else "") + ("\n   " + "\n   ".join(tail) if tail else ""),
          flush=True)
    return result


def write_model(config_name: str, folder: Path, seed: int = 0) -> None:
    """Child: the random UNet, saved as a diffusers folder (``folder/unet``, safetensors)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**CONFIGS[config_name]).eval()
    print(f"parameters: {sum(p.numel() for p in unet.parameters()):,}")
    unet.save_pretrained(folder / "unet", safe_serialization=True)


def write_recipe(path: Path, fp16_reference: bool, qat: bool) -> None:
    """recipes/sd15-w2-balanced.yaml with PTQ settings: the validation of one batch, export options."""
    data = yaml.safe_load((REPO / "recipes" / "sd15-w2-balanced.yaml").read_text())
    data = copy.deepcopy(data)
    data["name"] = "scale-benchmark"
    data["train"].update(steps=1 if qat else 0, batch_size=1, checkpoint_every=1)
    if qat:
        data["train"]["gradient_checkpointing"] = True
    data["export"] = {"export_fp16_reference": fp16_reference}
    data["validate"].update(batches=1, batch_size=1)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def parameter_count(config_name: str) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[config_name])
    return sum(p.numel() for p in unet.parameters())


def preflight(parameters: int, fp16_reference: bool) -> dict[str, str]:
    """The library's estimates for this size: stage -> refusal message ('' where it fits)."""
    from lowbit_deploy.errors import UserError
    from lowbit_deploy.export.memory import check_export_memory, check_validate_memory, export_estimate, \
        validate_estimate

    refusals = {}
    for stage, estimate, check in (
            ("export", export_estimate(parameters, fp16_reference), lambda: check_export_memory(parameters,
                                                                                                fp16_reference)),
            ("validate", validate_estimate(parameters), lambda: check_validate_memory(parameters))):
        try:
            check()
            refusals[stage] = ""
        except UserError as error:
            refusals[stage] = str(error)
        print(f"pre-flight: {estimate.describe()} -> {'refused: ' + refusals[stage] if refusals[stage] else 'fits'}")
    return refusals


def print_summary(rows: list[dict], targets: dict[str, tuple[float, float | None]]) -> None:
    print("\n== per stage (2 shared CPU cores: wall times include the other processes' load)")
    print(f"{'stage':10} {'wall s':>8} {'peak RSS GiB':>13} {'exit':>5}  note")
    for row in rows:
        note = row.get("note", "") or (f"killed past {row['killed_over_gib']} GiB" if row.get("killed_over_gib")
                                       else "")
        print(f"{row['stage']:10} {row.get('seconds', '-'):>8} {row.get('peak_rss_gib', '-'):>13} "
              f"{row.get('returncode', '-'):>5}  {note}")
    done = {row["stage"]: row for row in rows if "seconds" in row}
    print("\n== targets" + ("" if targets else ": none at this size"))
    for target, (gib, minutes) in targets.items():
        stages = [stage for stage in target.split("+") if stage in done]
        if len(stages) != len(target.split("+")):
            print(f"{target}: not measured (stages run: {', '.join(stages) or 'none'})")
            continue
        seconds = sum(done[stage]["seconds"] for stage in stages)
        peak = max(done[stage]["peak_rss_gib"] for stage in stages)
        ok = peak <= gib and (minutes is None or seconds <= 60 * minutes) and all(
            done[stage]["returncode"] == 0 for stage in stages if stage != "build")
        print(f"{target}: {seconds / 60:.1f} min (target {minutes if minutes else '-'}), peak {peak:.2f} GiB "
              f"(target {gib}) -> {'MET' if ok else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=sorted(CONFIGS), default="sd15")
    parser.add_argument("--out", type=Path, default=None, help="keep the model and run here (default: a temp dir)")
    parser.add_argument("--stages", default=",".join(s for s in STAGES if s != "qat"),
                        help=f"comma-separated, in order, from {', '.join(STAGES)}")
    parser.add_argument("--qat", action="store_true", help="also one CPU QAT step (batch 1, gradient checkpointing)")
    parser.add_argument("--fp16-reference", action="store_true", help="export the fp16 reference too")
    parser.add_argument("--max-rss-gb", type=float, default=14.0, help="kill a stage's process past this")
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_model:
        write_model(args.unet, Path(args.child_model))
        return
    stages = [stage for stage in args.stages.split(",") if stage] + (["qat"] if args.qat else [])
    parameters = parameter_count(args.unet)
    print(f"{args.unet} UNet: {parameters:,} parameters; stages {', '.join(stages)}; each stopped past "
          f"{args.max_rss_gb} GiB")
    refusals = preflight(parameters, args.fp16_reference)
    root = args.out or Path(tempfile.mkdtemp(prefix="lowbit-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    model, run, recipe = root / "model", root / "run", root / "recipe.yaml"
    write_recipe(recipe, args.fp16_reference, qat=False)
    cli = [sys.executable, "-m", "lowbit_deploy"]
    commands = {
        "model": [sys.executable, __file__, "--unet", args.unet, "--child-model", str(model)],
        "ptq": cli + ["train", str(recipe), "--out", str(run), "--model", str(model), "--steps", "0", "--no-progress"],
        "export": cli + ["export", str(run)] + ([] if args.fp16_reference else ["--no-fp16-reference"]),
        "build": cli + ["build", str(run), "--no-fp16-reference", "--plugin", "python"],
        "validate": cli + ["validate", str(run), "--ort-weights", "packed"],
        "ort": [sys.executable, str(REPO / "benchmarks" / "ort_weights.py"), "--onnx", str(run / "model.onnx"),
                "--batch", "1", "--calls", "2"],
    }
    rows = []
    for stage in stages:
        if refusals.get(stage):
            rows.append({"stage": stage, "note": "refused by the pre-flight: " + refusals[stage][:160]})
            continue
        if stage == "qat":
            qat_recipe = root / "recipe-qat.yaml"
            write_recipe(qat_recipe, False, qat=True)
            command = cli + ["train", str(qat_recipe), "--out", str(root / "run-qat"), "--model", str(model),
                             "--steps", "1", "--device", "cpu", "--no-progress"]
        else:
            command = commands[stage]
        rows.append(run_child(stage, command, args.max_rss_gb, root / f"{stage}.log"))
        if stage == "ort":
            rows[-1]["note"] = "packed vs folded: see ort.log"
    print_summary(rows, TARGETS[args.unet])
    (root / "scale.json").write_text(json.dumps(rows, indent=2))
    print(f"\nrun folder: {root} (scale.json, one log per stage)")


if __name__ == "__main__":
    main()
