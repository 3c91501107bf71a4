"""Peak resident memory added by saving a QAT run's train state (AdamW moments) and weights.

Builds a diffusers UNet at a chosen width with seeded random weights (nothing is downloaded), gives every parameter
an AdamW step so both moments exist, then saves the train state and the weights the way the trainer's checkpoint
callback does. Prints the resident memory before saving and the peak added while saving (the kernel's high-water
mark, reset just before through /proc/self/clear_refs), next to the moments' and the weights' sizes.

    .venv/bin/python benchmarks/train_state_memory.py --width 96     # ~77M parameters, ~1.3 GB resident
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    # "5" resets the process's peak resident set size (VmHWM) to its current size (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=96, help="first block's channels (SD1.5: 320)")
    args = parser.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    from lowbit_deploy.io import write_safetensors_atomic
    from lowbit_deploy.qat.checkpoint import save_train_state

    torch.manual_seed(0)
    width = args.width
    unet = UNet2DConditionModel(sample_size=32, block_out_channels=(width, 2 * width, 4 * width, 4 * width),
                                cross_attention_dim=4 * width, attention_head_dim=8)
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    weight_bytes = sum(p.numel() * p.element_size() for p in parameters)
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for name, save in (
                ("train state", lambda: save_train_state(Path(folder), optimizer, 1, torch.Generator())),
                ("weights", lambda: write_safetensors_atomic(Path(folder) / "w.safetensors",
                                                             dict(unet.state_dict())))):
            before = _status_kib("VmRSS")
            _reset_peak()
            started = time.perf_counter()
            save()
            seconds = time.perf_counter() - started
            rows.append((name, before, _status_kib("VmHWM") - before, seconds))
    print(f"parameters: {sum(p.numel() for p in parameters) / 1e6:.1f}M  weights {weight_bytes / 2**20:.0f} MiB  "
          f"moments {2 * weight_bytes / 2**20:.0f} MiB")
    for name, before, added, seconds in rows:
        print(f"save {name:<11}: resident before {before / 1024:.0f} MiB, peak added while saving "
              f"{added / 1024:.0f} MiB, {seconds:.1f} s")


if __name__ == "__main__":
    main()
