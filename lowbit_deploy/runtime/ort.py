"""Run an exported UNet with ONNX Runtime (CPU): the portable path, lowbit nodes executed via their functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")


class OrtRunner:
    """Loads lazily on first use; ``__call__`` takes and returns torch tensors (a ``denoise`` callable)."""

    def __init__(self, onnx_path: str | Path, threads: int | None = None) -> None:
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise UserError(f"no ONNX model at {self.onnx_path}; run `lowbit-deploy export RUN_DIR` first")
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
        return self._session

    def run_numpy(self, sample: np.ndarray, timestep: np.ndarray, encoder_hidden_states: np.ndarray) -> np.ndarray:
        feeds = dict(zip(INPUT_NAMES, (sample, timestep, encoder_hidden_states)))
        return self.session.run(None, feeds)[0]

    def __call__(self, sample, timestep, encoder_hidden_states):
        import torch

        batch = sample.shape[0]
        timestep = timestep.reshape(-1).float().expand(batch) if timestep.numel() == 1 else timestep.float()
        output = self.run_numpy(sample.float().numpy(), timestep.contiguous().numpy(),
                                encoder_hidden_states.float().numpy())
        return torch.from_numpy(output)
