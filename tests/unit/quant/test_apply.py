import math

import pytest

from lowbit_deploy.errors import UserError
from lowbit_deploy.quant.apply import quantize_model, quantized_layers
from lowbit_deploy.recipes import parse_recipe


def test_rules_select_layers_and_bits(tiny_unet, tiny_recipe_dict):
    plan = quantize_model(tiny_unet, parse_recipe(tiny_recipe_dict).quantize)
    layers = {layer.name: layer for layer in plan.layers}
    assert layers["conv_in"].bits == 8 and layers["conv_out"].bits == 8
    assert not any(name.startswith("time_embedding") or name.endswith("time_emb_proj") for name in layers)
    assert set(quantized_layers(tiny_unet)) == set(layers)
    assert all(math.isfinite(layer.init_mse) for layer in plan.layers)
    assert math.log2(5) < plan.average_bits < 8


def test_no_matching_layer_is_a_clear_error(tiny_unet, tiny_recipe_dict):
    tiny_recipe_dict["quantize"]["layers"] = [{"pattern": "no_such_layer*", "bits": 2}]
    with pytest.raises(UserError, match="matched no quantizable layer"):
        quantize_model(tiny_unet, parse_recipe(tiny_recipe_dict).quantize)
