from pathlib import Path

import pytest

from lowbit_deploy.errors import UserError
from lowbit_deploy.quant.grids import GridKind
from lowbit_deploy.recipes import load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    # A recipe gives pattern rules or a plan file that ships beside it (resolved to an absolute path on load).
    assert recipe.version == 1 and (recipe.quantize.layers or Path(recipe.quantize.plan).is_file())


def test_first_matching_rule_wins_and_bits_vary_per_pattern(tiny_recipe_dict):
    recipe = parse_recipe(tiny_recipe_dict)
    assert recipe.quantize.rule_for("conv_in").bits == 8
    assert recipe.quantize.rule_for("time_embedding.linear_1").keep_float
    assert recipe.quantize.rule_for("down_blocks.0.resnets.0.time_emb_proj").keep_float
    rule = recipe.quantize.rule_for("down_blocks.1.attentions.0.proj_in")
    assert (rule.bits, rule.grid) == (2, GridKind.BALANCED)


def test_unknown_key_is_named(tiny_recipe_dict):
    tiny_recipe_dict["train"]["learning_rate"] = 1e-3
    with pytest.raises(UserError, match=r"train\.learning_rate: unknown key"):
        parse_recipe(tiny_recipe_dict)


def test_unknown_key_in_a_rule_is_named(tiny_recipe_dict):
    tiny_recipe_dict["quantize"]["layers"][0]["bitz"] = 3
    with pytest.raises(UserError, match=r"quantize\.layers \(rule 1\)\.bitz: unknown key"):
        parse_recipe(tiny_recipe_dict)


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_bits_out_of_range(tiny_recipe_dict, bits):
    tiny_recipe_dict["quantize"]["layers"][-1]["bits"] = bits
    with pytest.raises(UserError, match=r"quantize\.layers \(rule 5\)\.bits"):
        parse_recipe(tiny_recipe_dict)


def test_wrong_version_says_which_version_is_read(tiny_recipe_dict):
    tiny_recipe_dict["version"] = 2
    with pytest.raises(UserError, match="set `version: 1`"):
        parse_recipe(tiny_recipe_dict)


def test_rule_needs_bits_or_keep_float(tiny_recipe_dict):
    tiny_recipe_dict["quantize"]["layers"].append({"pattern": "x"})
    with pytest.raises(UserError, match="exactly one"):
        parse_recipe(tiny_recipe_dict)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_recipe(bad)


def test_signed_one_bit_grid_is_refused(tiny_recipe_dict):
    tiny_recipe_dict["quantize"]["layers"][-1].update(bits=1, grid="signed")
    with pytest.raises(UserError, match="grid: balanced"):
        parse_recipe(tiny_recipe_dict)
