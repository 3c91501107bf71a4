"""The analysis on tiny models: outputs, the resumable cache, refusing a plan for another model, the CLI."""

import copy
import json

import pytest
import yaml
from click.testing import CliRunner

from lowbit_deploy.analyze import analyze, prepare
from lowbit_deploy.analyze.assign import reachable_range
from lowbit_deploy.analyze.runner import CACHE_NAME, read_cache, run_candidates
from lowbit_deploy.cli import main
from lowbit_deploy.errors import UserError
from lowbit_deploy.quant.plan import LayerRole, QuantPlan
from lowbit_deploy.recipes import parse_recipe

# In model order (diffusers registers up_blocks before mid_block).
CANDIDATES = ["down_blocks.1.attentions.0.proj_in", "up_blocks.0.resnets.0.conv1", "mid_block.resnets.0.conv1"]


def analysis_recipe(model_dir, **analyze_overrides):
    from tinymodels import TINY_RECIPE

    data = copy.deepcopy(TINY_RECIPE)
    data["model"] = {"path": str(model_dir)}
    data["schedule"] = {"num_steps": 2}
    data["validate"] = {"sampling": {"num_samples": 2}}
    data["quantize"] = {"layers": [
        {"pattern": "conv_in", "bits": 8, "grid": "signed"}, {"pattern": "conv_out", "bits": 8, "grid": "signed"},
        {"pattern": "time_embedding.*", "cache": True}, {"pattern": "*.time_emb_proj", "cache": True},
        *({"pattern": name, "bits": 2} for name in CANDIDATES), {"pattern": "*", "keep_float": True}]}
    # The tiny model's average is dominated by its cached time tables; aim at the middle of what is reachable.
    data["analyze"] = {"num_samples": 2, "workers": 1, "target_average_bits": 1.0, "tolerance": 0.5,
                       **analyze_overrides}
    return data


def mid_target(data):
    recipe = parse_recipe({**data, "analyze": {**data["analyze"], "target_average_bits": 10.0, "tolerance": 10.0}})
    inputs = prepare(recipe)
    low, high = reachable_range(inputs.base_plan, inputs.candidates, inputs.rule, recipe.schedule.num_steps)
    return (low + high) / 2, (high - low)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    from tinymodels import make_tiny_unet

    root = tmp_path_factory.mktemp("analyze")
    make_tiny_unet().save_pretrained(root / "model" / "unet")
    data = analysis_recipe(root / "model")
    target, span = mid_target(data)
    data["analyze"].update(target_average_bits=round(target, 3), tolerance=round(span / 2, 3))
    result = analyze(parse_recipe(data), root / "out", progress=False)
    return root, data, result


def test_outputs_and_plan(analysed):
    root, data, result = analysed
    out = root / "out"
    for name in ("plan.json", "sensitivity.json", "report.md", "bits_per_layer.png", CACHE_NAME):
        assert (out / name).is_file(), name
    plan = QuantPlan.load(out / "plan.json")
    assert plan.source == f"analyze tiny-test, target {data['analyze']['target_average_bits']} bits"
    assert sorted(layer.name for layer in plan.quantized if layer.grid.value == "balanced") == sorted(CANDIDATES)
    assert plan.decision("conv_in").bits == 8 and plan.decision("time_embedding.linear_1").role is LayerRole.CACHED
    assert plan.average_bits(2) == pytest.approx(result.average_bits)
    assert abs(result.average_bits - data["analyze"]["target_average_bits"]) <= data["analyze"]["tolerance"]
    sensitivity = json.loads((out / "sensitivity.json").read_text())
    assert [row["layer"] for row in sensitivity["layers"]] == CANDIDATES
    row = sensitivity["layers"][0]
    assert set(row["candidates"]) == {"1", "2", "3"} and row["candidates"]["1"]["mse"] > 0
    assert row["candidates"]["3"]["semantic_drop"] is None      # a foreign model has no classifier
    report = (out / "report.md").read_text()
    assert "semantic metric: none (this model has no classifier" in report
    assert f"**{result.average_bits:.4f}**" in report and "| `mid_block.resnets.0.conv1` | 2,304 |" in report


