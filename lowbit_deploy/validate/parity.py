"""The ``validate`` stage: numeric parity of every artifact against the PyTorch deployed model.

The reference is the checkpoint rewritten by the export handlers (packed weights decoded by the op's reference,
cached time tables, float parameters in their stored type): exactly what the artifacts compute. Every input comes
from the deployed signature (a step index for cached time features).

1. Output parity on seeded batches, gated per backend (``validate.gates``; calibrated in docs/gates.md): PyTorch
   deployed vs ONNX Runtime, and vs the TensorRT engine where a GPU and TensorRT exist (otherwise reported
   "not run: <reason>", never "passed").
2. Exact weight parity of the ONNX file (validate/weights.py): stored bytes and ONNX Runtime's decode equal the
   deployed model's. Output gates cannot see a one-ulp scale change under float32 op-ordering noise; this can.
3. Optionally (``--per-layer``), per-layer bisection (validate/per_layer.py) naming the first layer that disagrees,
   against ONNX Runtime and, where a GPU runs the engine, against TensorRT.
4. The deployment rounding: trained (fake-quantized, float time layers) vs deployed model on the same inputs --
   informative, it is the fp16 storage of tables and float parameters, not an artifact error.
5. End-to-end sampling with fixed seeds: PSNR of ONNX Runtime samples vs PyTorch samples (gated), and FP vs
   quantized (informative), digit-classifier accuracy where the model has classes, and a PNG grid.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..io import update_report
from ..recipes import Gates, SamplingSection, Tolerances
from ..signature import DeployedSignature, TimeInput, signature_for
from .sampling import Runner, module_runner, unet_runner
from .stats import OutputStats, check, compare, merge

Feeds = dict[str, torch.Tensor]


@dataclass
class ArtifactParity:
    artifact: str
    status: str  # "passed" | "failed" | "not run: <reason>"
    stats: OutputStats | None = None
    failures: list[str] = field(default_factory=list)
    details: dict | None = None

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "status": self.status, "failures": self.failures,
                "stats": self.stats.to_dict() if self.stats else None,
                **({"details": self.details} if self.details else {})}


@dataclass
class ValidationReport:
    parity: list[ArtifactParity]
    sampling: dict
    passed: bool
    seconds: float
    per_layer: dict = field(default_factory=dict)
    gates: dict = field(default_factory=dict)          # the gates applied (floor-following values resolved)
    noise_floor: dict | None = None                    # validate/floor.py, where the gates follow it
    per_layer_tensorrt: dict = field(default_factory=dict)  # the same bisection against the engine (GPU only)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "seconds": round(self.seconds, 2),
                "parity": [p.to_dict() for p in self.parity], "sampling": self.sampling,
                "per_layer": self.per_layer, "per_layer_tensorrt": self.per_layer_tensorrt, "gates": self.gates,
                "noise_floor": self.noise_floor}


def parity_feeds(signature: DeployedSignature, condition, batches: int, batch_size: int, seed: int) -> list[Feeds]:
    """Seeded inputs spanning the time range (every step index, or timesteps in [0, 1000)); the same for every
    artifact."""
    generator = torch.Generator().manual_seed(seed)
    feeds = []
    for _ in range(batches):
        states = condition.sample_conditions(batch_size, generator)  # with the added conditions, if any
        feeds.append(signature.random_feeds(batch_size, generator, states))
    return feeds


def output_parity(name: str, reference: Runner, candidate: Runner, inputs: list[Feeds],
                  tolerances: Tolerances) -> ArtifactParity:
    stats = []
    with torch.no_grad():
        for feeds in inputs:
            stats.append(compare(reference(feeds).numpy(), candidate(feeds).numpy()))
    merged = merge(stats)
    failures = check(merged, tolerances)
    return ArtifactParity(name, "failed" if failures else "passed", merged, failures)


def trained_runner(unet, signature: DeployedSignature) -> Runner:
    """The trained model driven by deployed feeds: a step index becomes the timestep it stands for."""
    run = unet_runner(unet)

    def trained(feeds: Feeds) -> torch.Tensor:
        if signature.time_input is TimeInput.STEP_INDEX:
            timesteps = torch.tensor(signature.step_timesteps)[feeds["step_index"]]
            feeds = {**feeds, "timestep": timesteps.float()}
        return run(feeds)

    return trained


def deployment_rounding(trained: Runner, deployed: Runner, inputs: list[Feeds]) -> dict:
    with torch.no_grad():
        stats = merge([compare(trained(feeds).numpy(), deployed(feeds).numpy()) for feeds in inputs])
    return {"what": "trained (fake-quant, float time layers, fp32 float params) vs deployed (fp16 tables and "
                    "float params); informative, not gated", **stats.to_dict()}


def engine_runner(engine_path: Path, built_for: list[str] | None,
                  signature: DeployedSignature) -> tuple[Runner | None, str]:
    """The engine as a runtime Runner (feeds checked against the signature before TensorRT sees them), or None and
    the reason it cannot run here."""
    if not engine_path.is_file():
        return None, "not run: no engine (run `lowbit-deploy build`)"
    from ..runtime.runners import BackendUnavailableError, open_runner

    try:
        return open_runner(engine_path, "tensorrt", signature=signature, built_for=built_for), ""
    except BackendUnavailableError as error:
        return None, f"not run: {error.reason}"


def sampling_parity(bundle, signature: DeployedSignature, quantized: Runner, ort: Runner, config: SamplingSection,
                    num_steps: int, png_path: Path, one_flip: tuple[Runner, float] | None = None) -> dict:
    """ORT vs torch samples at ``config.min_psnr_db``; with ``one_flip`` (a runner whose first call carries one
    activation rounding flip per batch item, a margin) the gate is at most that flip's PSNR minus the margin."""
    from . import sampling
    from .report import write_sample_grid

    condition, count = bundle.condition, config.num_samples
    labels = None if condition.num_classes is None else [index % condition.num_classes for index in range(count)]
    cond = condition.sample_conditions(count, torch.Generator().manual_seed(config.seed)) if labels is None else \
        condition.label_conditions(labels, config.seed)
    null = condition.null_conditions(count)
    common = dict(scheduler_config=bundle.scheduler_config, num_steps=num_steps,
                  guidance_scale=config.guidance_scale, seed=config.seed)
    fp_signature = signature_for(bundle.unet, signature.seq_len)
    with torch.no_grad():
        images = {
            "fp": sampling.sample(unet_runner(bundle.unet), fp_signature, cond, null, **common),
            "quantized_torch": sampling.sample(quantized, signature, cond, null, **common),
            "quantized_ort": sampling.sample(ort, signature, cond, null, **common),
        }
        flipped = sampling.sample(one_flip[0], signature, cond, null, **common) if one_flip else None
    psnr_ort = sampling.psnr(images["quantized_ort"], images["quantized_torch"])
    gate, flip_psnr = config.min_psnr_db, None
    if flipped is not None and math.isfinite(flip_psnr := sampling.psnr(flipped, images["quantized_torch"])):
        gate = min(gate, round(flip_psnr - one_flip[1], 1))
    result = {
        "num_samples": count, "num_steps": num_steps, "guidance_scale": config.guidance_scale,
        "seed": config.seed,
        "psnr_ort_vs_torch_db": _finite_or_str(psnr_ort),
        "psnr_fp_vs_quantized_db": _finite_or_str(sampling.psnr(images["quantized_torch"], images["fp"])),
        "min_psnr_db": gate,
        "status": "passed" if psnr_ort >= gate else "failed",
        "grid_png": str(png_path),
    }
    if flip_psnr is not None:
        result["one_flip_psnr_db"] = _finite_or_str(flip_psnr)
    if result["status"] == "failed":
        result["passes_with"] = f"--min-psnr-db {psnr_ort!r}"
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


