"""Cached time features: the step-index model equals the timestep model at the schedule's timesteps."""

import copy

import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.export.time_cache import compute_time_tables, install_time_cache
from lowbit_deploy.quant.apply import plan_for
from lowbit_deploy.recipes import parse_recipe
from lowbit_deploy.signature import deployed_signature

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
