"""QAT step time and peak memory of an SD1.5-shaped UNet on a device, through the trainer itself (``train()``).

Builds diffusers' SD1.5 UNet config with seeded random weights (nothing is downloaded; ``--config tiny``: the same
layout at toy width), writes it as a model folder, and trains a few steps of a recipe (default: the SD1.5 W2 recipe,
data-free) on ``--device`` with the recipe's teacher precision and optional gradient checkpointing. Prints each
step's wall time (CUDA synchronised) and the peak memory while training: on CUDA the allocator's peak (allocated and
reserved), on the CPU the process's peak resident set.

    .venv/bin/python benchmarks/qat_step.py --device cuda --batch 4                  # SD1.5-shaped, GPU
    .venv/bin/python benchmarks/qat_step.py --device cuda --batch 4 --gradient-checkpointing
    .venv/bin/python benchmarks/qat_step.py --device cpu --config tiny --batch 2      # ~1 minute, checks itself
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--config", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--recipe", type=Path, default=RECIPES / "sd15-w2-balanced.yaml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the first pays for warm-up)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--teacher-dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    args = parser.parse_args()

    import torch
    from size_sd15 import CONFIGS, build_unet

    from lowbit_deploy.qat.callbacks import TrainCallback
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import load_recipe, parse_recipe

    class StepClock(TrainCallback):
        def __init__(self, cuda: bool) -> None:
            self.cuda, self.seconds, self.last = cuda, [], None

        def _now(self) -> float:
            if self.cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_stage_begin(self, run) -> None:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            self.last = self._now()

        def on_step_end(self, run, losses) -> None:
            now = self._now()
            self.seconds.append(now - self.last)
            self.last = now

    recipe = load_recipe(args.recipe)
    data = copy.deepcopy(recipe.model_dump(by_alias=True, mode="json"))
    data["model"]["path"] = None
    data["train"].update(batch_size=args.batch, gradient_checkpointing=args.gradient_checkpointing,
                         teacher_dtype=args.teacher_dtype, checkpoint_every=args.steps + 1)
    recipe = parse_recipe(data, f"{recipe.name} (benchmark)")
    with tempfile.TemporaryDirectory(prefix="lowbit-qat-step-") as folder:
        unet = build_unet(CONFIGS[args.config])
        parameters = sum(p.numel() for p in unet.parameters())
        unet.save_pretrained(Path(folder) / "model" / "unet")
        del unet
        wants_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        clock = StepClock(wants_cuda)
        started = time.perf_counter()
        result = train(recipe, Path(folder) / "run", model_path=str(Path(folder) / "model"), steps=args.steps,
                       progress=False, device=args.device, callbacks=(clock,))
        total = time.perf_counter() - started
    print(f"config {args.config}: {parameters / 1e6:.1f}M parameters, recipe {args.recipe.name}, batch {args.batch}, "
          f"gradient checkpointing {args.gradient_checkpointing}, teacher {args.teacher_dtype}")
    print("step seconds: " + ", ".join(f"{s:.3f}" for s in clock.seconds)
          + (f"  (median after the first: {statistics.median(clock.seconds[1:]):.3f})" if len(clock.seconds) > 1
             else ""))
    if clock.cuda:
        print(f"peak CUDA memory: allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, reserved "
              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB on {torch.cuda.get_device_name()}")
    print(f"peak resident memory (CPU): {_peak_rss_gib():.2f} GiB; whole run incl. load, quantize, save: "
          f"{total:.1f} s; losses {result.first_loss} -> {result.last_loss}")


if __name__ == "__main__":
    main()
