"""The DDIM sampler (determinism, shapes, CFG batching) and PSNR."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.signature import DeployedSignature, TimeInput
from lowbit_deploy.validate.sampling import psnr, sample, schedule_timesteps, unet_runner

DDPM_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
               "clip_sample": True, "prediction_type": "epsilon"}
SHAPE = (4, 8, 8)
SIGNATURE = DeployedSignature(SHAPE, seq_len=6, cross_attention_dim=8)


@pytest.fixture(scope="module")
def tiny_denoiser():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()
    return unet_runner(unet)


def _conditions(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(batch, 6, 8, generator=generator), torch.randn(1, 6, 8, generator=generator)


def _run(runner, cond, null, seed=0, guidance=3.0, steps=4, signature=SIGNATURE):
    return sample(runner, signature, cond, null, scheduler_config=DDPM_CONFIG, num_steps=steps,
                  guidance_scale=guidance, seed=seed)


def test_deterministic_and_shaped(tiny_denoiser):
    cond, null = _conditions(3)
    first = _run(tiny_denoiser, cond, null)
    second = _run(tiny_denoiser, cond, null)
    assert first.shape == (3, *SHAPE) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert float(first.abs().max()) <= 1.0
    assert not torch.equal(first, _run(tiny_denoiser, cond, null, seed=1))


def test_cfg_runs_cond_and_null_as_one_batch(tiny_denoiser):
    cond, null = _conditions(2)
    calls = []

    def recording(feeds):
        latents, timesteps, states = feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"]
        calls.append((latents.shape[0], timesteps.shape[0], states.shape[0]))
        assert torch.equal(states[2], null[0]) and torch.equal(latents[:2], latents[2:])
        return tiny_denoiser(feeds)

    guided = _run(recording, cond, null, guidance=3.0)
    assert calls == [(4, 4, 4)] * 4
    unguided = _run(tiny_denoiser, cond, null, guidance=1.0)
    assert not torch.equal(guided, unguided)


def test_without_null_runs_batch_b(tiny_denoiser):
    cond, _ = _conditions(2)
    batches = []

    def recording(feeds):
        batches.append(feeds["sample"].shape[0])
        return tiny_denoiser(feeds)

    _run(recording, cond, None)
    assert batches == [2] * 4


def test_constant_denoiser_matches_ddim_closed_form():
    # eps == 0 everywhere: each DDIM step rescales x by sqrt(abar_prev / abar_t), so x_0 = x_T / sqrt(abar_T).
    from diffusers import DDIMScheduler

    config = dict(DDPM_CONFIG, clip_sample=False)
    signature = DeployedSignature((1, 2, 2), seq_len=1, cross_attention_dim=1)
    result = sample(lambda feeds: torch.zeros_like(feeds["sample"]), signature, torch.zeros(2, 1, 1), None,
                    scheduler_config=config, num_steps=5, guidance_scale=1.0, seed=7)
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(5)
    first = int(scheduler.timesteps[0])
    noise = torch.randn((2, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    expected = (noise / scheduler.alphas_cumprod[first].sqrt()).clamp(-1, 1)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_step_index_models_are_driven_by_their_schedule_index(tiny_denoiser):
    timesteps = tuple(schedule_timesteps(DDPM_CONFIG, 4))
    signature = DeployedSignature(SHAPE, 6, 8, TimeInput.STEP_INDEX, timesteps, "ddim, 4 steps")
    cond, null = _conditions(2)
    seen = []

    def by_index(feeds):
        assert "timestep" not in feeds and feeds["step_index"].dtype == torch.int64
        seen.append(feeds["step_index"].tolist())
        index = feeds["step_index"]
        return tiny_denoiser({**feeds, "timestep": torch.tensor(timesteps)[index].float()})

    indexed = _run(by_index, cond, null, signature=signature)
    assert seen == [[step] * 4 for step in range(4)]
    assert torch.equal(indexed, _run(tiny_denoiser, cond, null))  # the same model by timestep: identical images
    with pytest.raises(UserError, match="takes a step index into ddim, 4 steps"):
        _run(by_index, cond, null, steps=5, signature=signature)


def test_psnr():
    a = torch.rand(2, 1, 4, 4) * 2 - 1
    assert psnr(a, a.clone()) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(10 * math.log10(4.0 / 0.01), rel=1e-6)
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(a, a[:1])
