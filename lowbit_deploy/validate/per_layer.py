"""Per-layer bisection: where do PyTorch and a runtime (ONNX Runtime, TensorRT) start to disagree?

Final outputs say *that* an artifact is wrong; this says *where*. Every quantized layer's output (the module each
export handler names as its ``tap``) and every UNet block's output is compared between the deployed torch model and
the runtime, in graph order, and the first one whose SQNR falls below the gate is named -- downstream layers inherit
its error, so the first is the culprit.

Marking every intermediate as an output of a large model holds them all at once (and, in TensorRT, breaks fusions),
so taps are compared in chunks: each chunk is a fresh session -- an ONNX Runtime session, or a TensorRT engine built
from the same ONNX file -- with only that chunk's tensors added as outputs, and torch hooks only that chunk's modules.
Chunk sessions come from :data:`CHUNK_BACKENDS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .stats import OutputStats, compare, merge

DEFAULT_CHUNK = 64
BACKEND_TITLES = {"onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}
BLOCK_PATTERN = re.compile(r"down_blocks\.\d+|mid_block|up_blocks\.\d+")
Feeds = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Tap:
    module: str      # qualified name under the UNet, e.g. "down_blocks.0.resnets.0.conv1"
    kind: str        # "quantized" | "block"
    tensor: str      # the ONNX tensor holding the module's output
    position: int    # index of the producing node in the ONNX graph (graph order)


@dataclass
class LayerParity:
    tap: Tap
    stats: OutputStats

    def to_dict(self) -> dict:
        return {"module": self.tap.module, "kind": self.tap.kind, "tensor": self.tap.tensor,
                **self.stats.to_dict()}


@dataclass
class PerLayerReport:
    layers: list[LayerParity]
    min_sqnr_db: float
    chunks: int
    unmapped: list[str] = field(default_factory=list)
    backend: str = "onnxruntime"

    @property
    def first_failing(self) -> LayerParity | None:
        return next((layer for layer in self.layers if layer.stats.sqnr_db < self.min_sqnr_db), None)

    @property
    def passed(self) -> bool:
        return self.first_failing is None and not self.unmapped

    def verdict(self) -> str:
        first = self.first_failing
        if first is not None:
            # Full precision, as the output gates print it: a rounded value could still fail.
            lowest = min(layer.stats.sqnr_db for layer in self.layers)
            return (f"first layer below {self.min_sqnr_db} dB: {first.tap.module} ({first.tap.kind}, "
                    f"SQNR {first.stats.sqnr_db:.1f} dB); the layers after it inherit its error (passes with "
                    f"--per-layer-min-sqnr-db {lowest!r})")
        if self.unmapped:
            return f"{len(self.unmapped)} module(s) have no output tensor in the ONNX graph: {self.unmapped[:3]}"
        return f"all {len(self.layers)} layer and block outputs at or above {self.min_sqnr_db} dB"

    def to_dict(self) -> dict:
        first = self.first_failing
        return {"status": "passed" if self.passed else "failed", "backend": self.backend,
                "min_sqnr_db": self.min_sqnr_db,
                "chunks": self.chunks, "first_failing": first.tap.module if first else None,
                "verdict": self.verdict(), "unmapped": self.unmapped,
                "layers": [layer.to_dict() for layer in self.layers]}


def onnx_scope(root: nn.Module, module_name: str) -> str:
    """The name scope the TorchScript exporter gives a module's nodes: one ``/`` segment per module, except that a
    child of a ModuleList/Sequential is joined to its container with ``.`` (``/down_blocks.0/resnets.0/conv1``)."""
    segments: list[str] = []
    parent = root
    for part in module_name.split("."):
        if isinstance(parent, (nn.ModuleList, nn.Sequential)) and segments:
            segments[-1] = f"{segments[-1]}.{part}"
        else:
            segments.append(part)
        parent = getattr(parent, part) if not part.isdigit() else parent[int(part)]
    return "/" + "/".join(segments)


def _scope_output(nodes, scope: str, consumers: dict[str, set[int]], graph_outputs: set[str]) -> tuple[str, int] | None:
    """The module's output: of the tensors its nodes produce and something outside it reads, the last produced."""
    inside = {index for index, node in enumerate(nodes) if node.name.startswith(scope + "/")}
    found = None
    for index in sorted(inside):
        for tensor in nodes[index].output:
            readers = consumers.get(tensor, set())
            if tensor in graph_outputs or readers - inside:
                found = (tensor, index)
    return found


