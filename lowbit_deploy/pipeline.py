"""Stage functions over a run directory, and ``run`` which chains them.

A run directory holds one chain's artifacts: ``checkpoint/``, ``model.onnx`` (packed), ``model_fp16.onnx``
(reference for sizes), ``model.engine``, ``report.json``, ``report.md`` and ``samples.png``. Each stage reads the
previous stage's artifact from it and adds its own entry to ``report.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .io import update_report
from .recipes import Recipe, load_recipe


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
    from .build.engine import build_engine
    from .build.plugin_library import PLUGIN_KINDS, check_plugin_library
    from .build.tensorrt_import import tensorrt_backend
    from .qat.checkpoint import checkpoint_recipe
    from .runtime.ort import read_signature

    run_dir = Path(run_dir)
    onnx_path = run_dir / "model.onnx"
    if not onnx_path.is_file():
        raise UserError(f"no ONNX model at {onnx_path}; run `lowbit-deploy export {run_dir}` first")
    if plugin not in PLUGIN_KINDS:
        raise UserError(f"unknown plugin {plugin!r}; choose one of {', '.join(PLUGIN_KINDS)}")
    if plugin == "cpp":
        check_plugin_library(tensorrt_backend())
    config = checkpoint_recipe(run_dir).build
    capabilities = [parse_compute_capability(cc) for cc in (compute_capabilities or config.compute_capabilities)]
    # Profiles come from the deployed signature stored in the ONNX file: no weights are loaded to learn shapes.
    batches = (config.min_batch, config.opt_batch, config.max_batch)
    shapes = read_signature(onnx_path).shape_ranges(batches)
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
                 steps: int | None = None, progress: bool = True, build: bool = True, plugin: str = "cpp") -> dict:
    """``lowbit-deploy run``: train -> export -> build -> validate into one run directory (``plugin``: see
    :func:`build_run`)."""
    from .export.onnx_export import export_run
    from .qat.trainer import train
    from .validate.parity import validate_run

    recipe: Recipe = load_recipe(recipe_path)
    if build:
        _check_plugin_before_training(plugin)
    out = Path(out)
    summary: dict = {"run_dir": str(out)}
    summary["train"] = train(recipe, out, model_path=model_path, steps=steps, progress=progress).summary()
    summary["export"] = export_run(out).to_dict()
    if build:
        summary["build"] = _build_or_reason(out, plugin)
    else:
        summary["build"] = {"status": "not run: --no-build"}
        update_report(out, "build", summary["build"])
    summary["validate"] = validate_run(out).to_dict()
    return summary


def _check_plugin_before_training(plugin: str) -> None:
    """A missing or stale C++ plugin library fails ``run`` before training, not after it."""
    from .build import backend_unavailable_reason
    from .build.plugin_library import PLUGIN_KINDS, check_plugin_library
    from .build.tensorrt_import import tensorrt_backend

    if plugin not in PLUGIN_KINDS:
        raise UserError(f"unknown plugin {plugin!r}; choose one of {', '.join(PLUGIN_KINDS)}")
    if plugin == "cpp" and backend_unavailable_reason() is None:
        check_plugin_library(tensorrt_backend())


def _build_or_reason(run_dir: Path, plugin: str) -> dict:
    from .build import backend_unavailable_reason

    reason = backend_unavailable_reason()
    if reason:
        entry = {"status": f"not run: {reason}"}
        update_report(run_dir, "build", entry)
        return entry
    return {"status": "built", **build_run(run_dir, plugin=plugin).report}
