"""BitsFusion's bit assignment (Alg. 1) from measured candidate scores, and the search for the threshold S_o.

Pure bookkeeping over numbers: no torch, no model. ``S(i, b) = MSE(i, b) * N_i^-eta``; a layer gets the fewest
candidate bits whose sensitivity is below ``S_o`` (else the fallback, 4), then one more bit for every semantic-drop
percentile (at the highest candidate bit width) it exceeds, capped at ``max_bits``. ``S_o`` is searched so that the
plan's BitsFusion average (:meth:`QuantPlan.average_bits`) hits the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from ..errors import UserError
from ..quant.grids import GridKind
from ..quant.plan import LayerRole, QuantPlan


@dataclass(frozen=True)
class CandidateScore:
    """What one candidate (layer ``layer`` alone at ``bits``) measured against the float model."""

    layer: str
    bits: int
    weight_numel: int
    mse: float                      # samples vs the FP model's samples (same seeds)
    semantic_drop: float | None     # FP minus candidate classifier confidence on the prompted class; None = no judge


@dataclass(frozen=True)
class AssignRule:
    """The knobs of the assignment (a recipe's ``analyze`` section carries the same names)."""

    candidate_bits: tuple[int, ...] = (1, 2, 3)
    grid: GridKind = GridKind.BALANCED
    fallback_bits: int = 4
    max_bits: int = 7
    percentiles: tuple[float, ...] = (90.0, 95.0, 98.0)
    eta: float = 0.3

    @classmethod
    def from_section(cls, section) -> "AssignRule":
        return cls(tuple(section.candidate_bits), section.grid, section.fallback_bits, section.max_bits,
                   tuple(section.percentiles), section.eta)


def sensitivity(mse: float, weight_numel: int, eta: float) -> float:
    return mse * weight_numel ** (-eta)


def sensitivity_table(scores: Sequence[CandidateScore], eta: float) -> dict[str, dict[int, float]]:
    table: dict[str, dict[int, float]] = {}
    for score in scores:
        table.setdefault(score.layer, {})[score.bits] = sensitivity(score.mse, score.weight_numel, eta)
    return table


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without importing numpy."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def semantic_bumps(drops: Mapping[str, float | None], percentiles: Sequence[float]) -> dict[str, int]:
    """Extra bits per layer: +1 for each percentile (over all candidate layers) its semantic drop is above.

    Layers without a semantic measurement (models without a judge) get none.
    """
    measured = {layer: drop for layer, drop in drops.items() if drop is not None}
    if not measured:
        return {layer: 0 for layer in drops}
    cutoffs = [percentile(list(measured.values()), q) for q in percentiles]
    return {layer: (sum(drop > cutoff for cutoff in cutoffs) if drop is not None else 0)
            for layer, drop in drops.items()}


def assign_bits(table: Mapping[str, Mapping[int, float]], bumps: Mapping[str, int], threshold: float,
                rule: AssignRule) -> dict[str, int]:
    """``b_i = min{b : S(i, b) < S_o}`` (else the fallback), plus the semantic bumps, capped at ``max_bits``."""
    bits = {}
    for layer, by_bits in table.items():
        base = next((b for b in rule.candidate_bits if by_bits[b] < threshold), rule.fallback_bits)
        bits[layer] = min(base + bumps.get(layer, 0), rule.max_bits)
    return bits


def plan_with_bits(base: QuantPlan, bits: Mapping[str, int], grid: GridKind, source: str) -> QuantPlan:
    """``base`` with every layer named in ``bits`` quantized on ``grid`` at its bits."""
    layers = tuple(replace(layer, role=LayerRole.QUANTIZED, grid=grid, bits=bits[layer.name])
                   if layer.name in bits else layer for layer in base.layers)
    return QuantPlan(layers, base.total_params, source)


def reachable_range(base: QuantPlan, candidates: Sequence[str], rule: AssignRule, num_steps: int
                    ) -> tuple[float, float]:
    """Average bits with every candidate at the fewest candidate bits, and at the fallback plus every bump."""
    low = plan_with_bits(base, {name: rule.candidate_bits[0] for name in candidates}, rule.grid, "")
    top = min(rule.fallback_bits + len(rule.percentiles), rule.max_bits)
    high = plan_with_bits(base, {name: top for name in candidates}, rule.grid, "")
    return low.average_bits(num_steps), high.average_bits(num_steps)


def check_target_reachable(base: QuantPlan, candidates: Sequence[str], rule: AssignRule, num_steps: int,
                           target: float, tolerance: float) -> None:
    """Refuse, before anything runs, a target no assignment can reach."""
    if not candidates:
        raise UserError("analyze has no candidate layers: every layer the quantize.layers rules quantize is matched "
                        "by analyze.exclude; quantize more layers or exclude fewer")
    low, high = reachable_range(base, candidates, rule, num_steps)
    if target + tolerance < low or target - tolerance > high:
        raise UserError(f"analyze.target_average_bits={target} (+-{tolerance}) is out of reach for this model and "
                        f"recipe: the reachable range is {low:.4f} (every candidate at {rule.candidate_bits[0]} bits) "
                        f"to {high:.4f} (every candidate at "
                        f"{min(rule.fallback_bits + len(rule.percentiles), rule.max_bits)} bits), counting the "
                        f"non-candidate layers as quantize.layers gives them over {base.total_params:,} parameters. "
                        f"Choose a target in that range, or change the candidate bits / quantize.layers")


@dataclass(frozen=True)
class Assignment:
    threshold: float                # S_o
    bits: dict[str, int]
    plan: QuantPlan
    average_bits: float


def search_threshold(base: QuantPlan, scores: Sequence[CandidateScore], rule: AssignRule, *, target: float,
                     tolerance: float, num_steps: int, source: str) -> Assignment:
    """Bisection on log S for the ``S_o`` whose plan's average bits is within ``target +- tolerance``.

    The average is a non-increasing step function of ``S_o`` that only changes where ``S_o`` crosses a measured
    ``S(i, b)``, so the search bisects over those breakpoints (sorted log S) and takes ``S_o`` in the middle (in log
    space) of the interval it lands in; when no interval lands in the band the error names the two nearest
    reachable averages.
    """
    table = sensitivity_table(scores, rule.eta)
    missing = [(layer, b) for layer, by_bits in table.items() for b in rule.candidate_bits if b not in by_bits]
    if missing:
        raise ValueError(f"candidate scores missing for {missing[:5]}")
    drops = {score.layer: score.semantic_drop for score in scores if score.bits == rule.candidate_bits[-1]}
    bumps = semantic_bumps(drops, rule.percentiles)
    logs = sorted({math.log(max(value, 1e-300)) for by_bits in table.values() for value in by_bits.values()})
    # Thresholds between neighbouring breakpoints: index 0 is below every S (all layers at the fallback), the last
    # is above every S (all at the fewest bits). The average does not increase along this list.
    cuts = [logs[0] - 1.0, *((a + b) / 2 for a, b in zip(logs, logs[1:])), logs[-1] + 1.0]

    def evaluate(index: int) -> Assignment:
        threshold = math.exp(cuts[index])
        bits = assign_bits(table, bumps, threshold, rule)
        plan = plan_with_bits(base, bits, rule.grid, source)
        return Assignment(threshold, bits, plan, plan.average_bits(num_steps))

    low, high = 0, len(cuts) - 1           # averages: evaluate(low) highest, evaluate(high) lowest
    first, last = evaluate(low), evaluate(high)
    if target > first.average_bits + tolerance or target < last.average_bits - tolerance:
        raise UserError(f"with the measured sensitivities the reachable average is {last.average_bits:.4f} to "
                        f"{first.average_bits:.4f} bits (semantic bumps included); "
                        f"analyze.target_average_bits={target} +- {tolerance} is outside it. Choose a target in "
                        f"that range")
    if first.average_bits <= target:
        return _within(first, None, target, tolerance)
    if last.average_bits >= target:
        return _within(last, None, target, tolerance)
    above, below = first, last                 # invariant: above.average > target >= below.average
    while high - low > 1:
        middle = (low + high) // 2
        trial = evaluate(middle)
        if trial.average_bits > target:
            low, above = middle, trial
        else:
            high, below = middle, trial
    return _within(above, below, target, tolerance)


def _within(first: Assignment, second: Assignment | None, target: float, tolerance: float) -> Assignment:
    options = [option for option in (first, second) if option is not None]
    best = min(options, key=lambda option: (abs(option.average_bits - target), option.average_bits))
    if abs(best.average_bits - target) <= tolerance:
        return best
    nearest = " and ".join(f"{option.average_bits:.4f} (S_o={option.threshold:.4g})" for option in options)
    raise UserError(f"no threshold S_o gives an average within {target} +- {tolerance} bits: the average is a step "
                    f"function of S_o and the nearest reachable averages are {nearest}. Widen "
                    f"analyze.tolerance or set analyze.target_average_bits to one of them")
