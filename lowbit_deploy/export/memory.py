"""Memory a stage needs for a UNet of N parameters, checked before the stage loads anything (docs/scale.md).

Peak resident memory grows with the parameter count; the bytes per parameter below are upper bounds of what
benchmarks/scale.py measured on an SD1.5-shaped UNet (860M parameters) on the 2-core / 24 GB CPU machine, plus a
fixed cost for the interpreter and libraries. A stage whose estimate passes the memory available now (MemAvailable,
or the cgroup's limit where lower) is refused with what to do instead of being killed halfway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

GIB = 2**30
FIXED_BYTES = int(1.5 * GIB)  # python, torch, onnx, onnxruntime, diffusers
# export: the trained fp32 checkpoint (4 B) while it is deployed in place (packed words, fp16 floats) and traced at
# the smallest latent; measured peaks (benchmarks/scale.py, 2026-12-05): 5.25 GiB for 860M parameters (SD1.5 shape,
# 4.7 B per parameter past the fixed), 13.78 GiB for 2,567M (SDXL shape, 5.1 B).
EXPORT_BYTES_PER_PARAMETER = 5.5
# the fp16 reference on top, built before the model is deployed: its fp16 weights (2 B), the traced graph in torch and
# the ONNX proto read back (2 B each); measured 10.18 GiB with it for 860M parameters (10.8 B past the fixed).
FP16_REFERENCE_BYTES_PER_PARAMETER = 6.5
# validate: trained-then-deployed model (4 B + its decoded weights), the float teacher for the FP samples (4 B), one
# ORT session (packed, no arena) at the sampling batch: measured 13.41 GiB peak for 860M parameters (14.9 B past the
# fixed cost; benchmarks/scale.py, 2026-12-05).
VALIDATE_BYTES_PER_PARAMETER = 16.0
# train, held in host memory whatever the device (both UNets load there first): the float teacher and the quantized
# student (4 B each) -- PTQ (no optimizer step) measured 7.32 GiB peak for 860M parameters (7.3 B past the fixed).
TRAIN_MODELS_BYTES_PER_PARAMETER = 7.5
# QAT on the CPU adds the student's gradients (4 B) and AdamW's two moments (8 B): measured 17.32 GiB for one step at
# batch 1 with gradient checkpointing (19.8 B past the fixed; benchmarks/scale.py --stages qat, 2026-12-05). Larger
# batches and no checkpointing add activations on top, so this is a lower bound: the check only refuses what
# cannot fit.
TRAIN_CPU_QAT_BYTES_PER_PARAMETER = 20.0


@dataclass(frozen=True)
class MemoryEstimate:
    stage: str
    parameters: int
    needed_bytes: int
    available_bytes: int | None  # None: unknown here (no /proc/meminfo)

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes

    def describe(self) -> str:
        have = "unknown" if self.available_bytes is None else f"{self.available_bytes / GIB:.1f} GiB"
        return (f"{self.stage} of a {self.parameters / 1e6:,.0f}M-parameter UNet needs about "
                f"{self.needed_bytes / GIB:.1f} GiB; available now: {have}")


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, capped by a cgroup v2 limit."""
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def checkpoint_parameters(weights_file: str | os.PathLike) -> int:
    """Elements stored in a safetensors file, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(weights_file), framework="pt") as handle:
        for key in handle.keys():
            count = 1
            for extent in handle.get_slice(key).get_shape():
                count *= extent
            total += count
    return total


def export_estimate(parameters: int, fp16_reference: bool, available: int | None = None) -> MemoryEstimate:
    per_parameter = EXPORT_BYTES_PER_PARAMETER + (FP16_REFERENCE_BYTES_PER_PARAMETER if fp16_reference else 0.0)
    return MemoryEstimate("export" + (" with the fp16 reference" if fp16_reference else ""), parameters,
                          FIXED_BYTES + int(per_parameter * parameters),
                          available if available is not None else available_bytes())


def validate_estimate(parameters: int, available: int | None = None) -> MemoryEstimate:
    return MemoryEstimate("validate", parameters, FIXED_BYTES + int(VALIDATE_BYTES_PER_PARAMETER * parameters),
                          available if available is not None else available_bytes())


def check_export_memory(parameters: int, fp16_reference: bool, available: int | None = None) -> MemoryEstimate:
    """Refuse an export that will not fit, naming the fix (the fp16 reference first: it is optional)."""
    estimate = export_estimate(parameters, fp16_reference, available)
    if estimate.fits:
        return estimate
    without = export_estimate(parameters, False, estimate.available_bytes)
    if fp16_reference and without.fits:
        fix = (f"export without the fp16 size reference (`lowbit-deploy export RUN_DIR --no-fp16-reference`, or "
               f"export.export_fp16_reference: false in the recipe): about {without.needed_bytes / GIB:.1f} GiB")
    else:
        fix = (f"free memory or run on a machine with at least {without.needed_bytes / GIB:.0f} GiB available"
               + (" and export without the fp16 reference (--no-fp16-reference)" if fp16_reference else ""))
    raise UserError(f"{estimate.describe()}, so it would be killed for memory part way; {fix} (docs/scale.md)")


def check_validate_memory(parameters: int, available: int | None = None) -> MemoryEstimate:
    estimate = validate_estimate(parameters, available)
    if not estimate.fits:
        raise UserError(f"{estimate.describe()}, so it would be killed for memory part way; free memory or "
                        f"validate on a machine with at least {estimate.needed_bytes / GIB:.0f} GiB available "
                        f"(docs/scale.md)")
    return estimate


def train_estimate(parameters: int, optimizer_steps: bool, on_cpu: bool,
                   available: int | None = None) -> MemoryEstimate:
    per_parameter = TRAIN_CPU_QAT_BYTES_PER_PARAMETER if optimizer_steps and on_cpu else \
        TRAIN_MODELS_BYTES_PER_PARAMETER
    stage = "QAT on the CPU" if optimizer_steps and on_cpu else "loading teacher and student"
    return MemoryEstimate(stage, parameters, FIXED_BYTES + int(per_parameter * parameters),
                          available if available is not None else available_bytes())


def check_train_memory(parameters: int, optimizer_steps: bool, on_cpu: bool,
                       available: int | None = None) -> MemoryEstimate:
    """Refuse a training run whose models (and, on the CPU, gradients and AdamW moments) cannot fit in host memory,
    before the UNet loads."""
    estimate = train_estimate(parameters, optimizer_steps, on_cpu, available)
    if estimate.fits:
        return estimate
    models = train_estimate(parameters, False, on_cpu, estimate.available_bytes)
    if optimizer_steps and on_cpu and models.fits:
        fix = (f"train on a GPU (--device cuda, docs/training-on-gpus.md), or run post-training quantization only "
               f"(--steps 0, about {models.needed_bytes / GIB:.1f} GiB), or use a machine with at least "
               f"{estimate.needed_bytes / GIB:.0f} GiB available")
    else:
        fix = f"free memory or train on a machine with at least {estimate.needed_bytes / GIB:.0f} GiB available"
    raise UserError(f"{estimate.describe()}, so it would be killed for memory part way; {fix} (docs/scale.md)")