def find_taps(model, deployed, quantized: Sequence[str]) -> tuple[list[Tap], list[str]]:
    """Taps for the ``quantized`` modules and the UNet blocks, in graph order, and the modules not found."""
    nodes = list(model.graph.node)
    consumers: dict[str, set[int]] = {}
    for index, node in enumerate(nodes):
        for tensor in node.input:
            consumers.setdefault(tensor, set()).add(index)
    graph_outputs = {output.name for output in model.graph.output}
    blocks = [name for name, _ in deployed.unet.named_modules() if BLOCK_PATTERN.fullmatch(name)]
    taps, unmapped = [], []
    for kind, names in (("quantized", quantized), ("block", blocks)):
        for module in names:
            # The wrapper's own scope is "/unet": DeployedUNet holds the UNet as its `unet` child.
            found = _scope_output(nodes, "/unet" + onnx_scope(deployed.unet, module), consumers, graph_outputs)
            if found is None:
                unmapped.append(module)
            else:
                taps.append(Tap(module, kind, found[0], found[1]))
    taps.sort(key=lambda tap: (tap.position, tap.kind != "quantized"))
    return taps, unmapped


def _with_outputs(model, tensors: Sequence[str]) -> bytes:
    import onnx
    from onnx import helper

    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                                 for name in tensors)
    return extended.SerializeToString()


def _torch_outputs(deployed, modules: Sequence[str], feeds: Feeds, signature) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def store(_module, _inputs, output):
            captured[name] = (output[0] if isinstance(output, (tuple, list)) else output).detach().clone()
        return store

    handles = [deployed.unet.get_submodule(name).register_forward_hook(hook(name)) for name in modules]
    try:
        with torch.no_grad():
            deployed(*(feeds[name] for name in signature.input_names))
    finally:
        for handle in handles:
            handle.remove()
    return captured


@dataclass(frozen=True)
class ChunkOptions:
    """How chunk sessions are made: ONNX Runtime's thread count; for TensorRT the folder the chunk engines are
    built in (default: the system's temporary folder), the plugin that builds them ("cpp" | "python") and the
    compute capability (``MAJOR.MINOR``) they are built for."""

    threads: int | None = None
    work_dir: Path | None = None
    plugin: str = "cpp"
    compute_capability: str | None = None


# Runs the model on one batch of feeds and returns the chunk's tap values, in tap order. CHUNK_BACKENDS make one from
# (model bytes with the chunk's tensors as outputs, those tensor names, signature, batch size, ChunkOptions).
ChunkSession = Callable[[Feeds], list[np.ndarray]]


def _onnxruntime_chunk(model_bytes: bytes, tensors: Sequence[str], signature, batch: int,
                       options: ChunkOptions) -> ChunkSession:
    import onnxruntime as ort

    session_options = ort.SessionOptions()
    if options.threads:
        session_options.intra_op_num_threads = options.threads
    session = ort.InferenceSession(model_bytes, session_options, providers=["CPUExecutionProvider"])

    def run(feeds: Feeds) -> list[np.ndarray]:
        arrays = {name: feeds[name].contiguous().numpy() for name in signature.input_names}
        return session.run(list(tensors), arrays)

    return run


def build_chunk_engine(model_bytes: bytes, signature, batch: int, options: ChunkOptions) -> Path:
    """The engine of a chunk's ONNX (its taps marked as outputs) for ``batch``, in a new folder under
    ``options.work_dir``; builds ahead of time anywhere TensorRT-RTX is installed."""
    import shutil
    import tempfile

    from ..engines.engine import build_engine
    from ..pipeline import parse_compute_capability

    folder = Path(tempfile.mkdtemp(prefix="lowbit-per-layer-", dir=options.work_dir))
    onnx_path, engine_path = folder / "chunk.onnx", folder / "chunk.engine"
    capability = parse_compute_capability(options.compute_capability) if options.compute_capability else (8, 9)
    try:
        onnx_path.write_bytes(model_bytes)
        build_engine(onnx_path, engine_path, compute_capabilities=[capability],
                     input_shapes=signature.shape_ranges((batch, batch, batch)), plugin=options.plugin)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    onnx_path.unlink()
    return engine_path


