"""The ``validate`` stage: numeric parity of every artifact against the PyTorch quantized model.

1. Output parity on seeded (latent, timestep, condition) batches: PyTorch quantized vs ONNX Runtime, and vs the
   TensorRT engine where a GPU and TensorRT exist (otherwise reported "not run: <reason>", never "passed").
2. End-to-end sampling with fixed seeds: PSNR of ONNX Runtime samples vs PyTorch-quantized samples (gated), and
   FP vs quantized (informative), digit-classifier accuracy where the model has classes, and a PNG grid.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..io import update_report
from ..models import sample_shape
from ..recipes import SamplingSection, Tolerances
from .sampling import unet_denoiser
from .stats import OutputStats, check, compare, merge

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ArtifactParity:
    artifact: str
    status: str  # "passed" | "failed" | "not run: <reason>"
    stats: OutputStats | None = None
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "status": self.status, "failures": self.failures,
                "stats": self.stats.to_dict() if self.stats else None}


@dataclass
class ValidationReport:
    parity: list[ArtifactParity]
    sampling: dict
    passed: bool
    seconds: float

    def to_dict(self) -> dict:
        return {"passed": self.passed, "seconds": round(self.seconds, 2),
                "parity": [p.to_dict() for p in self.parity], "sampling": self.sampling}


def parity_batches(unet, condition, batches: int, batch_size: int, seed: int):
    """Seeded inputs spanning the timestep range; the same for every artifact."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        sample = torch.randn(batch_size, *sample_shape(unet), generator=generator)
        timestep = torch.randint(0, 1000, (batch_size,), generator=generator).float()
        states, _ = condition.sample(batch_size, generator)
        yield sample, timestep, states.float()


def output_parity(name: str, reference: Denoise, candidate: Denoise, inputs: list[tuple[torch.Tensor, ...]],
                  tolerances: Tolerances) -> ArtifactParity:
    stats = []
    with torch.no_grad():
        for sample, timestep, states in inputs:
            stats.append(compare(reference(sample, timestep, states).numpy(),
                                 candidate(sample, timestep, states).numpy()))
    merged = merge(stats)
    failures = check(merged, tolerances)
    return ArtifactParity(name, "failed" if failures else "passed", merged, failures)


def engine_runner(engine_path: Path, built_for: list[str] | None) -> tuple[Denoise | None, str]:
    """A TensorRT runner for the engine, or None and the reason it cannot run here."""
    if not engine_path.is_file():
        return None, "not run: no engine (run `lowbit-deploy build`)"
    from ..runtime import trt as trt_runtime

    reason = trt_runtime.unavailable_reason(built_for)
    if reason:
        return None, f"not run: {reason}"
    runner = trt_runtime.TrtRunner(engine_path)

    def denoise(sample, timestep, states):
        feeds = {"sample": sample, "timestep": timestep.float().reshape(-1).expand(sample.shape[0]),
                 "encoder_hidden_states": states}
        return runner.infer(feeds)["noise_pred"].float().cpu()

    return denoise, ""


def sampling_parity(bundle, quantized: Denoise, ort: Denoise, config: SamplingSection,
                    png_path: Path) -> dict:
    from . import sampling
    from .report import write_sample_grid

    condition = bundle.condition
    count = config.num_samples
    if condition.num_classes is not None:
        labels = [index % condition.num_classes for index in range(count)]
        cond = condition.for_labels(labels)
    else:
        labels = None
        cond, _ = condition.sample(count, torch.Generator().manual_seed(config.seed))
    null = condition.null(count)
    common = dict(scheduler_config=bundle.scheduler_config, num_steps=config.num_steps,
                  guidance_scale=config.guidance_scale, seed=config.seed,
                  sample_shape=sample_shape(bundle.unet))
    with torch.no_grad():
        images = {
            "fp": sampling.sample(unet_denoiser(bundle.unet), cond, null, **common),
            "quantized_torch": sampling.sample(quantized, cond, null, **common),
            "quantized_ort": sampling.sample(ort, cond, null, **common),
        }
    psnr_ort = sampling.psnr(images["quantized_ort"], images["quantized_torch"])
    result = {
        "num_samples": count, "num_steps": config.num_steps, "guidance_scale": config.guidance_scale,
        "seed": config.seed,
        "psnr_ort_vs_torch_db": _finite_or_str(psnr_ort),
        "psnr_fp_vs_quantized_db": _finite_or_str(sampling.psnr(images["quantized_torch"], images["fp"])),
        "min_psnr_db": config.min_psnr_db,
        "status": "passed" if psnr_ort >= config.min_psnr_db else "failed",
        "grid_png": str(png_path),
    }
    if bundle.classifier is not None and labels is not None:
        target = torch.tensor(labels)
        for key, batch in images.items():
            result[f"digit_accuracy_{key}"] = float((bundle.classifier.predict(batch) == target).float().mean())
    write_sample_grid(png_path, [("FP", images["fp"]), ("quantized (torch)", images["quantized_torch"]),
                                 ("quantized (ORT)", images["quantized_ort"])])
    return result


def _finite_or_str(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _read_report(run_dir: Path) -> dict:
    path = run_dir / "report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def validate_run(run_dir: str | Path, *, tolerances: Tolerances | None = None,
                 sampling: SamplingSection | None = None, skip_sampling: bool = False) -> ValidationReport:
    from ..models import load_model
    from ..qat.checkpoint import load_checkpoint
    from ..runtime.ort import OrtRunner
    from .report import write_markdown

    started = time.perf_counter()
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir)
    config = checkpoint.recipe.validate_
    tolerances = tolerances or config.tolerances
    sampling = sampling or config.sampling
    bundle = load_model(checkpoint.model_source, checkpoint.recipe.model.subfolder)
    quantized = unet_denoiser(checkpoint.unet)
    ort = OrtRunner(run_dir / "model.onnx")
    inputs = list(parity_batches(checkpoint.unet, bundle.condition, config.batches, config.batch_size, config.seed))
    parity = [output_parity("onnxruntime", quantized, ort, inputs, tolerances)]
    build_entry = _read_report(run_dir).get("build", {})
    engine, reason = engine_runner(run_dir / "model.engine", build_entry.get("compute_capabilities"))
    parity.append(output_parity("tensorrt", quantized, engine, inputs, tolerances) if engine
                  else ArtifactParity("tensorrt", reason))
    sampling_result = ({"status": "not run: --skip-sampling"} if skip_sampling
                       else sampling_parity(bundle, quantized, ort, sampling, run_dir / "samples.png"))
    passed = all(p.status == "passed" or p.status.startswith("not run") for p in parity) and \
        sampling_result["status"] != "failed"
    report = ValidationReport(parity, sampling_result, passed, time.perf_counter() - started)
    full = update_report(run_dir, "validate", {**report.to_dict(), "tolerances": tolerances.model_dump()})
    write_markdown(run_dir / "report.md", full)
    return report


__all__ = ["ArtifactParity", "ValidationReport", "validate_run"]
