"""Stage functions over a run directory, and ``run`` which chains them.

A run directory holds one chain's artifacts: ``checkpoint/``, ``model.onnx`` (packed), ``model_fp16.onnx``
(reference for sizes), ``model.engine``, ``report.json``, ``report.md`` and ``samples.png``. Each stage reads the
previous stage's artifact from it and adds its own entry to ``report.json``; that entry is written last, so it marks
the stage as complete (``run --resume`` continues after the last complete stage). Every stage checks its inputs and
output locations before it starts, and holds the run directory's lock while it writes (:mod:`.run_dir`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .io import update_report
from .recipes import Recipe, load_recipe
from .run_dir import check_onnx_matches_checkpoint, check_output_dir, check_run_dir_exists, run_lock


def parse_compute_capability(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(part) for part in text.split("."))
    except ValueError:
        raise UserError(f"compute capability {text!r} is not MAJOR.MINOR, e.g. 8.9 (RTX 40xx) or 12.0") from None
    return major, minor


@dataclass
class BuildOutcome:
    status: str  # "built" | "not run: <reason>"
    report: dict


def build_run(run_dir: str | Path, compute_capabilities: list[str] | None = None,
              fp16_reference: bool = True, plugin: str = "cpp") -> BuildOutcome:
    """The ``build`` stage: ``model.onnx`` -> ``model.engine`` (plugin layers for every lowbit node).

    ``plugin``: "cpp" (the C++ plugin library, checked before anything is built) or "python" (the fallback)."""
    from .engines.plugin_library import PLUGIN_KINDS, check_plugin_library
    from .engines.tensorrt_import import tensorrt_backend
    from .qat.checkpoint import checkpoint_recipe

    run_dir = check_run_dir_exists(run_dir, "lowbit-deploy train RECIPE --out RUN_DIR")
    onnx_path = run_dir / "model.onnx"
    if not onnx_path.is_file():
        raise UserError(f"no ONNX model at {onnx_path}; run `lowbit-deploy export {run_dir}` first")
    if plugin not in PLUGIN_KINDS:
        raise UserError(f"unknown plugin {plugin!r}; choose one of {', '.join(PLUGIN_KINDS)}")
    config = checkpoint_recipe(run_dir).build
    capabilities = [parse_compute_capability(cc) for cc in (compute_capabilities or config.compute_capabilities)]
    # A model.onnx from another run builds profiles for the wrong shapes; TensorRT then fails with "Invalid Engine".
    signature = check_onnx_matches_checkpoint(run_dir)
    check_output_dir(run_dir, "RUN_DIR")
    if plugin == "cpp":
        check_plugin_library(tensorrt_backend())
    # Profiles come from the deployed signature stored in the ONNX file: no weights are loaded to learn shapes.
    batches = (config.min_batch, config.opt_batch, config.max_batch)
    shapes = signature.shape_ranges(batches)
    with run_lock(run_dir):
        return _build_locked(run_dir, onnx_path, capabilities, shapes, batches, fp16_reference, plugin)


def _build_locked(run_dir: Path, onnx_path: Path, capabilities, shapes, batches, fp16_reference: bool,
                  plugin: str) -> BuildOutcome:
    from .engines.engine import build_engine
    from .runtime.ort import read_signature

    report = build_engine(onnx_path, run_dir / "model.engine", compute_capabilities=capabilities,
                          input_shapes=shapes, plugin=plugin).to_dict()
    fp16_path = run_dir / "model_fp16.onnx"
    if fp16_reference and fp16_path.is_file():
        fp16 = build_engine(fp16_path, run_dir / "model_fp16.engine", compute_capabilities=capabilities,
                            input_shapes=read_signature(fp16_path).shape_ranges(batches), plugin=plugin).to_dict()
        report["fp16_engine_bytes"] = fp16["engine_bytes"]
        report["size_ratio_vs_fp16_engine"] = fp16["engine_bytes"] / report["engine_bytes"]
    update_report(run_dir, "build", report)
    return BuildOutcome("built", report)


def run_pipeline(recipe_path: str | Path, out: str | Path, *, model_path: str | None = None,
                 steps: int | None = None, progress: bool = True, build: bool = True, plugin: str = "cpp",
                 resume: bool = False, variant: str | None = None) -> dict:
    """``lowbit-deploy run``: train -> export -> build -> validate into one run directory (``plugin``: see
    :func:`build_run`). ``resume`` continues a run directory after its last complete stage (a partly trained
    checkpoint continues training); without it ``out`` must not hold a checkpoint yet. ``variant``: ``--variant``,
    the model's weight files (replaces the recipe's ``model.variant``)."""
    from .qat.checkpoint import checkpoint_status

    recipe: Recipe = load_recipe(recipe_path).with_variant(variant)
    out = Path(out)
    check_output_dir(out)
    status = checkpoint_status(out)
    if status == "complete" and not resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it from its last complete stage, or "
                        f"choose a new --out")
    if build:
        _check_plugin_before_training(plugin)
    with run_lock(out):
        return _run_locked(recipe, out, model_path, steps, progress, build, plugin, resume)


def _run_locked(recipe: Recipe, out: Path, model_path, steps, progress, build: bool, plugin: str,
                resume: bool) -> dict:
    from .export.onnx_export import export_run
    from .qat.checkpoint import checkpoint_status
    from .qat.trainer import train
    from .validate.parity import validate_run

    done = completed_stages(out, recipe, steps, build) if resume else {}
    summary: dict = {"run_dir": str(out)}
    if "train" in done:
        summary["train"] = done["train"]
    else:
        summary["train"] = train(recipe, out, model_path=model_path, steps=steps, progress=progress,
                                 resume=resume and checkpoint_status(out) != "none").summary()
    summary["export"] = done["export"] if "export" in done else export_run(out).to_dict()
    if "build" in done:
        summary["build"] = done["build"]
    elif build:
        summary["build"] = _build_or_reason(out, plugin)
    else:
        summary["build"] = {"status": "not run: --no-build"}
        update_report(out, "build", summary["build"])
    summary["validate"] = done["validate"] if "validate" in done else validate_run(out).to_dict()
    return summary


def completed_stages(run_dir: Path, recipe: Recipe, steps: int | None = None,
                     build: bool = True) -> dict[str, dict]:
    """The report entries of the stages ``run --resume`` can skip: complete, in chain order, each newer than the
    artifact it was made from (a stage after one that must run again is not complete)."""
    import json

    from .qat.checkpoint import WEIGHTS_FILE, CHECKPOINT_DIRNAME, checkpoint_status, read_metadata
    from .qat.stages import resolve_stages

    report_path = run_dir / "report.json"
    if checkpoint_status(run_dir) != "complete" or not report_path.is_file():
        return {}
    try:
        report = json.loads(report_path.read_text())
    except ValueError:
        return {}  # a report from before atomic writes, or edited: run every stage again
    weights = run_dir / CHECKPOINT_DIRNAME / WEIGHTS_FILE
    done: dict[str, dict] = {}
    trained = int(read_metadata(weights)["step"]) >= resolve_stages(recipe.train, steps).end_step
    if not (trained and "train" in report):
        return done
    done["train"] = report["train"]
    onnx, engine = run_dir / "model.onnx", run_dir / "model.engine"
    if not ("export" in report and onnx.is_file() and onnx.stat().st_mtime >= weights.stat().st_mtime):
        return done
    done["export"] = report["export"]
    entry = report.get("build", {})
    built = entry.get("status") == "built" and engine.is_file() and engine.stat().st_mtime >= onnx.stat().st_mtime
    skipped_again = not build and entry.get("status") == "not run: --no-build"
    if not (built or skipped_again):
        return done  # a build that did not run is cheap to try again (TensorRT may be installed now)
    done["build"] = entry
    if "validate" in report and (run_dir / "report.md").is_file():
        done["validate"] = report["validate"]
    return done


def _check_plugin_before_training(plugin: str) -> None:
    """A missing or stale C++ plugin library fails ``run`` before training, not after it."""
    from .engines import backend_unavailable_reason
    from .engines.plugin_library import PLUGIN_KINDS, check_plugin_library
    from .engines.tensorrt_import import tensorrt_backend

    if plugin not in PLUGIN_KINDS:
        raise UserError(f"unknown plugin {plugin!r}; choose one of {', '.join(PLUGIN_KINDS)}")
    if plugin == "cpp" and backend_unavailable_reason() is None:
        check_plugin_library(tensorrt_backend())


def _build_or_reason(run_dir: Path, plugin: str) -> dict:
    from .engines import backend_unavailable_reason

    reason = backend_unavailable_reason()
    if reason:
        entry = {"status": f"not run: {reason}"}
        update_report(run_dir, "build", entry)
        return entry
    return {"status": "built", **build_run(run_dir, plugin=plugin).report}
