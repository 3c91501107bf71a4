"""Comparison statistics between a reference output and a candidate, and tolerance checks (Polygraphy-style)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

_EPS = 1e-12


@dataclass(frozen=True)
class OutputStats:
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    sqnr_db: float

    def to_dict(self) -> dict:
        return {key: (value if math.isfinite(value) else str(value)) for key, value in asdict(self).items()}


def compare(reference: np.ndarray, candidate: np.ndarray) -> OutputStats:
    reference = np.asarray(reference, dtype=np.float64).reshape(-1)
    candidate = np.asarray(candidate, dtype=np.float64).reshape(-1)
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs candidate {candidate.shape}")
    error = candidate - reference
    abs_error = np.abs(error)
    noise = float(np.sum(error**2))
    signal = float(np.sum(reference**2))
    norms = float(np.linalg.norm(reference) * np.linalg.norm(candidate))
    return OutputStats(
        max_abs=float(abs_error.max(initial=0.0)),
        mean_abs=float(abs_error.mean()) if abs_error.size else 0.0,
        max_rel=float((abs_error / np.maximum(np.abs(reference), 1e-6)).max(initial=0.0)),
        # Identical outputs are exactly aligned; float64 rounding of the dot product must not make them fail a 1.0 gate.
        cosine=1.0 if noise == 0.0 else (float(np.clip(np.dot(reference, candidate) / norms, -1, 1)) if norms > 0
                                         else 0.0),
        sqnr_db=math.inf if noise == 0.0 else 10.0 * math.log10(max(signal, _EPS) / noise),
    )


def merge(stats: list[OutputStats]) -> OutputStats:
    """Worst case over batches."""
    return OutputStats(
        max_abs=max(s.max_abs for s in stats),
        mean_abs=float(np.mean([s.mean_abs for s in stats])),
        max_rel=max(s.max_rel for s in stats),
        cosine=min(s.cosine for s in stats),
        sqnr_db=min(s.sqnr_db for s in stats),
    )


def check(stats: OutputStats, tolerances) -> list[str]:
    """Failures against ``tolerances`` (a recipes.Tolerances); each names the tolerance that would have passed,
    printed at full precision (a rounded value could still fail)."""
    failures = []
    if stats.max_abs > tolerances.max_abs:
        failures.append(f"max_abs {stats.max_abs:.3g} > {tolerances.max_abs:.3g} (passes with --max-abs "
                        f"{stats.max_abs!r})")
    if tolerances.max_rel is not None and stats.max_rel > tolerances.max_rel:
        failures.append(f"max_rel {stats.max_rel:.3g} > {tolerances.max_rel:.3g} (passes with --max-rel "
                        f"{stats.max_rel!r})")
    if stats.cosine < tolerances.min_cosine:
        failures.append(f"cosine {stats.cosine!r} < {tolerances.min_cosine!r} (passes with --min-cosine "
                        f"{stats.cosine!r})")
    if stats.sqnr_db < tolerances.min_sqnr_db:
        failures.append(f"SQNR {stats.sqnr_db:.1f} dB < {tolerances.min_sqnr_db} dB (passes with --min-sqnr-db "
                        f"{stats.sqnr_db!r})")
    return failures
