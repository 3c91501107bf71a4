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
