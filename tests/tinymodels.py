"""Tiny models and recipes for tests, built in-process (nothing is downloaded)."""

from __future__ import annotations

import torch

TINY_RECIPE = {
    "version": 1,
    "name": "tiny-test",
    "quantize": {
        "layers": [
            {"pattern": "conv_in", "bits": 8, "grid": "signed"},
            {"pattern": "conv_out", "bits": 8, "grid": "signed"},
            {"pattern": "time_embedding.*", "keep_float": True},
            {"pattern": "*.time_emb_proj", "keep_float": True},
            {"pattern": "*", "bits": 2, "grid": "balanced"},
        ]
    },
    "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 1, "data": "gaussian"},
    "validate": {"batches": 1, "batch_size": 2, "sampling": {"num_samples": 2, "num_steps": 2}},
}


def make_tiny_unet(seed: int = 0, cross_attention_dim: int = 16):
    """A ~100k-parameter UNet2DConditionModel with cross-attention down/mid/up blocks, like SD's layout."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4,
    ).eval()


# SDXL's text_time embedding at toy size: text_embeds of this width plus 6 time ids of TINY_SDXL_TIME_DIM features.
TINY_SDXL_TEXT_DIM = 8
TINY_SDXL_TIME_DIM = 4


def make_tiny_sdxl_unet(seed: int = 0, cross_attention_dim: int = 16):
    """SDXL's layout at toy size (~100k parameters): added conditions ``text_embeds`` [B, 8] and ``time_ids`` [B, 6]
    (``addition_embed_type: text_time``), ``transformer_layers_per_block`` as a list, linear projections, 4 latent
    channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 2], cross_attention_dim=cross_attention_dim, attention_head_dim=4,
        norm_num_groups=4, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=TINY_SDXL_TEXT_DIM + 6 * TINY_SDXL_TIME_DIM,
    ).eval()


def make_tiny_class_unet(seed: int = 0, num_classes: int = 5, cross_attention_dim: int = 16):
    """The tiny UNet with a class embedding table (``num_class_embeds``): takes ``class_labels`` int64 [B]."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4,
        num_class_embeds=num_classes,
    ).eval()


# EfficientDM on the tiny UNet: W4A8 with per-step activation scales on a 4-step schedule, W8A8 (one scale) for the
# first/last and time layers, LoRA rank 2, data-free trajectory distillation (2 trajectories of 4 steps).
TINY_EFFICIENTDM_RECIPE = {
    "version": 1,
    "name": "tiny-efficientdm-test",
    "schedule": {"num_steps": 4},
    "quantize": {
        "layers": [
            {"pattern": "conv_in", "bits": 8, "grid": "signed", "act_bits": 8, "act_per_step": False},
            {"pattern": "conv_out", "bits": 8, "grid": "signed", "act_bits": 8, "act_per_step": False},
            {"pattern": "time_embedding.*", "bits": 8, "grid": "signed", "act_bits": 8, "act_per_step": False},
            {"pattern": "*", "bits": 4, "grid": "signed", "act_bits": 8},
        ],
        "activations": {"calibration_samples": 2, "calibration_batch": 2, "candidates": 10},
    },
    "train": {"batch_size": 2, "lr": 1e-3, "checkpoint_every": 100, "lora": {"rank": 2},
              "stages": [{"kind": "trajectory", "steps": 8}]},
    "validate": {"batches": 1, "batch_size": 2, "sampling": {"num_samples": 2}},
}


# UNet families beyond SD1.x/2.x: factory and the added-condition inputs it takes.
TINY_FAMILIES = {"sdxl": (make_tiny_sdxl_unet, ("text_embeds", "time_ids")),
                 "class": (make_tiny_class_unet, ("class_labels",))}


def tiny_family_recipe(cached: bool) -> dict:
    """TINY_RECIPE without the fp16 reference; with ``cached`` the time embedding is a step-index table (the ResBlock
    time projections of these families see the added conditions, so they stay float)."""
    import copy

    data = copy.deepcopy(TINY_RECIPE)
    data["name"] = f"families-{'cached' if cached else 'timestep'}"
    data["export"] = {"export_fp16_reference": False}
    if cached:
        data["schedule"] = {"num_steps": data["validate"]["sampling"]["num_steps"]}
        data["quantize"]["layers"][2] = {"pattern": "time_embedding.*", "cache": True}
    return data


def run_tiny_family(root, family: str, cached: bool, *options: str):
    """`lowbit-deploy run` (train -> export -> [build ->] validate; ``options`` e.g. --no-build) on a tiny checkpoint
    of ``family`` saved as a user's folder; returns the run directory and the CLI result."""
    import yaml
    from click.testing import CliRunner

    from lowbit_deploy.cli import main

    make, _ = TINY_FAMILIES[family]
    make().save_pretrained(root / "model" / "unet")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_family_recipe(cached)))
    args = ["run", str(recipe), "--out", str(root / "run"), "--model", str(root / "model"), "--no-progress", *options]
    return root / "run", CliRunner().invoke(main, args)
