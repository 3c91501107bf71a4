"""Shared fixtures: tiny UNets built in-process (nothing is downloaded), and a tiny recipe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Test modules import the tiny-model factory from tests/tinymodels.py (module-scoped fixtures need it directly).
sys.path.insert(0, str(Path(__file__).parent))

from tinymodels import TINY_RECIPE, make_tiny_unet  # noqa: E402


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def tiny_recipe_dict():
    import copy

    return copy.deepcopy(TINY_RECIPE)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A local diffusers checkpoint folder in SD's layout (unet/ subfolder), as a user's --model PATH."""
    folder = tmp_path / "tiny-sd"
    make_tiny_unet().save_pretrained(folder / "unet")
    return folder



@pytest.fixture
def tiny_efficientdm_recipe_dict():
    import copy

    from tinymodels import TINY_EFFICIENTDM_RECIPE

    return copy.deepcopy(TINY_EFFICIENTDM_RECIPE)
