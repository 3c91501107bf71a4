"""BitsFusion's bit assignment and the S_o search on hand-made numbers (no model, no torch)."""

import math
import random

import pytest

from lowbit_deploy.analyze.assign import (
    AssignRule,
    CandidateScore,
    assign_bits,
    check_target_reachable,
    percentile,
    reachable_range,
    search_threshold,
    semantic_bumps,
    sensitivity,
)
from lowbit_deploy.errors import UserError
from lowbit_deploy.quant.grids import GridKind
from lowbit_deploy.quant.plan import LayerDecision, LayerRole, QuantPlan

RULE = AssignRule()


def synthetic_plan(sizes, extra_params=1000):
    layers = tuple(LayerDecision(f"down_blocks.{index}.conv", "Conv2d", size, 8, LayerRole.QUANTIZED,
                                 GridKind.BALANCED, 2) for index, size in enumerate(sizes))
    return QuantPlan(layers, sum(sizes) + extra_params, "synthetic")


def scores_for(plan, seed=0, drops=None):
    rng = random.Random(seed)
    scores = []
    for layer in plan.layers:
        base = rng.uniform(0.01, 1.0)
        for bits in (1, 2, 3):
            drop = None if drops is None else drops[layer.name]
            scores.append(CandidateScore(layer.name, bits, layer.weight_numel, base / 4 ** bits, drop))
    return scores


def test_sensitivity_discounts_large_layers():
    assert sensitivity(1.0, 1000, 0.3) == pytest.approx(1000 ** -0.3)
    assert sensitivity(2.0, 1000, 0.0) == 2.0


def test_fewest_bits_below_threshold_else_fallback():
    table = {"a": {1: 0.5, 2: 0.2, 3: 0.05}, "b": {1: 0.05, 2: 0.01, 3: 0.001}, "c": {1: 9, 2: 8, 3: 7}}
    assert assign_bits(table, {}, 0.1, RULE) == {"a": 3, "b": 1, "c": 4}
    assert assign_bits(table, {}, 0.3, RULE) == {"a": 2, "b": 1, "c": 4}
    # "below" is strict: a sensitivity equal to S_o does not qualify.
    assert assign_bits(table, {}, 0.05, RULE)["a"] == 4


def test_percentile_matches_numpy_linear_interpolation():
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    assert percentile(values, 90) == pytest.approx(6.5)
    assert percentile(values, 50) == pytest.approx(2.8)


def test_semantic_bumps_add_one_bit_per_percentile_exceeded():
    drops = {f"layer{index}": float(index) for index in range(20)}  # p90 = 17.1, p95 = 18.05, p98 = 18.62
    bumps = semantic_bumps(drops, (90, 95, 98))
    assert bumps["layer19"] == 3 and bumps["layer18"] == 1 and bumps["layer17"] == 0
    assert sum(bumps.values()) == 4
    table = {name: {1: 0.0, 2: 0.0, 3: 0.0} for name in drops}
    table["layer19"] = {1: 1.0, 2: 1.0, 3: 1.0}                  # fallback 4 + 3 bumps = 7 = max
    bits = assign_bits(table, bumps, 0.5, RULE)
    assert (bits["layer19"], bits["layer18"], bits["layer0"]) == (7, 2, 1)
    capped = assign_bits(table, bumps, 0.5, AssignRule(max_bits=6))
    assert capped["layer19"] == 6


def test_no_semantic_measurement_means_no_bumps():
    assert semantic_bumps({"a": None, "b": None}, (90, 95, 98)) == {"a": 0, "b": 0}


@pytest.mark.parametrize("target", [1.7, 1.99, 2.5, 3.2])
def test_bisection_hits_the_target_within_tolerance(target):
    rng = random.Random(1)
    plan = synthetic_plan([rng.choice([256, 1024, 4096, 9216]) for _ in range(60)])
    drops = {layer.name: rng.random() for layer in plan.layers}
    assignment = search_threshold(plan, scores_for(plan, drops=drops), RULE, target=target, tolerance=0.05,
                                  num_steps=0, source="test")
    assert abs(assignment.average_bits - target) <= 0.05
    assert assignment.plan.average_bits(0) == pytest.approx(assignment.average_bits)
    table = {}
    for score in scores_for(plan, drops=drops):
        table.setdefault(score.layer, {})[score.bits] = sensitivity(score.mse, score.weight_numel, RULE.eta)
    assert assign_bits(table, semantic_bumps(drops, RULE.percentiles), assignment.threshold, RULE) == \
        assignment.bits


def test_no_threshold_in_the_band_names_the_two_nearest_averages():
    plan = synthetic_plan([1000, 1000], extra_params=0)     # averages move in big steps
    with pytest.raises(UserError, match=r"nearest reachable averages are (\d\.\d{4}) \(S_o=.*\) and (\d\.\d{4})"):
        search_threshold(plan, scores_for(plan), RULE, target=2.05, tolerance=0.001, num_steps=0, source="test")


def test_unreachable_target_names_the_range():
    plan = synthetic_plan([1000, 3000])
    low, high = reachable_range(plan, [layer.name for layer in plan.layers], RULE, 0)
    assert low == pytest.approx(math.log2(3) * 4000 / 5000)
    assert high == pytest.approx(math.log2(2 ** 7 + 1) * 4000 / 5000)
    with pytest.raises(UserError, match=rf"reachable range is {low:.4f} .* to {high:.4f}"):
        check_target_reachable(plan, [layer.name for layer in plan.layers], RULE, 0, target=0.5, tolerance=0.01)
    with pytest.raises(UserError, match="no candidate layers"):
        check_target_reachable(plan, [], RULE, 0, target=1.5, tolerance=0.01)
    check_target_reachable(plan, [layer.name for layer in plan.layers], RULE, 0, target=2.0, tolerance=0.01)