@dataclass
class ValidationInputs:
    """What every check of one run shares: the checkpoint, its deployed torch model and the seeded inputs."""

    run_dir: Path
    checkpoint: object
    bundle: object
    deployed: object  # export.deployed.DeployedUNet
    inputs: list[Feeds]
    _references: list[torch.Tensor] | None = None
    _floor: object | None = None
    trained_outputs: list[torch.Tensor] | None = None  # set where the trained model was deployed in place

    @property
    def signature(self) -> DeployedSignature:
        return self.checkpoint.signature

    def reference_outputs(self) -> list[torch.Tensor]:
        """The deployed model's outputs on ``inputs`` (computed once: every artifact is compared with them)."""
        if self._references is None:
            run = module_runner(self.deployed, self.signature)
            with torch.no_grad():
                self._references = [run(feeds) for feeds in self.inputs]
        return self._references

    def noise_floor(self):
        """The deployed model's float32 noise floor on ``inputs`` (validate/floor.py), measured once."""
        from .floor import measure_floor

        if self._floor is None:
            self._floor = measure_floor(self.deployed, self.inputs, self.reference_outputs())
        return self._floor

    def effective_gates(self, gates: Gates, sampling: SamplingSection) -> tuple[Gates, SamplingSection]:
        """``gates`` and ``sampling`` with their floor-following values resolved for this model."""
        from .floor import floor_gates

        return floor_gates(gates, sampling, self.noise_floor() if gates.follow_floor else None)

    def reference_runner(self) -> Runner:
        outputs = {id(feeds): output for feeds, output in zip(self.inputs, self.reference_outputs())}
        return lambda feeds: outputs[id(feeds)]


