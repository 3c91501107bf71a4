"""The embedded default's data: scikit-learn's 1,797 handwritten 8x8 digits, upsampled, split once with a fixed seed.

scikit-learn ships this data set inside its wheel, so nothing is downloaded at run time.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

SPLITS = ("train", "val")
VAL_FRACTION = 0.2
SPLIT_SEED = 0
# sklearn stores each pixel as an integer count 0..16 (ink in a 4x4 block of the original 32x32 bitmap).
_PIXEL_MAX = 16.0


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def _split_indices(count: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(count)
    num_val = int(round(count * VAL_FRACTION))
    return {"val": np.sort(order[:num_val]), "train": np.sort(order[num_val:])}


def load_digits(split: str, image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, image_size, image_size]`` in [-1, 1] (ink = +1) and labels ``[N]`` of one fixed split."""
    if split not in SPLITS:
        raise UserError(f"unknown digits split {split!r}; choose one of {', '.join(SPLITS)}")
    if image_size < 8:
        raise UserError(f"digits image_size must be >= 8 (the source images are 8x8), got {image_size}")
    images, labels = _raw_digits()
    index = _split_indices(len(labels))[split]
    pixels = torch.from_numpy(images[index]).unsqueeze(1) / _PIXEL_MAX
    if image_size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (pixels * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous(), torch.from_numpy(labels[index]).clone()
