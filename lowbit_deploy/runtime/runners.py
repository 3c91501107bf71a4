"""One interface over every runtime: a :class:`Runner` takes the deployed signature's named inputs and returns the
model output on the CPU, whatever executes it; :func:`open_runner` picks the backend from a registry.

The signature drives every runner: feeds are checked against it before the backend sees them, because a compiled
graph does not check them itself (TensorRT's Gather reads out of bounds for a step index outside the schedule).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, runtime_checkable

from ..errors import UserError
from ..signature import OUTPUT_NAME, DeployedSignature

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Runner(Protocol):
    """A deployed UNet behind any backend: ``runner(feeds)`` -> the output as a float32 CPU tensor."""

    signature: DeployedSignature
    name: str

    def __call__(self, feeds: Mapping[str, "torch.Tensor"]) -> "torch.Tensor": ...


class BackendUnavailableError(UserError):
    """The backend cannot run here (no GPU, no TensorRT, another GPU architecture); ``reason`` says which."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RunnerOptions:
    """What a backend may need besides the file; a backend ignores what does not concern it."""

    signature: DeployedSignature | None = None  # None: read from the file (an engine: from the ONNX beside it)
    threads: int | None = None                   # ONNX Runtime intra-op threads (None: its default)
    built_for: tuple[str, ...] | None = None     # engine compute capabilities (None: from report.json beside it)
    tensorrt: str | None = None                  # "tensorrt" | "tensorrt_rtx" (None: whichever is installed)
    ort_weights: str = "auto"                    # ONNX Runtime: "packed" | "folded" | "auto" (runtime/ort.py)
    plugin: str = "auto"                         # TensorRT: which lowbit creators ("auto" | "cpp" | "python")


@dataclass(frozen=True)
class Backend:
    name: str
    suffixes: tuple[str, ...]
    opener: Callable[[Path, RunnerOptions], Runner]
    description: str


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, suffixes: tuple[str, ...], description: str):
    """Register ``opener(path, options) -> Runner`` as backend ``name`` for files ending in ``suffixes``."""

    def register(opener: Callable[[Path, RunnerOptions], Runner]):
        taken = [suffix for backend in BACKENDS.values() for suffix in backend.suffixes if suffix in suffixes]
        if name in BACKENDS or taken:
            raise ValueError(f"backend {name!r} or suffix(es) {taken} already registered")
        BACKENDS[name] = Backend(name, suffixes, opener, description)
        return opener

    return register


def backend_for(path: str | os.PathLike[str], backend: str | None = None) -> Backend:
    """The backend named ``backend``, or the one registered for ``path``'s suffix."""
    if backend is not None:
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(sorted(BACKENDS))}")
        return BACKENDS[backend]
    suffix = Path(path).suffix.lower()
    for candidate in BACKENDS.values():
        if suffix in candidate.suffixes:
            return candidate
    known = ", ".join(f"{s} ({b.name})" for b in BACKENDS.values() for s in b.suffixes)
    raise UserError(f"{path}: no runtime for files ending in {suffix or '(no suffix)'!r}; lowbit-deploy runs {known}. "
                    f"Pass the run's model.onnx or model.engine, or name the backend (backend='onnxruntime')")


def open_runner(path: str | os.PathLike[str], backend: str | None = None, *,
                signature: DeployedSignature | None = None, threads: int | None = None,
                built_for: list[str] | tuple[str, ...] | None = None, tensorrt: str | None = None,
                ort_weights: str = "auto", plugin: str = "auto") -> Runner:
    """A :class:`Runner` for an exported file: ``.onnx`` runs on ONNX Runtime (CPU), ``.engine`` on TensorRT (GPU),
    a run's ``checkpoint/quantized_unet.safetensors`` as the PyTorch deployed model (the reference).

    ``backend`` overrides the choice by suffix (see ``BACKENDS``); ``ort_weights`` is how ONNX Runtime holds the
    packed weights (``runtime.ort.WEIGHT_MODES``); ``plugin`` which lowbit plugin creators deserialize an engine
    (``runtime.trt.RUNTIME_PLUGINS``: the C++ library, the Python creators, or ``auto``: the library where it
    exists). Problems are :class:`UserError`; a backend that
    cannot run on this machine raises :class:`BackendUnavailableError` naming why."""
    path = Path(path)
    chosen = backend_for(path, backend)
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass the file to run, e.g. {path / 'model.onnx'} or "
                        f"{path / 'model.engine'}")
    if not path.is_file():
        raise UserError(f"no file at {path}; export it (`lowbit-deploy export RUN_DIR` writes model.onnx, "
                        f"`lowbit-deploy build RUN_DIR` model.engine) or fix the path")
    options = RunnerOptions(signature, threads, tuple(built_for) if built_for is not None else None, tensorrt,
                            ort_weights, plugin)
    return chosen.opener(path, options)


# ---- ONNX Runtime --------------------------------------------------------------------------------------------
@register_backend("onnxruntime", (".onnx",), "ONNX Runtime on the CPU; lowbit nodes run their ONNX functions")
def _open_onnxruntime(path: Path, options: RunnerOptions) -> Runner:
    from .ort import OrtRunner

    return OrtRunner(path, threads=options.threads, signature=options.signature, weights=options.ort_weights)


