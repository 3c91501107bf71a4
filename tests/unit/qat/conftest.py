"""QAT fixtures: a tiny class-prompted model folder (the default's layout), so real-data stages run in seconds."""

from __future__ import annotations

import copy

import pytest
import torch
from tinymodels import make_tiny_unet


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared CPU the threads' synchronisation makes a step
    ten times slower; restore the setting so other tests keep theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_digits_model_dir(tmp_path):
    """unet/ + prompt_encoder/ like the embedded default: digit prompts, and `data: digits` at 8x8."""
    from lowbit_deploy.models import PromptEncoder

    folder = tmp_path / "tiny-digits"
    make_tiny_unet(cross_attention_dim=64).save_pretrained(folder / "unet")
    torch.manual_seed(0)
    PromptEncoder().save(folder / "prompt_encoder")
    return folder


@pytest.fixture
def two_stage_recipe_dict(tiny_recipe_dict):
    """Stage I distillation with the feature term, then Stage II on the digits; 2 + 2 steps."""
    recipe = copy.deepcopy(tiny_recipe_dict)
    del recipe["train"]["steps"], recipe["train"]["data"]
    recipe["train"]["stages"] = [{"kind": "distill", "steps": 2, "feature_weight": 0.5},
                                 {"kind": "noise", "steps": 2, "lr": 5e-5}]
    return recipe
