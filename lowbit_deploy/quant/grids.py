"""Integer grids that weights are quantized onto.

A grid is the set of integers ``q`` a weight may take; the real weight is ``q * scale`` with one scale per output
channel. Two kinds exist, chosen per layer by the recipe:

* ``signed``   -- the standard two's-complement grid, ``2**b`` levels in ``[-2**(b-1), 2**(b-1) - 1]``.
* ``balanced`` -- BitsFusion's balanced integer grid, ``2**b + 1`` levels in ``[-2**(b-1), 2**(b-1)]``, symmetric
  around 0 (1 bit -> {-1, 0, 1}). It cannot be stored in ``b`` bits; its storage cost is ``log2(2**b + 1)`` bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

MIN_BITS = 1
MAX_BITS = 8


class ScaleInit(str, Enum):
    """How scales are calibrated before QAT (implementations in scale_init.py; kept here so recipes need no torch)."""

    MINMAX = "minmax"
    ALTERNATING = "alternating"


class GridKind(str, Enum):
    SIGNED = "signed"
    BALANCED = "balanced"


@dataclass(frozen=True)
class IntegerGrid:
    kind: GridKind
    bits: int

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"bits={self.bits} is out of range: lowbit-deploy quantizes weights to {MIN_BITS}..{MAX_BITS} bits"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        half = 2 ** (self.bits - 1)
        return half if self.kind is GridKind.BALANCED else half - 1

    @property
    def levels(self) -> int:
        """Number of distinct integers on the grid (the base ``L`` of the packed codes)."""
        return self.qmax - self.qmin + 1

    @property
    def cost_bits(self) -> float:
        """Information cost per weight, as BitsFusion counts it: ``log2(levels)``."""
        return math.log2(self.levels)

    @property
    def max_abs_level(self) -> int:
        return max(-self.qmin, self.qmax)

    def describe(self) -> str:
        return f"{self.kind.value} {self.bits}-bit grid [{self.qmin}, {self.qmax}] ({self.levels} levels)"
