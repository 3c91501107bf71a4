"""Cached time features: the step-index model equals the timestep model at the schedule's timesteps."""

import copy

import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.export.time_cache import compute_time_tables, install_time_cache
from lowbit_deploy.quant.apply import plan_for
from lowbit_deploy.recipes import parse_recipe
from lowbit_deploy.signature import deployed_signature, signature_for

SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
             "clip_sample": False, "prediction_type": "epsilon"}


@pytest.fixture
def cached_setup(tiny_unet, tiny_recipe_dict):
    tiny_recipe_dict["validate"]["sampling"].pop("num_steps")
    tiny_recipe_dict["schedule"] = {"num_steps": 5}
    tiny_recipe_dict["quantize"]["layers"][2:4] = [{"pattern": "time_embedding.*", "cache": True},
                                                   {"pattern": "*.time_emb_proj", "cache": True}]
    recipe = parse_recipe(tiny_recipe_dict)
    plan = plan_for(tiny_unet, recipe.quantize)
    return tiny_unet, plan, deployed_signature(tiny_unet, 4, plan, SCHEDULER, recipe.schedule)


def _outputs(cached, float_unet, signature, step_index):
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(len(step_index), *signature.sample_shape, generator=generator)
    states = torch.randn(len(step_index), signature.seq_len, signature.cross_attention_dim, generator=generator)
    index = torch.tensor(step_index)
    timesteps = torch.tensor(signature.step_timesteps)[index]
    with torch.no_grad():
        return (cached(sample, index, encoder_hidden_states=states).sample,
                float_unet(sample, timesteps, encoder_hidden_states=states).sample)


def test_fp32_tables_reproduce_the_timestep_model(cached_setup):
    unet, plan, signature = cached_setup
    cached = copy.deepcopy(unet)
    install_time_cache(cached, plan, signature, compute_time_tables(unet, plan, signature, dtype=torch.float32))
    # The tables are the model's own outputs. What remains is float32 GEMM blocking: the time layers ran at batch
    # T when the tables were made and at batch 3 here, which changes the last bit of some time features; the UNet
    # carries that to ~1e-6 of its output (measured: max abs 5.8e-7 on outputs of magnitude ~0.3).
    for step in range(signature.num_steps):
        indexed, by_timestep = _outputs(cached, unet, signature, [step] * 3)
        torch.testing.assert_close(indexed, by_timestep, rtol=1e-5, atol=2e-6)


def test_fp16_tables_differ_only_by_their_rounding(cached_setup):
    unet, plan, signature = cached_setup
    cached = copy.deepcopy(unet)
    tables = compute_time_tables(unet, plan, signature)
    assert all(table.dtype == torch.float16 and table.shape[0] == 5 for table in tables.values())
    assert sum(table.shape[1] for table in tables.values()) == plan.cached_table_rows()
    install_time_cache(cached, plan, signature, tables)
    indexed, by_timestep = _outputs(cached, unet, signature, [0, 2, 4, 1])
    relative = float((indexed - by_timestep).norm() / by_timestep.norm())
    assert 0 < relative < 1e-3  # fp16 keeps 11 significant bits of every cached value


def test_out_of_range_step_index_is_a_clear_error(cached_setup):
    unet, plan, signature = cached_setup
    install_time_cache(unet, plan, signature, compute_time_tables(unet, plan, signature))
    with pytest.raises(UserError, match=r"step index \[5\] is out of range.*5 steps"):
        unet(torch.zeros(1, *signature.sample_shape), torch.tensor([5]),
             encoder_hidden_states=torch.zeros(1, signature.seq_len, signature.cross_attention_dim))


# ---- UNets whose conditions reach the time embedding (SDXL text_time, class labels) ---------------------------------
def _conditioned_setup(make, recipe_dict, cache_projections=False):
    recipe_dict["validate"]["sampling"].pop("num_steps")
    recipe_dict["schedule"] = {"num_steps": 5}
    recipe_dict["quantize"]["layers"][2:4] = [{"pattern": "time_embedding.*", "cache": True},
                                              {"pattern": "*.time_emb_proj",
                                               **({"cache": True} if cache_projections else {"keep_float": True})}]
    recipe = parse_recipe(recipe_dict)
    unet = make()
    plan = plan_for(unet, recipe.quantize)
    return unet, plan, recipe


def _make_sdxl():
    from tinymodels import make_tiny_sdxl_unet

    return make_tiny_sdxl_unet()


def _make_class():
    from tinymodels import make_tiny_class_unet

    return make_tiny_class_unet()


@pytest.mark.parametrize("make", [_make_sdxl, _make_class], ids=["sdxl", "class"])
def test_cached_embedding_keeps_the_added_conditions_in_the_graph(make, tiny_recipe_dict):
    """Only the time embedding is cached: the class / SDXL embeddings are still added to its row, so the cached model
    equals the timestep model for every condition, and answers a change of condition exactly as it does."""
    from lowbit_deploy.models.conditioning import draw_added, null_added
    from lowbit_deploy.signature import unet_keywords

    unet, plan, recipe = _conditioned_setup(make, tiny_recipe_dict)
    signature = deployed_signature(unet, 4, plan, SCHEDULER, recipe.schedule)
    assert signature.added_conditions
    cached = copy.deepcopy(unet)
    tables = compute_time_tables(unet, plan, signature, dtype=torch.float32)
    assert list(tables) == ["time_embedding"]
    install_time_cache(cached, plan, signature, tables)
    generator = torch.Generator().manual_seed(3)
    index = torch.tensor([0, 2, 4, 1])
    sample = torch.randn(4, *signature.sample_shape, generator=generator)
    states = torch.randn(4, signature.seq_len, signature.cross_attention_dim, generator=generator)
    drawn = draw_added(signature.added_conditions, 4, generator, signature.sample_shape)
    nulls = null_added(signature.added_conditions, 4, signature.sample_shape)
    timesteps = torch.tensor(signature.step_timesteps)[index]
    outputs = {}
    with torch.no_grad():
        for name, added in (("drawn", drawn), ("null", nulls)):
            outputs[name] = (cached(sample, index, encoder_hidden_states=states, **unet_keywords(added)).sample,
                             unet(sample, timesteps, encoder_hidden_states=states, **unet_keywords(added)).sample)
    for indexed, by_timestep in outputs.values():
        torch.testing.assert_close(indexed, by_timestep, rtol=1e-5, atol=2e-6)
    change_cached = outputs["drawn"][0] - outputs["null"][0]
    change_float = outputs["drawn"][1] - outputs["null"][1]
    assert float(change_float.abs().max()) > 1e-3  # the conditions matter to this model...
    torch.testing.assert_close(change_cached, change_float, rtol=1e-4, atol=4e-6)  # ...and to its cached twin


@pytest.mark.parametrize("make", [_make_sdxl, _make_class], ids=["sdxl", "class"])
def test_caching_time_projections_of_a_conditioned_unet_is_refused_before_training(make, tiny_recipe_dict):
    unet, plan, recipe = _conditioned_setup(make, tiny_recipe_dict, cache_projections=True)
    with pytest.raises(UserError, match=r"time projections depend on those inputs.*cache only `time_embedding\.\*`"):
        deployed_signature(unet, 4, plan, SCHEDULER, recipe.schedule)
    with pytest.raises(UserError, match="cannot be cached"):  # export refuses too (a plan from elsewhere)
        compute_time_tables(unet, plan, signature_for(unet, 4, (999, 500, 0), "ddim, 3 steps"))