def _tensorrt_chunk(model_bytes: bytes, tensors: Sequence[str], signature, batch: int,
                    options: ChunkOptions) -> ChunkSession:
    """Runs the chunk's engine on the current GPU (a :class:`GpuUnavailableError` without one); the engine's
    files are removed once it is deserialized."""
    import shutil

    from ..runtime.trt import TrtRunner

    engine_path = build_chunk_engine(model_bytes, signature, batch, options)
    try:
        runner = TrtRunner(engine_path)
    finally:
        shutil.rmtree(engine_path.parent, ignore_errors=True)

    def run(feeds: Feeds) -> list[np.ndarray]:
        outputs = runner.infer({name: feeds[name] for name in signature.input_names})
        return [outputs[name].float().cpu().numpy() for name in tensors]

    return run


CHUNK_BACKENDS: dict[str, Callable[..., ChunkSession]] = {
    "onnxruntime": _onnxruntime_chunk,
    "tensorrt": _tensorrt_chunk,
}


def per_layer_parity(onnx_path: str | Path, deployed, inputs: list[Feeds], min_sqnr_db: float,
                     chunk: int = DEFAULT_CHUNK, threads: int | None = None, backend: str = "onnxruntime",
                     options: ChunkOptions | None = None) -> PerLayerReport:
    """Compare every quantized layer's and block's output between ``deployed`` (a DeployedUNet) and ``backend``
    (a key of :data:`CHUNK_BACKENDS`) on ``inputs`` (one batch size), ``chunk`` taps per session."""
    import onnx

    from ..quant.plan import LayerRole

    options = options or ChunkOptions(threads=threads)
    model = onnx.load(str(onnx_path))
    signature = deployed.signature
    quantized = [decision.name for decision in deployed.plan.by_role(LayerRole.QUANTIZED)]
    taps, unmapped = find_taps(model, deployed, quantized)
    batch = int(inputs[0][signature.input_names[0]].shape[0])
    results: list[LayerParity] = []
    chunks = 0
    for start in range(0, len(taps), chunk):
        group = taps[start:start + chunk]
        chunks += 1
        tensors = [tap.tensor for tap in group]
        session = CHUNK_BACKENDS[backend](_with_outputs(model, tensors), tensors, signature, batch, options)
        per_tap: dict[str, list[OutputStats]] = {tap.module: [] for tap in group}
        for feeds in inputs:
            values = session(feeds)
            reference = _torch_outputs(deployed, [tap.module for tap in group], feeds, signature)
            for tap, value in zip(group, values):
                per_tap[tap.module].append(compare(reference[tap.module].numpy(), value))
        results.extend(LayerParity(tap, merge(per_tap[tap.module])) for tap in group)
        del session  # one chunk's session (and its marked outputs) at a time
    return PerLayerReport(results, min_sqnr_db, chunks, unmapped, backend)


def write_sqnr_plot(path: Path, report: PerLayerReport) -> None:
    """SQNR of every tap in graph order, the gate as a line, the first failing tap marked."""
    from .report import write_series_plot

    points = [(layer.tap.module, layer.stats.sqnr_db, layer.tap.kind) for layer in report.layers]
    first = report.first_failing
    write_series_plot(path, points, gate=report.min_sqnr_db, marked=first.tap.module if first else None,
                      title=f"per-layer SQNR, PyTorch vs {BACKEND_TITLES[report.backend]} (graph order)",
                      y_label="SQNR dB")


__all__ = ["CHUNK_BACKENDS", "ChunkOptions", "build_chunk_engine", "LayerParity", "PerLayerReport", "Tap", "find_taps", "onnx_scope",
           "per_layer_parity", "write_sqnr_plot"]