# ---- PyTorch (the reference) ------------------------------------------------------------------------------------
class TorchRunner:
    """The checkpoint rewritten by the export handlers (``export.deployed.deploy_unet``): exactly what the ONNX file
    and the engine compute, in PyTorch on the CPU -- the reference every artifact is compared with."""

    name = "torch"

    def __init__(self, checkpoint_path: str | os.PathLike[str]) -> None:
        from ..export.deployed import deploy_unet
        from ..export.handlers import ExportOptions
        from ..qat.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(checkpoint_path)
        self.signature = checkpoint.signature
        self.recipe = checkpoint.recipe                # what the run was made with (sampling defaults, model)
        self.model_source = checkpoint.model_source    # the float model folder (None: the embedded default)
        export = checkpoint.recipe.export
        options = ExportOptions(packing=export.packing, float_storage=export.float_storage)
        self.module = deploy_unet(checkpoint.unet, checkpoint.plan, self.signature, options, inplace=True)

    def __call__(self, feeds: Mapping[str, "torch.Tensor"]) -> "torch.Tensor":
        import torch

        self.signature.check_feeds(feeds)
        with torch.no_grad():
            return self.module(*(feeds[name] for name in self.signature.input_names)).float()


@register_backend("torch", (".safetensors",), "the PyTorch deployed model of a run's checkpoint (the reference)")
def _open_torch(path: Path, options: RunnerOptions) -> Runner:
    runner = TorchRunner(path)
    if options.signature is not None and options.signature != runner.signature:
        raise UserError(f"{path} was trained with another signature than the one given; drop signature=")
    return runner


# ---- TensorRT --------------------------------------------------------------------------------------------------
class EngineRunner:
    """A TensorRT(-RTX) engine as a :class:`Runner`: feeds checked against the signature, output back on the CPU.

    The engine file holds no signature; it is read from the ONNX file the engine was built from (``model.onnx``
    beside ``model.engine``) unless given. Where the engine cannot run, construction raises
    :class:`BackendUnavailableError` instead of failing inside TensorRT."""

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike[str], signature: DeployedSignature | None = None,
                 built_for: list[str] | tuple[str, ...] | None = None, tensorrt: str | None = None,
                 plugin: str = "auto") -> None:
        from . import trt as trt_runtime

        if plugin not in trt_runtime.RUNTIME_PLUGINS:
            raise UserError(f"plugin={plugin!r} is not one of {', '.join(trt_runtime.RUNTIME_PLUGINS)}")

        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise UserError(f"engine {self.engine_path} does not exist; run `lowbit-deploy build RUN_DIR` first")
        self.signature = signature or _signature_beside(self.engine_path)
        built_for = list(built_for) if built_for is not None else _built_for(self.engine_path)
        reason = trt_runtime.unavailable_reason(built_for, plugin)
        if reason:
            raise BackendUnavailableError(
                f"cannot run {self.engine_path} here: {reason}. Run it on a machine that can, or run the ONNX file "
                f"it was built from on the CPU ({self.engine_path.with_suffix('.onnx').name}, backend "
                f"'onnxruntime')", reason)
        self._engine = trt_runtime.TrtRunner(self.engine_path, backend=tensorrt, plugin=plugin)
        if tuple(self._engine.input_names) != self.signature.input_names:
            raise UserError(f"{self.engine_path} takes inputs {self._engine.input_names}, but the signature says "
                            f"{list(self.signature.input_names)}; rebuild the engine from the matching ONNX file")

    def __call__(self, feeds: Mapping[str, "torch.Tensor"]) -> "torch.Tensor":
        self.signature.check_feeds(feeds)
        return self._engine.infer(feeds)[OUTPUT_NAME].float().cpu()


def _signature_beside(engine_path: Path) -> DeployedSignature:
    from .ort import read_signature

    onnx_path = engine_path.with_suffix(".onnx")
    if not onnx_path.is_file():
        raise UserError(f"{engine_path} stores no input signature and {onnx_path.name} is not beside it; keep the "
                        f"ONNX file it was built from next to it, or pass signature=read_signature(ONNX_PATH)")
    return read_signature(onnx_path)


def _built_for(engine_path: Path) -> list[str] | None:
    """The compute capabilities the build stage recorded in the run's report.json, if the engine sits in a run."""
    report = engine_path.parent / "report.json"
    if not report.is_file():
        return None
    try:
        return json.loads(report.read_text()).get("build", {}).get("compute_capabilities")
    except (json.JSONDecodeError, AttributeError):
        return None


@register_backend("tensorrt", (".engine", ".plan"), "a TensorRT or TensorRT-RTX engine on a CUDA GPU")
def _open_tensorrt(path: Path, options: RunnerOptions) -> Runner:
    return EngineRunner(path, options.signature, options.built_for, options.tensorrt, options.plugin)


__all__ = ["BACKENDS", "Backend", "BackendUnavailableError", "EngineRunner", "Runner", "RunnerOptions",
           "TorchRunner", "backend_for", "open_runner", "register_backend"]
