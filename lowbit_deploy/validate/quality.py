"""Sample-quality metrics for the embedded default: a feature-FID on the digit classifier's penultimate features.

FID (Heusel et al.) compares the Gaussian statistics of two feature sets:
``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``. Inception features do not fit 16x16 digits, so the
features are the shipped digit classifier's penultimate layer (64 values). Absolute values are only comparable
between runs with the same classifier, sample count and held-out set; the FP model's own value is the yardstick.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two ``[N, D]`` feature sets (float64 throughout)."""
    from scipy import linalg

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two [N>=2, D] feature sets of the same D, got {a.shape} and {b.shape}")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular products are handled below
        root = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all() or np.abs(root.imag).max(initial=0.0) > 1e-3:
            # A singular product (constant features, few samples): regularise both covariances slightly, as the
            # reference FID implementation does.
            offset = np.eye(cov_a.shape[0]) * 1e-6
            root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = np.real(root)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))


@torch.no_grad()
def classifier_features(classifier, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    classifier.eval()
    chunks = [classifier.embed(chunk.float().clamp(-1, 1)) for chunk in images.split(batch_size)]
    return torch.cat(chunks).double().numpy()


def feature_fid(classifier, generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Feature-FID of generated digits against reference (real, held-out) digits."""
    return frechet_distance(classifier_features(classifier, generated), classifier_features(classifier, reference))


@torch.no_grad()
def prompted_confidence(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean softmax probability the classifier gives the prompted class."""
    classifier.eval()
    probabilities = torch.softmax(classifier(images.float().clamp(-1, 1)), dim=1)
    return float(probabilities.gather(1, labels.long().view(-1, 1)).mean())