def prepare_validation(run_dir: str | Path, seed: int | None = None, *,
                       keep_trained: bool = True) -> ValidationInputs:
    """Load ``run_dir``'s checkpoint, deploy it and draw the parity inputs (``seed``: the recipe's by default).

    ``keep_trained=False`` runs the trained model on the inputs first (``trained_outputs``) and then deploys it in
    place: one copy of the weights instead of two (an SD1.5 UNet: 3.4 GB less)."""
    from ..export.deployed import deploy_unet
    from ..export.handlers import ExportOptions
    from ..models import load_recipe_model
    from ..qat.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir)
    recipe, config = checkpoint.recipe, checkpoint.recipe.validate_
    bundle = load_recipe_model(recipe, checkpoint.model_source)
    options = ExportOptions(packing=recipe.export.packing, float_storage=recipe.export.float_storage)
    inputs = parity_feeds(checkpoint.signature, bundle.condition, config.batches, config.batch_size,
                          config.seed if seed is None else seed)
    trained = None
    if not keep_trained:
        run = trained_runner(checkpoint.unet, checkpoint.signature)
        with torch.no_grad():
            trained = [run(feeds) for feeds in inputs]
    deployed = deploy_unet(checkpoint.unet, checkpoint.plan, checkpoint.signature, options, inplace=not keep_trained)
    return ValidationInputs(run_dir, checkpoint, bundle, deployed, inputs, trained_outputs=trained)


def check_onnx(onnx_path: Path, context: ValidationInputs, gates: Gates,
               ort=None) -> tuple[ArtifactParity, ArtifactParity]:
    """The ONNX file's two checks: outputs against the ONNX Runtime gates, and exact weight parity (``ort``: an
    OrtRunner of ``onnx_path`` to reuse; default: one with the default weight mode)."""
    from ..runtime.ort import OrtRunner
    from .weights import weight_parity

    ort = ort or OrtRunner(onnx_path)
    if ort.signature != context.signature:
        raise UserError(f"{onnx_path} was exported from another model (its signature differs from the "
                        f"checkpoint's); run `lowbit-deploy export {context.run_dir}` again")
    outputs = output_parity("onnxruntime", context.reference_runner(), ort, context.inputs, gates.onnxruntime)
    outputs.details = {"weights": ort.weights}  # the session's weight mode (runtime/ort.py WEIGHT_MODES)
    weights = weight_parity(onnx_path, context.deployed)
    return outputs, ArtifactParity("onnxruntime weights (exact)", "passed" if weights.passed else "failed",
                                   None, weights.failures, weights.to_dict())


