"""The activation grid of ``lowbit::QuantizeDequantizeActivation`` (docs/ops/QuantizeDequantizeActivation_v1.md) and
its numpy reference: the one statement of the op's math outside torch. Imports no torch.

A symmetric b-bit grid is ``[-2^(b-1), 2^(b-1) - 1]`` with no zero point (TensorRT's Q/DQ is symmetric); an asymmetric
one is ``[0, 2^b - 1]`` with an integer zero point per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_ACTIVATION_BITS = 2
MAX_ACTIVATION_BITS = 8


@dataclass(frozen=True)
class ActivationGrid:
    bits: int
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not MIN_ACTIVATION_BITS <= self.bits <= MAX_ACTIVATION_BITS:
            raise ValueError(f"activation bits {self.bits} out of range: use {MIN_ACTIVATION_BITS}.."
                             f"{MAX_ACTIVATION_BITS} (EfficientDM's settings are 4 and 8)")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def describe(self) -> str:
        return f"A{self.bits} {'symmetric' if self.symmetric else 'asymmetric'} [{self.qmin}, {self.qmax}]"


def quantize_dequantize_numpy(x: np.ndarray, scale: np.ndarray, step_index: np.ndarray, qmin: int, qmax: int,
                              zero_point: np.ndarray | None = None) -> np.ndarray:
    """The op's semantics in float32: per sample ``b`` with ``i = step_index[b]``,
    ``y = (clamp(round_half_even(x / scale[i]) + z[i], qmin, qmax) - z[i]) * scale[i]``."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    step_index = np.asarray(step_index, dtype=np.int64)
    if step_index.shape != (x.shape[0],):
        raise ValueError(f"step_index has shape {step_index.shape}; it needs one entry per sample ({x.shape[0]})")
    if step_index.size and (step_index.min() < 0 or step_index.max() >= scale.shape[0]):
        raise ValueError(f"step index {step_index.tolist()} out of range for a table of {scale.shape[0]} steps")
    broadcast = (x.shape[0],) + (1,) * (x.ndim - 1)
    s = scale[step_index].reshape(broadcast)
    z = (np.zeros_like(s) if zero_point is None
         else np.asarray(zero_point, dtype=np.float32)[step_index].reshape(broadcast))
    q = np.minimum(np.maximum(np.round(x / s) + z, np.float32(qmin)), np.float32(qmax))
    return ((q - z) * s).astype(np.float32)
