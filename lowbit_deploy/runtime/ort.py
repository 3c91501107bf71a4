"""Run an exported UNet with ONNX Runtime (CPU): the portable path, lowbit nodes executed via their functions.

The runner is driven by the deployed signature stored in the file's metadata: it checks every feed against it
(names, ranks, step indexes inside the cached schedule) before ONNX Runtime sees them, so a wrong input is a clear
error instead of an out-of-bounds Gather.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from ..errors import UserError
from ..signature import DeployedSignature

METADATA_SIGNATURE = "lowbit.signature"


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
                 signature: DeployedSignature | None = None) -> None:
        self.onnx_path = Path(onnx_path)
        self.signature = signature or read_signature(self.onnx_path)
        self.threads = threads
        self._session = None

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            try:
                self._session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
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