# The sampling comparison runs 3 models x samples x steps (x2 with guidance). Its default work is bounded by
# parameters x samples x steps: the default model (~2M parameters) keeps the recipe's values, an SD1.5 UNet (860M)
# samples 2 images x 2 steps (~2 min per model on 2 CPU cores instead of 15-25).
SAMPLING_BUDGET_PARAMETER_STEPS = 4e9
SCALED_SAMPLES, SCALED_STEPS = 2, 2


def scaled_sampling(config: SamplingSection, steps: int, signature: DeployedSignature,
                    parameters: int) -> SamplingSection:
    """``config`` (sampling ``steps`` steps) with at most SCALED_SAMPLES samples x SCALED_STEPS steps when
    ``parameters x samples x steps`` passes SAMPLING_BUDGET_PARAMETER_STEPS (the steps stay where the model takes a
    step index: its time features or activation scales are fixed to its schedule)."""
    if parameters * config.num_samples * steps <= SAMPLING_BUDGET_PARAMETER_STEPS:
        return config
    update = {"num_samples": min(config.num_samples, SCALED_SAMPLES)}
    if signature.time_input is not TimeInput.STEP_INDEX:
        update["num_steps"] = min(steps, SCALED_STEPS)
    return config.model_copy(update=update)


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def validate_run(run_dir: str | Path, *, gates: Gates | None = None, sampling: SamplingSection | None = None,
                 skip_sampling: bool = False, per_layer: bool = False,
                 per_layer_chunk: int | None = None, ort_weights: str = "auto",
                 scale_sampling: bool = True) -> ValidationReport:
    """Every check of ``run_dir``'s artifacts against its deployed torch model (see the module docstring);
    ``per_layer``: also bisect layer by layer (writes per_layer_sqnr.png); ``ort_weights``: how the one ONNX
    Runtime session holds the packed weights (runtime/ort.py); ``scale_sampling``: shrink the sampling comparison
    of a large model (:func:`scaled_sampling`; off where the user chose samples or steps)."""
    from ..runtime.ort import check_weight_mode

    from ..run_dir import check_run_dir_exists, run_lock

    run_dir = check_run_dir_exists(run_dir, "lowbit-deploy train RECIPE --out RUN_DIR")
    # Locked: another process exporting or building into the run would swap model.onnx under the comparison.
    with run_lock(run_dir):
        return _validate_locked(run_dir, gates, sampling, skip_sampling, per_layer, per_layer_chunk,
                                check_weight_mode(ort_weights), scale_sampling)


