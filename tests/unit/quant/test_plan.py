"""The realized plan: BitsFusion's average-bits formula, cached-table accounting, persistence."""

import math

import pytest

from lowbit_deploy.errors import UserError
from lowbit_deploy.quant.grids import GridKind
from lowbit_deploy.quant.plan import LayerDecision, LayerRole, QuantPlan


def _plan(proj_role=LayerRole.CACHED) -> QuantPlan:
    q = LayerRole.QUANTIZED
    return QuantPlan((
        LayerDecision("conv_in", "Conv2d", 100, 4, q, GridKind.SIGNED, 8),
        LayerDecision("down.conv", "Conv2d", 1000, 10, q, GridKind.BALANCED, 1),
        LayerDecision("up.attn.to_q", "Linear", 400, 20, q, GridKind.BALANCED, 2),
        LayerDecision("time_embedding.linear_1", "Linear", 64, 8, LayerRole.CACHED),
        LayerDecision("time_embedding.linear_2", "Linear", 64, 8, LayerRole.CACHED),
        LayerDecision("down.resnets.0.time_emb_proj", "Linear", 80, 10,
                      proj_role, *((GridKind.BALANCED, 3) if proj_role is q else ())),
        LayerDecision("norm_out", "Linear", 50, 5, LayerRole.FLOAT),
    ), total_params=2000)


def test_average_bits_by_hand():
    # [100*log2(256) + 1000*log2(3) + 400*log2(5) + 16 * (T=20 steps * 10 projection outputs)] / 2000
    expected = (100 * 8 + 1000 * math.log2(3) + 400 * math.log2(5) + 16 * 20 * 10) / 2000
    assert _plan().average_bits(num_steps=20) == pytest.approx(expected, rel=1e-12)
    assert _plan().cached_table_rows() == 10


def test_the_embedding_table_counts_when_a_projection_still_needs_it():
    plan = _plan(proj_role=LayerRole.QUANTIZED)
    assert plan.cached_table_rows() == 8  # time_embedding.linear_2's 8 outputs per step
    expected = (100 * 8 + 1000 * math.log2(3) + 400 * math.log2(5) + 80 * math.log2(9) + 16 * 20 * 8) / 2000
    assert plan.average_bits(num_steps=20) == pytest.approx(expected, rel=1e-12)


def test_round_trip_and_histogram(tmp_path):
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    assert QuantPlan.load(tmp_path / "plan.json") == plan
    assert plan.bits_histogram() == {"balanced-1bit": 1, "balanced-2bit": 1, "cached": 3, "float": 1,
                                     "signed-8bit": 1}


@pytest.mark.parametrize(("content", "message"), [
    ("{}", "not a lowbit-deploy quantization plan"),
    ("[1, 2]", "not a lowbit-deploy quantization plan"),
    ("not json", "not readable JSON"),
    ('{"format": "lowbit-deploy/quant-plan/1", "total_params": 1, "layers": [{"name": "x"}]}',
     "not a valid quantization plan"),
])
def test_bad_plan_files_are_clear_errors(tmp_path, content, message):
    (tmp_path / "plan.json").write_text(content)
    with pytest.raises(UserError, match=message):
        QuantPlan.load(tmp_path / "plan.json")


def test_missing_plan_file_names_the_command_that_writes_it(tmp_path):
    with pytest.raises(UserError, match="lowbit-deploy analyze"):
        QuantPlan.load(tmp_path / "nope.json")


def test_decisions_are_validated():
    with pytest.raises(ValueError, match="signed 1-bit"):
        LayerDecision("a", "Linear", 4, 2, LayerRole.QUANTIZED, GridKind.SIGNED, 1)
    with pytest.raises(ValueError, match="exactly for quantized layers"):
        LayerDecision("a", "Linear", 4, 2, LayerRole.FLOAT, GridKind.SIGNED, 4)
