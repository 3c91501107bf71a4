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
def make_foreign_unet():
    """Builds the tiny foreign UNet (seeded) for tests that save it in other layouts."""
    def make():
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        return UNet2DConditionModel(**tiny_unet_config())

    return make


@pytest.fixture
def foreign_checkpoint(tmp_path: Path) -> Path:
    """A pipeline-like folder with only ``unet/`` (no scheduler, no prompt encoder): a foreign checkpoint."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    root = tmp_path / "foreign"
    UNet2DConditionModel(**tiny_unet_config()).save_pretrained(root / "unet", safe_serialization=True)
    return root


# A tiny CLIP in SD's layout (text_encoder/ + tokenizer/): a character-level BPE vocabulary with a few merges,
# written as the vocab.json / merges.txt / tokenizer_config.json files a real checkpoint ships.
CLIP_HIDDEN = 16
CLIP_MAX_LENGTH = 12


def write_tiny_clip(root: Path, hidden: int = CLIP_HIDDEN, max_length: int = CLIP_MAX_LENGTH, seed: int = 0,
                    encoder_dir: str = "text_encoder", tokenizer_dir: str = "tokenizer",
                    projection_dim: int | None = None) -> None:
    """A tiny CLIP text encoder and tokenizer; ``projection_dim``: a CLIPTextModelWithProjection (SDXL's second)."""
    import json
    import string

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    letters = string.ascii_lowercase
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters),
              "ca", "cat</w>", "do", "dog</w>"]
    tokenizer_dir = root / tokenizer_dir
    tokenizer_dir.mkdir(parents=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n")
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
    config = CLIPTextConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            **({} if projection_dim is None else {"projection_dim": projection_dim}))
    torch.manual_seed(seed)
    model_class = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    model_class(config).eval().save_pretrained(root / encoder_dir, safe_serialization=True)


@pytest.fixture
def tiny_clip_writer():
    """``write_tiny_clip`` for tests that need another text encoder (e.g. another width)."""
    return write_tiny_clip


@pytest.fixture
def clip_checkpoint(tmp_path: Path) -> Path:
    """SD1.x's layout at toy size: unet/ (cross-attention width = the text encoder's), text_encoder/, tokenizer/."""
    from tinymodels import make_tiny_unet

    root = tmp_path / "tiny-clip-sd"
    make_tiny_unet(cross_attention_dim=CLIP_HIDDEN).save_pretrained(root / "unet")
    write_tiny_clip(root)
    return root


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na red dog\nthe dog sat\n")
    return path
