import math

import pytest

from lowbit_deploy.errors import UserError
from lowbit_deploy.quant.apply import apply_plan, plan_for, quantize_model, quantized_layers
from lowbit_deploy.quant.plan import LayerRole, QuantPlan
from lowbit_deploy.recipes import parse_recipe


def test_rules_select_layers_and_bits(tiny_unet, tiny_recipe_dict):
    plan = quantize_model(tiny_unet, parse_recipe(tiny_recipe_dict).quantize)
    layers = {layer.name: layer for layer in plan.layers}
    assert layers["conv_in"].bits == 8 and layers["conv_out"].bits == 8
    time_layers = [name for name in layers if name.startswith("time_embedding") or name.endswith("time_emb_proj")]
    assert time_layers and all(layers[name].role is LayerRole.FLOAT for name in time_layers)
    assert set(quantized_layers(tiny_unet)) == {layer.name for layer in plan.quantized}
    assert math.log2(5) * 0.5 < plan.average_bits() < 8


def test_initial_mse_is_reported_per_layer(tiny_unet, tiny_recipe_dict):
    plan = plan_for(tiny_unet, parse_recipe(tiny_recipe_dict).quantize)
    init_mse = apply_plan(tiny_unet, plan)
    assert set(init_mse) == {layer.name for layer in plan.quantized}
    assert all(math.isfinite(value) and value > 0 for value in init_mse.values())


def test_a_saved_plan_rebuilds_the_model_without_the_recipe(tmp_path, tiny_unet, tiny_recipe_dict):
    from tinymodels import make_tiny_unet

    plan = plan_for(tiny_unet, parse_recipe(tiny_recipe_dict).quantize, source="recipe tiny-test")
    plan.save(tmp_path / "plan.json")
    loaded = QuantPlan.load(tmp_path / "plan.json")
    assert loaded == plan
    fresh = make_tiny_unet()
    apply_plan(fresh, loaded, scale_init=None)
    assert {name: type(m).__name__ for name, m in quantized_layers(fresh).items()} == \
        {d.name: f"Quant{d.layer_type}" for d in plan.quantized}


def test_a_recipe_naming_a_plan_file_uses_it(tmp_path, tiny_unet, tiny_recipe_dict):
    plan = plan_for(tiny_unet, parse_recipe(tiny_recipe_dict).quantize)
    plan.save(tmp_path / "plan.json")
    by_file = parse_recipe({**tiny_recipe_dict, "quantize": {"plan": str(tmp_path / "plan.json")}})
    assert plan_for(tiny_unet, by_file.quantize) == plan


def test_a_plan_for_another_model_lists_the_mismatches(tmp_path, tiny_unet, tiny_recipe_dict):
    from tinymodels import make_tiny_unet

    plan = plan_for(tiny_unet, parse_recipe(tiny_recipe_dict).quantize)
    other = make_tiny_unet(cross_attention_dim=8)  # attention projections of another width
    with pytest.raises(UserError, match=r"(?s)made for another model; \d+ mismatch.*attn2.to_k: plan has Linear with 256 "
                                        r"weights, the model has Linear with 128"):
        apply_plan(other, plan)


def test_no_matching_layer_is_a_clear_error(tiny_unet, tiny_recipe_dict):
    tiny_recipe_dict["quantize"]["layers"] = [{"pattern": "no_such_layer*", "bits": 2}]
    with pytest.raises(UserError, match="matched no quantizable layer"):
        quantize_model(tiny_unet, parse_recipe(tiny_recipe_dict).quantize)


def test_only_time_layers_can_be_cached(tiny_unet, tiny_recipe_dict):
    tiny_recipe_dict["validate"]["sampling"].pop("num_steps")
    tiny_recipe_dict["quantize"]["layers"].insert(0, {"pattern": "conv_in", "cache": True})
    with pytest.raises(UserError, match="conv_in cannot be cached: only time-embedding layers"):
        plan_for(tiny_unet, parse_recipe(tiny_recipe_dict).quantize)


def test_caching_projections_needs_the_embedding_cached_too(tiny_unet, tiny_recipe_dict):
    tiny_recipe_dict["validate"]["sampling"].pop("num_steps")
    tiny_recipe_dict["quantize"]["layers"][3] = {"pattern": "*.time_emb_proj", "cache": True}
    with pytest.raises(UserError, match="every time-embedding layer must be cached too"):
        plan_for(tiny_unet, parse_recipe(tiny_recipe_dict).quantize)
