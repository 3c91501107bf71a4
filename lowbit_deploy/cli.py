"""The ``lowbit-deploy`` command line: each subcommand parses, calls one library function, and prints.

Every command ends with one line ``PASSED|FAILED | Runtime: Ns | Command: ...``; the exit codes, ``--json``,
``--debug``, ``--quiet`` and ``-v`` are cli_output.py's (documented there and in docs/ci.md). A subcommand returns
False for FAILED and hands its result data to :func:`report_result` for ``--json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_output import PROGRESS, LowbitGroup, report_result, stage
from .errors import UserError

RECIPE = click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
RUN_DIR = click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
PLUGIN = click.option("--plugin", type=click.Choice(["cpp", "python"]), default="cpp", show_default=True,
                      help="lowbit plugin creators that build the engine: the C++ plugin library (loadable by C++ "
                           "apps; build it with `make -C plugins tensorrt`) or the Python plugin (fallback; engines "
                           "are byte-identical).")
VARIANT = click.option("--variant", default=None,
                       help="Weight-file variant of the model folder, e.g. fp16 for diffusion_pytorch_model.fp16."
                            "safetensors (loaded as float32; overrides the recipe's model.variant; the run records it "
                            "for validate and --resume).")


@click.group(cls=LowbitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lowbit-deploy")
def main() -> None:
    """Quantize a diffusers UNet to 1-8-bit weights, export packed ONNX, build TensorRT engines with low-bit
    plugins, and validate every artifact against PyTorch.

    Typical use: `lowbit-deploy run recipes/tiny-w2-balanced.yaml --out runs/w2` (all stages), or the stages one by
    one: train -> export -> build -> validate on the same RUN_DIR. `lowbit-deploy inspect RUN_DIR` shows what a run
    holds.

    Exit codes: 0 passed, 1 failed (a check did not pass), 2 bad input, 70 internal error, 130 interrupted (Ctrl-C).
    --json, --debug, -q and -v are accepted before or after the command (docs/ci.md).
    """


@main.command()
@RECIPE
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory to write the checkpoint (and later artifacts) into.")
@click.option("--model", "model_path", default=None,
              help="Local diffusers checkpoint folder (overrides the recipe's model.path; default: embedded model).")
@VARIANT
@click.option("--steps", type=click.IntRange(min=0), default=None,
              help="Override train.steps (0 = post-training quantization only). With train.stages: stop after N "
                   "steps in total (stages in order); --resume without it continues to the end.")
@click.option("--resume", is_flag=True, help="Continue the checkpoint already in --out from its last saved step.")
@click.option("--device", default=None,
              help="cpu, cuda or cuda:N (default: cuda when available, else cpu). Under torchrun each process takes "
                   "cuda:LOCAL_RANK (docs/training-on-gpus.md).")
@PROGRESS
@stage
def train(recipe: Path, run_dir: Path, model_path: str | None, variant: str | None, steps: int | None,
          resume: bool, device: str | None, progress: bool) -> bool:
    """Quantization-aware training of the UNet named by RECIPE (distillation from its float teacher)."""
    from .qat.trainer import train as run_training
    from .recipes import load_recipe

    result = run_training(load_recipe(recipe).with_variant(variant), run_dir, model_path=model_path, steps=steps,
                          resume=resume, progress=progress, device=device)
    report_result(result.summary())
    click.echo(f"checkpoint: {result.checkpoint}  ({result.quantized_layers} quantized layers, "
               f"{result.average_bits:.2f} average bits, loss {result.first_loss} -> {result.last_loss})")
    return True


@main.command()
@RUN_DIR
@click.option("--fp16-reference/--no-fp16-reference", default=None,
              help="Also write model_fp16.onnx, the plain fp16 model, for size comparison (default: the recipe's "
                   "export.export_fp16_reference). docs/scale.md: the memory each costs.")
@stage
def export(run_dir: Path, fp16_reference: bool | None) -> bool:
    """Export RUN_DIR's checkpoint to RUN_DIR/model.onnx with packed low-bit weights (lowbit::UnpackDequantize) and,
    for EfficientDM recipes, quantized activations (lowbit::QuantizeDequantizeActivation, or standard Q/DQ)."""
    from .export.onnx_export import export_run

    report = export_run(run_dir, fp16_reference)
    report_result(report.to_dict())
    activations = (f", activations: {report.activation_nodes} per-step lowbit nodes + {report.activation_qdq_pairs} "
                   f"INT8 Q/DQ pairs" if report.activation_nodes or report.activation_qdq_pairs else "")
    click.echo(f"onnx: {report.onnx_path}  {report.onnx_bytes:,} bytes, {report.lowbit_nodes} lowbit weight nodes"
               + activations)
    if report.fp16_onnx_bytes:
        click.echo(f"fp16 reference: {report.fp16_onnx_bytes:,} bytes  (packed is {report.size_ratio_vs_fp16:.2f}x "
                   f"smaller)")
    return True


@main.command()
@RUN_DIR
@click.option("--compute-capability", "compute_capabilities", multiple=True,
              help="Target GPU compute capability for ahead-of-time builds, e.g. 8.9; repeatable "
                   "(default: the recipe's build.compute_capabilities).")
@click.option("--fp16-reference/--no-fp16-reference", default=True,
              help="Also build an engine from model_fp16.onnx to report the size ratio.")
@PLUGIN
@stage
def build(run_dir: Path, compute_capabilities: tuple[str, ...], fp16_reference: bool, plugin: str) -> bool:
    """Build RUN_DIR/model.engine (TensorRT, or TensorRT-RTX ahead of time) with low-bit plugin layers."""
    from .pipeline import build_run

    report = build_run(run_dir, list(compute_capabilities) or None, fp16_reference, plugin=plugin).report
    report_result(report)
    click.echo(f"engine: {report['engine_path']}  {report['engine_bytes']:,} bytes, "
               f"{report['plugin_layers']} weight plugin layers"
               + (f", {report['activation_layers']} activation plugin layers"
                  if report.get("activation_layers") else "")
               + f", backend {report['backend']}, {report['plugin']} plugin"
               + (f" ({report['plugin_library']})" if report.get("plugin_library") else ""))
    if "fp16_engine_bytes" in report:
        click.echo(f"fp16 engine: {report['fp16_engine_bytes']:,} bytes  (packed is "
                   f"{report['size_ratio_vs_fp16_engine']:.2f}x smaller)")
    return True


@main.command()
@RUN_DIR
@click.option("--max-abs", type=float, default=None, help="Max absolute difference allowed per output.")
@click.option("--max-rel", type=float, default=None, help="Max relative difference allowed per output.")
@click.option("--min-cosine", type=float, default=None, help="Min cosine similarity per output.")
@click.option("--min-sqnr-db", type=float, default=None, help="Min signal-to-quantization-noise ratio (dB).")
@click.option("--min-psnr-db", type=float, default=None, help="Min PSNR of ORT vs PyTorch samples (dB).")
@click.option("--samples", type=int, default=None, help="Number of samples in the sampling comparison.")
@click.option("--sampling-steps", type=int, default=None,
              help="Scheduler steps in the sampling comparison (default: the recipe's; a model with cached time "
                   "features samples its own schedule).")
@click.option("--skip-sampling", is_flag=True, help="Only compare outputs, no end-to-end sampling.")
@click.option("--per-layer", is_flag=True,
              help="Also compare every quantized layer's and block's output between PyTorch and ONNX Runtime and "
                   "name the first one below --per-layer-min-sqnr-db (report.md table, per_layer_sqnr.png).")
@click.option("--per-layer-min-sqnr-db", type=float, default=None,
              help="Per-layer SQNR gate in dB (default: the model's float32 noise floor - 20 dB, or the recipe's "
                   "validate.gates.per_layer_min_sqnr_db where written; docs/gates.md).")
@click.option("--per-layer-chunk", type=click.IntRange(min=1), default=None,
              help="Layer outputs compared per ONNX Runtime session (bounds memory on large models; default 64).")
@click.option("--ort-weights", type=click.Choice(["auto", "packed", "folded"]), default="auto", show_default=True,
              help="How ONNX Runtime holds the packed weights: packed (unpacked per layer at every call; little "
                   "memory), folded (decoded to float32 when the session opens; faster calls, float32-sized "
                   "memory), auto (folded up to 100M weights, else packed). docs/scale.md")
@stage
def validate(run_dir: Path, max_abs, max_rel, min_cosine, min_sqnr_db, min_psnr_db, samples, sampling_steps,
             skip_sampling: bool, per_layer: bool, per_layer_min_sqnr_db, per_layer_chunk, ort_weights: str) -> bool:
    """Compare every artifact in RUN_DIR with the PyTorch quantized model; exit 1 if any gate fails.

    Gates are per backend (recipe validate.gates.onnxruntime / .tensorrt; defaults calibrated in docs/gates.md);
    the output-gate flags override them for every backend. The ONNX file's weights are always compared exactly.
    """
    from .qat.checkpoint import checkpoint_recipe
    from .validate.parity import validate_run

    config = checkpoint_recipe(run_dir).validate_
    tolerance_overrides = {k: v for k, v in dict(max_abs=max_abs, max_rel=max_rel, min_cosine=min_cosine,
                                                 min_sqnr_db=min_sqnr_db).items() if v is not None}
    gates = config.gates.model_copy(update={
        backend: with_overrides(config.gates.for_backend(backend), tolerance_overrides)
        for backend in ("onnxruntime", "tensorrt")})
    if per_layer_min_sqnr_db is not None:
        gates = gates.model_copy(update={"per_layer_min_sqnr_db": per_layer_min_sqnr_db})
    if gates.follow_floor is not None:  # a gate given as a flag is used as given, not relative to the noise floor
        fixed = {"output_margin_db": min_sqnr_db, "max_abs_factor": max_abs,
                 "per_layer_margin_db": per_layer_min_sqnr_db, "sampling_margin_db": min_psnr_db,
                 "sampling_flip_margin_db": min_psnr_db}
        gates = gates.model_copy(update={"follow_floor": gates.follow_floor.model_copy(
            update={key: None for key, flag in fixed.items() if flag is not None})})
    sampling_overrides = {k: v for k, v in dict(min_psnr_db=min_psnr_db, num_samples=samples,
                                                num_steps=sampling_steps).items() if v is not None}
    report = validate_run(run_dir, gates=gates, sampling=with_overrides(config.sampling, sampling_overrides),
                          skip_sampling=skip_sampling, per_layer=per_layer, per_layer_chunk=per_layer_chunk,
                          ort_weights=ort_weights, scale_sampling=samples is None and sampling_steps is None)
    report_result(report.to_dict())
    _print_validation(report.to_dict())
    return report.passed


def with_overrides(section, overrides: dict):
    """A recipe section with command-line overrides, validated by the same schema as the recipe."""
    from pydantic import ValidationError

    try:
        return type(section).model_validate({**section.model_dump(), **overrides})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise UserError(f"invalid option value: {problems}") from None


def _db(value: float | str) -> str:
    """A report's dB figure: a number, or the string report.json keeps for infinity (identical outputs)."""
    return f"{value:.1f} dB" if isinstance(value, (int, float)) else f"{value} dB"


