"""QAT cost: one fake-quant training step vs one float training step of the same UNet on the same batch.

Usage: python benchmarks/qat_cost.py [--batch 32] [--repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import print_table, recipe_with

from lowbit_deploy.models import load_model, sample_shape
from lowbit_deploy.quant.apply import quantize_model


def step_seconds(unet, batch, repeats: int) -> float:
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    sample, timestep, states, target = batch
    timings = []
    for index in range(repeats + 2):
        started = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(sample, timestep, states).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if index >= 2:  # the first steps pay for allocator warm-up
            timings.append(time.perf_counter() - started)
    return sorted(timings)[len(timings) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    bundle = load_model(None)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, *sample_shape(bundle.unet))
    states, _ = bundle.condition.sample(args.batch, generator)
    batch = (torch.randn(shape, generator=generator), torch.randint(0, 1000, (args.batch,), generator=generator),
             states, torch.randn(shape, generator=generator))
    fp = copy.deepcopy(bundle.unet).train().requires_grad_(True)
    rows = [["float", step_seconds(fp, batch, args.repeats), 1.0]]
    for bits, grid in [(2, "balanced"), (4, "signed")]:
        student = copy.deepcopy(bundle.unet).train().requires_grad_(True)
        quantize_model(student, recipe_with(bits, grid).quantize)
        seconds = step_seconds(student, batch, args.repeats)
        rows.append([f"fake-quant {grid} W{bits}", seconds, seconds / rows[0][1]])
    print_table(f"QAT step cost (batch {args.batch}, median of {args.repeats}, {torch.get_num_threads()} threads)",
                ["model", "s/step", "ratio vs float"], rows)


if __name__ == "__main__":
    main()