def test_more_bits_give_samples_closer_to_float(analysed):
    root, _, _ = analysed
    records = [json.loads(line) for line in (root / "out" / CACHE_NAME).read_text().splitlines()]
    mse = {(record["layer"], record["bits"]): record["mse"] for record in records}
    assert all(mse[(layer, 3)] < mse[(layer, 1)] for layer in CANDIDATES)


def test_rerun_reuses_every_candidate_and_a_new_target_reassigns(analysed):
    root, data, _ = analysed
    again = copy.deepcopy(data)
    again["analyze"]["eta"] = 0.0            # acts after measuring: nothing is measured again
    result = analyze(parse_recipe(again), root / "out", progress=False)
    assert (result.computed, result.candidates) == (0, 9)


def test_resume_measures_only_what_is_missing(analysed, tmp_path):
    root, data, _ = analysed
    inputs = prepare(parse_recipe(data))
    first = inputs.jobs[:4]
    _, computed = run_candidates(inputs.recipe, inputs.model_path, first, tmp_path, inputs.digest, progress=False)
    assert computed == 4
    # A kill in the middle of a write leaves a torn last line; it is dropped, not misread.
    with open(tmp_path / CACHE_NAME, "a") as handle:
        handle.write('{"layer": "mid_block.resnets.0.conv1", "bi')
    assert set(read_cache(tmp_path / CACHE_NAME, inputs.digest)) == set(first)
    result = analyze(inputs.recipe, tmp_path, progress=False)
    assert (result.computed, result.candidates) == (5, 9)
    lines = (tmp_path / CACHE_NAME).read_text().splitlines()
    assert len(lines) == 9 and all(json.loads(line)["settings"] == inputs.digest for line in lines)


def test_cache_from_other_settings_is_refused(analysed):
    root, data, _ = analysed
    other = copy.deepcopy(data)
    other["analyze"]["seed"] = 7
    with pytest.raises(UserError, match="measured with other settings"):
        analyze(parse_recipe(other), root / "out", progress=False)


def test_unreachable_target_is_refused_before_any_candidate_runs(analysed, tmp_path):
    root, data, _ = analysed
    low = copy.deepcopy(data)
    low["analyze"].update(target_average_bits=0.01, tolerance=0.001)
    with pytest.raises(UserError, match=r"out of reach .* reachable range is \d+\.\d{4} .* to \d+\.\d{4}"):
        analyze(parse_recipe(low), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / CACHE_NAME).exists()


def test_plan_for_another_model_is_refused(analysed, tmp_path):
    from tinymodels import make_tiny_unet

    from lowbit_deploy.quant.apply import plan_for

    root, _, _ = analysed
    recipe = parse_recipe({"version": 1, "name": "uses-plan", "quantize": {"plan": str(root / "out" / "plan.json")}})
    plan_for(make_tiny_unet(), recipe.quantize)                  # the model it was made for
    with pytest.raises(UserError, match=r"made for another model; \d+ mismatch\(es\):\n  - .*attn2\.to_k: plan has "
                                        r"Linear with 256 weights, the model has Linear with 512"):
        plan_for(make_tiny_unet(cross_attention_dim=32), recipe.quantize)


def test_recipe_with_a_plan_file_cannot_be_analysed(tmp_path):
    recipe = parse_recipe({"version": 1, "name": "p", "quantize": {"plan": str(tmp_path / "plan.json")}})
    with pytest.raises(UserError, match="needs pattern rules"):
        prepare(recipe)


def test_analyze_section_is_strict():
    base = {"version": 1, "name": "p", "quantize": {"layers": [{"pattern": "*", "bits": 2}]}}
    with pytest.raises(UserError, match=r"analyze\.target_bits: unknown key"):
        parse_recipe({**base, "analyze": {"target_bits": 2}})
    with pytest.raises(UserError, match="fallback_bits"):
        parse_recipe({**base, "analyze": {"candidate_bits": [1, 2, 3, 4]}})
    assert parse_recipe(base).analyze.exclude == ["conv_in", "conv_out", "time_embedding.*", "*.time_emb_proj"]