def _print_validation(report: dict) -> None:
    for item in report["parity"]:
        stats = item["stats"]
        detail = "" if not stats else (f"  max_abs={stats['max_abs']} max_rel={stats['max_rel']} "
                                       f"cosine={stats['cosine']} sqnr_db={stats['sqnr_db']}")
        click.echo(f"[{item['artifact']}] {item['status']}{detail}")
        for failure in item["failures"]:
            click.echo(f"    {failure}")
    floor, gates = report.get("noise_floor"), report.get("gates")
    if floor and gates:
        click.echo(f"[gates] float32 noise floor {floor['sqnr_db']:.1f} dB -> onnxruntime SQNR >= "
                   f"{gates['onnxruntime']['min_sqnr_db']} dB, max_abs <= {gates['onnxruntime']['max_abs']}; "
                   f"per-layer >= {gates['per_layer_min_sqnr_db']} dB"
                   + (f"; sampling PSNR >= {report['sampling']['min_psnr_db']} dB"
                      if "min_psnr_db" in report["sampling"] else "")
                   + (f" (one activation rounding flip per image: {_db(report['sampling']['one_flip_psnr_db'])})"
                      if "one_flip_psnr_db" in report["sampling"] else ""))
    for key, label in (("per_layer", "per-layer"), ("per_layer_tensorrt", "per-layer tensorrt")):
        per_layer = report.get(key) or {}
        if "verdict" in per_layer:
            click.echo(f"[{label}] {per_layer['status']}: {per_layer['verdict']}")
        elif key == "per_layer_tensorrt" and per_layer.get("status", "").startswith("not run: ") \
                and "--per-layer" not in per_layer["status"]:
            click.echo(f"[{label}] {per_layer['status']}")
    sampling = report["sampling"]
    click.echo("[sampling] " + ", ".join(f"{k}={v}" for k, v in sampling.items()))


