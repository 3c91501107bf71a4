"""Fixtures for the models tests: the shipped default, copies of it, and a tiny foreign diffusers checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lowbit_deploy.models import DEFAULT_MODEL_DIR, load_model


def tiny_unet_config() -> dict:
    # diffusers' own test-size UNet: builds and runs in milliseconds.
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (4, 8),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "cross_attention_dim": 8,
        "attention_head_dim": 2,
        "norm_num_groups": 4,
    }


@pytest.fixture(scope="session")
def default_bundle():
    if not (DEFAULT_MODEL_DIR / "unet" / "config.json").is_file():
        pytest.fail(f"the embedded default is missing from {DEFAULT_MODEL_DIR}; "
                    "run `python scripts/train_default_model.py`")
    return load_model(None)


@pytest.fixture
def default_copy(tmp_path: Path) -> Path:
    """A copy of the shipped default folder (unet/ scheduler/ prompt_encoder/ classifier/)."""
    target = tmp_path / "default_copy"
    shutil.copytree(DEFAULT_MODEL_DIR, target)
    return target


@pytest.fixture
def foreign_checkpoint(tmp_path: Path) -> Path:
    """A pipeline-like folder with only ``unet/`` (no scheduler, no prompt encoder): a foreign checkpoint."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    root = tmp_path / "foreign"
    UNet2DConditionModel(**tiny_unet_config()).save_pretrained(root / "unet", safe_serialization=True)
    return root