def _validate_locked(run_dir: Path, gates: Gates | None, sampling: SamplingSection | None, skip_sampling: bool,
                     per_layer: bool, per_layer_chunk: int | None, ort_weights: str,
                     scale_sampling: bool) -> ValidationReport:
    from ..export.memory import check_validate_memory, checkpoint_parameters
    from ..qat.checkpoint import checkpoint_file
    from ..run_dir import check_onnx_matches_checkpoint
    from ..runtime.ort import OrtRunner
    from ..runtime.trt import device_compute_capability
    from .flip_floor import has_activation_quantizers, one_flip_runner
    from .per_layer import ChunkOptions
    from .report import write_markdown

    started = time.perf_counter()
    onnx_path = run_dir / "model.onnx"
    check_onnx_matches_checkpoint(run_dir)  # bad input fails before any model is loaded
    check_validate_memory(checkpoint_parameters(checkpoint_file(run_dir)))
    context = prepare_validation(run_dir, keep_trained=False)
    recipe, signature = context.checkpoint.recipe, context.signature
    config = recipe.validate_
    sampling = asked = sampling or config.sampling
    if scale_sampling:
        sampling = scaled_sampling(sampling, recipe.sampling_steps(sampling.num_steps), signature,
                                   _parameter_count(context.bundle.unet))
    scaled = sampling != asked
    num_steps = recipe.sampling_steps(sampling.num_steps)
    if signature.time_input is TimeInput.STEP_INDEX and num_steps != signature.num_steps:
        raise UserError(f"sampling with {num_steps} steps, but the time features are cached for "
                        f"{signature.schedule}; pass --sampling-steps {signature.num_steps} (or leave it out)")
    gates, sampling = context.effective_gates(gates or config.gates, sampling)
    ort = OrtRunner(onnx_path, weights=ort_weights)  # one session for the output checks and the sampling
    parity = list(check_onnx(onnx_path, context, gates, ort))
    build_entry = _read_report(run_dir).get("build", {})
    engine, reason = engine_runner(run_dir / "model.engine", build_entry.get("compute_capabilities"), signature)
    parity.append(output_parity("tensorrt", context.reference_runner(), engine, context.inputs, gates.tensorrt)
                  if engine else ArtifactParity("tensorrt", reason))
    not_asked = {"status": "not run: pass --per-layer"}
    layers = _per_layer(context, onnx_path, gates.per_layer_min_sqnr_db, per_layer_chunk) if per_layer else not_asked
    layers_trt = (_per_layer(context, onnx_path, gates.tensorrt.min_sqnr_db, per_layer_chunk, "tensorrt",
                             ChunkOptions(plugin=build_entry.get("plugin", "cpp"),
                                          compute_capability=device_compute_capability()))
                  if per_layer and engine else {"status": reason} if per_layer else not_asked)
    deployed = module_runner(context.deployed, signature)
    trained = dict(zip(map(id, context.inputs), context.trained_outputs))
    rounding = deployment_rounding(lambda feeds: trained[id(feeds)], deployed, context.inputs)
    flip_margin = gates.follow_floor.sampling_flip_margin_db if gates.follow_floor else None
    one_flip = (one_flip_runner(context.deployed), flip_margin) if flip_margin is not None and \
        has_activation_quantizers(context.deployed) else None
    sampling_result = ({"status": "not run: --skip-sampling"} if skip_sampling
                       else sampling_parity(context.bundle, signature, deployed, ort, sampling, num_steps,
                                            run_dir / "samples.png", one_flip))
    if scaled and not skip_sampling:
        sampling_result["scaled_to_model_size"] = (
            f"{asked.num_samples} samples x {recipe.sampling_steps(asked.num_steps)} steps asked; parameters x "
            f"samples x steps above {SAMPLING_BUDGET_PARAMETER_STEPS:.0e}: pass --samples / --sampling-steps to "
            f"choose")
    passed = all(p.status == "passed" or p.status.startswith("not run") for p in parity) and \
        sampling_result["status"] != "failed" and layers["status"] != "failed" and layers_trt["status"] != "failed"
    report = ValidationReport(parity, sampling_result, passed, time.perf_counter() - started, layers,
                              gates.model_dump(), context._floor.to_dict() if context._floor else None, layers_trt)
    full = update_report(run_dir, "validate", {**report.to_dict(), "deployment_rounding": rounding,
                                               "conditions": context.bundle.condition_report})
    write_markdown(run_dir / "report.md", full)
    return report


# per_layer_sqnr.png for ONNX Runtime (the name README and report.md link), per_layer_sqnr_<backend>.png otherwise
PER_LAYER_PLOTS = {"onnxruntime": "per_layer_sqnr.png", "tensorrt": "per_layer_sqnr_tensorrt.png"}


def _per_layer(context: ValidationInputs, onnx_path: Path, min_sqnr_db: float, chunk: int | None,
               backend: str = "onnxruntime", options=None) -> dict:
    """Per-layer bisection against ``backend`` on the first parity batch (TensorRT: gated at its provisional output
    SQNR gate, since its fp16/TF32 kernels are not float32-exact)."""
    from .per_layer import DEFAULT_CHUNK, per_layer_parity, write_sqnr_plot

    result = per_layer_parity(onnx_path, context.deployed, context.inputs[:1], min_sqnr_db, chunk or DEFAULT_CHUNK,
                              backend=backend, options=options)
    write_sqnr_plot(context.run_dir / PER_LAYER_PLOTS[backend], result)
    return {**result.to_dict(), "plot": PER_LAYER_PLOTS[backend]}


__all__ = ["ArtifactParity", "ValidationInputs", "ValidationReport", "check_onnx", "prepare_validation",
           "validate_run"]