@main.command()
@RECIPE
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory for every artifact (must not hold a checkpoint yet, unless --resume).")
@click.option("--model", "model_path", default=None, help="Local diffusers checkpoint folder to quantize.")
@VARIANT
@click.option("--steps", type=click.IntRange(min=0), default=None, help="Override train.steps.")
@click.option("--build/--no-build", default=True, help="Build the TensorRT engine (needs TensorRT or TensorRT-RTX).")
@PLUGIN
@click.option("--resume", is_flag=True,
              help="Continue RUN_DIR after its last complete stage (e.g. after a crash), training included.")
@PROGRESS
@stage
def run(recipe: Path, run_dir: Path, model_path, variant, steps, build: bool, plugin: str, resume: bool,
        progress: bool) -> bool:
    """All stages in one RUN_DIR: train -> export -> build -> validate; writes report.json, report.md, samples.png."""
    from .pipeline import run_pipeline

    summary = run_pipeline(recipe, run_dir, model_path=model_path, steps=steps, progress=progress, build=build,
                           plugin=plugin, resume=resume, variant=variant)
    report_result(summary)
    click.echo(f"train: {json.dumps(summary['train'])}")
    export_report = summary["export"]
    click.echo(f"export: {export_report['onnx_bytes']:,} bytes packed ONNX" + (
        f" vs {export_report['fp16_onnx_bytes']:,} fp16 ({export_report['size_ratio_vs_fp16']:.2f}x)"
        if export_report["fp16_onnx_bytes"] else ""))
    build_report = summary["build"]
    click.echo("build: " + (build_report["status"] if build_report["status"] != "built" else
                            f"{build_report['engine_bytes']:,} bytes engine, {build_report['plugin_layers']} plugin "
                            f"layers ({build_report['plugin']} plugin)"))
    _print_validation(summary["validate"])
    click.echo(f"report: {run_dir / 'report.md'}")
    return summary["validate"]["passed"]


