"""Run an exported UNet with ONNX Runtime (CPU): the portable path, lowbit nodes executed via their functions.

The runner is driven by the deployed signature stored in the file's metadata: it checks every feed against it
(names, ranks, step indexes inside the cached schedule) before ONNX Runtime sees them, so a wrong input is a clear
error instead of an out-of-bounds Gather.

How the session holds the packed weights is a mode (:data:`WEIGHT_MODES`, docs/scale.md): ONNX Runtime's default
graph optimisations constant-fold every ``lowbit`` node's function when the session opens, so the decoded float32
weights stay resident (an SD1.5 UNet: tens of GB while folding). ``packed`` turns off constant folding only --
every other optimisation (fusions, layout transforms) stays on -- so the packed words stay the initializers and each
layer is unpacked as the graph runs it, at every call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import UserError
from ..signature import DeployedSignature

METADATA_SIGNATURE = "lowbit.signature"


@dataclass(frozen=True)
class WeightMode:
    description: str
    disabled_optimizers: tuple[str, ...]  # ORT graph transformers switched off (by their registered names)
    # False: no CPU arena and no pre-planned block for all intermediates; each tensor (a layer's unpacked weight, an
    # attention map) is freed when its consumers ran, instead of the arena keeping the peak for the session's life.
    pooled_memory: bool = True


WEIGHT_MODES: dict[str, WeightMode] = {
    "packed": WeightMode("packed words stay the resident weights; each lowbit node unpacks its layer at every call "
                         "(constant folding off, every other graph optimisation on; no memory arena)",
                         ("ConstantFolding",), pooled_memory=False),
    "folded": WeightMode("ONNX Runtime's defaults: constant folding decodes every packed weight to float32 when the "
                         "session opens (float32-sized memory, no unpacking per call)", ()),
}
AUTO_WEIGHT_MODE = "auto"
# "auto" is chosen by measurement (benchmarks/ort_weights.py; docs/scale.md): folding costs ~66 bytes of resident
# memory per weight while the session opens (an SD1.5 UNet: ~56 GB) and makes each call ~10x faster on the default
# model; so models up to FOLD_MAX_WEIGHTS packed weights (~6.6 GB while folding) fold, larger ones stay packed.
FOLD_MAX_WEIGHTS = 100_000_000
DEFAULT_WEIGHT_MODE = AUTO_WEIGHT_MODE


def check_weight_mode(mode: str) -> str:
    if mode != AUTO_WEIGHT_MODE and mode not in WEIGHT_MODES:
        raise UserError(f"unknown ONNX Runtime weight mode {mode!r}; choose one of {', '.join(WEIGHT_MODES)} or "
                        f"{AUTO_WEIGHT_MODE}")
    return mode


def packed_weight_count(onnx_path: str | Path) -> int:
    """Weights held packed by the file's lowbit nodes (from each node's ``shape`` attribute; no weights read)."""
    import onnx

    from ..export.lowbit_ops import OP_DOMAIN, OP_TYPE

    model = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for node in model.graph.node:
        if node.domain == OP_DOMAIN and node.op_type == OP_TYPE:
            shape = next((list(attribute.ints) for attribute in node.attribute if attribute.name == "shape"), [])
            count = 1
            for extent in shape:
                count *= extent
            total += count
    return total


def resolve_weight_mode(mode: str, onnx_path: str | Path) -> str:
    """``mode``, or for "auto" the measured choice for this file's size (see FOLD_MAX_WEIGHTS)."""
    check_weight_mode(mode)
    if mode != AUTO_WEIGHT_MODE:
        return mode
    return "folded" if packed_weight_count(onnx_path) <= FOLD_MAX_WEIGHTS else "packed"


def read_signature(onnx_path: str | Path) -> DeployedSignature:
    """The deployed signature written into an exported file's metadata by ``lowbit-deploy export``."""
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise UserError(f"no ONNX model at {path}; run `lowbit-deploy export RUN_DIR` first")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises its own DecodeError types for truncated files
        raise UserError(f"{path} is not a readable ONNX file ({error}); export it again") from None
    props = {prop.key: prop.value for prop in model.metadata_props}
    if METADATA_SIGNATURE not in props:
        raise UserError(f"{path} has no lowbit-deploy signature in its metadata; it was not written by "
                        f"`lowbit-deploy export` (or by an older version): export it again")
    return DeployedSignature.from_dict(json.loads(props[METADATA_SIGNATURE]))


class OrtRunner:
    """Loads lazily on first use; ``__call__(feeds)`` takes and returns torch tensors (a sampling runner and a
    :class:`~lowbit_deploy.runtime.runners.Runner`)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, threads: int | None = None,
                 signature: DeployedSignature | None = None, weights: str = DEFAULT_WEIGHT_MODE,
                 optimized_model_path: str | Path | None = None) -> None:
        self.onnx_path = Path(onnx_path)
        self.weights = check_weight_mode(weights)  # "auto" becomes "packed" or "folded" when the session opens
        self.signature = signature or read_signature(self.onnx_path)
        self.threads = threads
        self.optimized_model_path = optimized_model_path  # where ORT writes the graph it runs (inspection, tests)
        self._session = None

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            if self.optimized_model_path is not None:
                options.optimized_model_filepath = str(self.optimized_model_path)
            # "auto" resolves here (a missing file: "folded", ORT's defaults; ORT then names the problem)
            self.weights = resolve_weight_mode(self.weights, self.onnx_path) if self.onnx_path.is_file() else \
                self.weights.replace(AUTO_WEIGHT_MODE, "folded")
            mode = WEIGHT_MODES[self.weights]
            options.enable_cpu_mem_arena = options.enable_mem_pattern = mode.pooled_memory
            try:
                self._session = ort.InferenceSession(
                    str(self.onnx_path), options, providers=["CPUExecutionProvider"],
                    disabled_optimizers=list(mode.disabled_optimizers))
            except Exception as error:  # ORT raises its own exception types for unreadable models
                raise UserError(f"ONNX Runtime cannot load {self.onnx_path}: {error}") from None
            names = tuple(item.name for item in self._session.get_inputs())
            if names != self.signature.input_names:
                raise UserError(f"{self.onnx_path} takes inputs {names}, but its signature says "
                                f"{self.signature.input_names}; export it again")
        return self._session

    def __call__(self, feeds: Mapping[str, "torch.Tensor"]) -> "torch.Tensor":  # noqa: F821 - torch is lazy
        import torch

        self.signature.check_feeds(feeds)
        arrays = {name: feeds[name].contiguous().numpy() for name in self.signature.input_names}
        return torch.from_numpy(self.session.run(None, arrays)[0])
