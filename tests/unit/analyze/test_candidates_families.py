"""BitsFusion's per-candidate evaluation on UNets with added conditions: the brief QAT (condition dropping included)
and the sampled comparison feed the SDXL / class inputs, and a quantized candidate is measured against the float
reference (not a crash, not a zero)."""

from __future__ import annotations

import copy

import pytest
from tinymodels import TINY_FAMILIES, TINY_RECIPE

from lowbit_deploy.analyze.candidates import CandidateEvaluator
from lowbit_deploy.recipes import parse_recipe


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_candidates_of_conditioned_unets_are_tuned_and_sampled(tmp_path, family):
    make, _ = TINY_FAMILIES[family]
    make().save_pretrained(tmp_path / "model" / "unet")
    data = copy.deepcopy(TINY_RECIPE)
    data["schedule"] = {"num_steps": 2}
    data["train"]["condition_drop_prob"] = 0.5
    data["analyze"] = {"num_samples": 2, "tune_steps": 2}
    evaluator = CandidateEvaluator(parse_recipe(data), str(tmp_path / "model"))
    assert evaluator.cond.added.keys() == {spec.name for spec in evaluator.signature.added_conditions} != set()
    record = evaluator.evaluate("down_blocks.1.attentions.0.proj_in", 1)
    assert record["mse"] > 0 and record["tune_loss"] > 0