@main.command()
@RECIPE
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for plan.json, sensitivity.json, report.md and the plot; finished candidates are "
                   "cached there, so re-running resumes.")
@click.option("--model", "model_path", default=None,
              help="Local diffusers checkpoint folder (overrides the recipe's model.path; default: embedded model).")
@VARIANT
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Parallel processes measuring candidates (overrides analyze.workers).")
@PROGRESS
@stage
def analyze(recipe: Path, out_dir: Path, model_path: str | None, variant: str | None, workers: int | None,
            progress: bool) -> bool:
    """BitsFusion's sensitivity analysis of RECIPE's model: a mixed-precision plan (OUT/plan.json) at the recipe's
    analyze.target_average_bits, for `quantize: {plan: ...}` in a training recipe."""
    from .analyze import analyze as run_analysis
    from .recipes import load_recipe

    result = run_analysis(load_recipe(recipe).with_variant(variant), out_dir, model_path=model_path, workers=workers,
                          progress=progress)
    report_result({"plan_path": result.plan_path, "average_bits": result.average_bits, "target": result.target,
                   "threshold": result.assignment.threshold, "candidates": result.candidates,
                   "computed": result.computed, "seconds": result.seconds, "metric": result.metric})
    click.echo(f"plan: {result.plan_path}  ({result.average_bits:.4f} average bits, target {result.target}; "
               f"S_o={result.assignment.threshold:.4g}; {result.computed} of {result.candidates} candidates "
               f"measured now)")
    click.echo(f"semantic metric: {result.metric}")
    click.echo(f"report: {out_dir / 'report.md'}")
    return True


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@stage
def inspect(run_dir: Path) -> bool:
    """What RUN_DIR holds, without loading weights: the plan (every layer's bits and grid or role, totals per bit
    width, average bits), packing formats and stored bits per weight of model.onnx, the deployed signature, every
    file's size, and what validation found per backend (gates, noise floor, per-layer verdicts). Missing pieces
    are listed as missing."""
    from .inspect_run import describe_run, inspect_run

    info = inspect_run(run_dir)
    report_result(info)
    for line in describe_run(info):
        click.echo(line)
    return True


if __name__ == "__main__":  # pragma: no cover
    main()