def test_default_model_is_judged_by_its_digit_classifier(tmp_path):
    data = {"version": 1, "name": "default-two-layers", "schedule": {"num_steps": 2},
            "quantize": {"layers": [{"pattern": "mid_block.attentions.0.proj_in", "bits": 2},
                                    {"pattern": "mid_block.attentions.0.proj_out", "bits": 2},
                                    {"pattern": "*", "keep_float": True}]},
            "analyze": {"num_samples": 2, "workers": 1, "target_average_bits": 0.01, "tolerance": 0.01}}
    result = analyze(parse_recipe(data), tmp_path, progress=False)
    assert result.metric.startswith("digit-classifier confidence")
    rows = json.loads((tmp_path / "sensitivity.json").read_text())["layers"]
    assert all(isinstance(row["candidates"]["3"]["semantic_drop"], float) for row in rows)


def test_cli_end_to_end_in_parallel(tiny_model_dir, tmp_path):
    data = analysis_recipe(tiny_model_dir, workers=2)
    target, span = mid_target(data)
    data["analyze"].update(target_average_bits=round(target, 3), tolerance=round(span / 2, 3))
    recipe = tmp_path / "analyze.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["analyze", str(recipe), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "9 of 9 candidates measured now" in result.output
    assert result.output.strip().splitlines()[-1].startswith("PASSED | Runtime: ")
    assert (tmp_path / "out" / "plan.json").is_file()
    data["analyze"].update(target_average_bits=0.01, tolerance=0.001)
    recipe.write_text(yaml.safe_dump(data))
    refused = CliRunner().invoke(main, ["analyze", str(recipe), "--out", str(tmp_path / "out2"), "--no-progress"])
    assert refused.exit_code == 2 and "reachable range is" in refused.output
    assert refused.output.strip().splitlines()[-1].startswith("FAILED")


def test_shipped_plan_fits_the_default_model_at_its_target():
    from pathlib import Path

    from lowbit_deploy.models import load_model
    from lowbit_deploy.quant.apply import plan_for
    from lowbit_deploy.recipes import load_recipe

    recipes = Path(__file__).parents[3] / "recipes"
    analysis = load_recipe(recipes / "tiny-bitsfusion-analyze.yaml")
    recipe = load_recipe(recipes / "tiny-bitsfusion-1.99.yaml")
    plan = plan_for(load_model(None).unet, recipe.quantize)      # refuses a plan made for another model
    assert plan.source == "analyze tiny-bitsfusion-analyze, target 1.99 bits"
    assert recipe.schedule.num_steps == analysis.schedule.num_steps
    average = plan.average_bits(recipe.schedule.num_steps)
    assert abs(average - analysis.analyze.target_average_bits) <= analysis.analyze.tolerance


def test_tuning_a_candidate_leaves_the_float_teacher_untouched(analysed):
    from lowbit_deploy.analyze.candidates import CandidateEvaluator, key_digest, settings_key

    root, data, _ = analysed
    tuned = parse_recipe({**data, "analyze": {**data["analyze"], "tune_steps": 2}})
    evaluator = CandidateEvaluator(tuned, tuned.model.path)
    before = {name: tensor.clone() for name, tensor in evaluator.bundle.unet.state_dict().items()}
    record = evaluator.evaluate(CANDIDATES[1], 1)
    assert isinstance(record["tune_loss"], float) and record["mse"] > 0
    # The teacher (the float model every candidate starts from) is untouched by a candidate's tuning.
    after = evaluator.bundle.unet.state_dict()
    assert all(bool((after[name] == tensor).all()) for name, tensor in before.items())
    assert key_digest(settings_key(tuned, "m")) != key_digest(settings_key(parse_recipe(data), "m"))


def test_import_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, lowbit_deploy.analyze; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_cached_candidates_belong_to_the_weight_files_and_prompts(tiny_recipe_dict):
    """Other weight files (--variant) or other prompts are another model: their cached measurements are not reused;
    recipes without either keep the key (and the caches) they had."""
    from lowbit_deploy.analyze.candidates import key_digest, settings_key

    plain = parse_recipe(tiny_recipe_dict)
    prompted = parse_recipe({**tiny_recipe_dict, "conditions": {"prompts_file": "/p.txt"}})
    digests = {key_digest(settings_key(recipe, "m")) for recipe in (plain, plain.with_variant("fp16"), prompted)}
    assert len(digests) == 3
    assert set(settings_key(plain, "m")).isdisjoint({"variant", "prompts_file"})
