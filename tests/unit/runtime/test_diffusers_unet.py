"""The diffusers drop-in on the default model: a diffusers scheduler loop and the project's sampler over
``DeployedUNet2D(model.onnx)`` give the images of the PyTorch deployed model; arguments it cannot honour are refused.

The reference never goes through the drop-in: it is the project's sampler feeding the PyTorch deployed model the
signature's own time input (step indexes for the cached run), so a wrong timestep -> index lookup shows up as a PSNR
drop. Measured on the 2-core dev CPU: 121.7 dB (cached run, 3 DDIM steps), ORT vs torch outputs ~131 dB SQNR. One-code
mutations measured on the cached run: guidance 3.0 -> 3.1 gives 47 dB, index + 1 gives 6.5 dB, no guidance 18 dB.
"""

from __future__ import annotations

import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.runtime import DeployedUNet2D, open_runner
from lowbit_deploy.runtime.diffusers_unet import REFUSED_ARGUMENTS, time_input_for
from lowbit_deploy.signature import TimeInput
from lowbit_deploy.validate.sampling import psnr, sample, unet_runner

MIN_PSNR_DB = 100.0   # measured ~120 dB; fp32 reordering noise stays far above it, a changed step far below
GUIDANCE = 3.0
SEED = 7
TIMESTEP_RUN_STEPS = 4
LABELS = [0, 3, 7, 9]
CACHED_STEPS = 3       # the schedule of conftest's cached run


def _num_steps(signature) -> int:
    return signature.num_steps if signature.time_input is TimeInput.STEP_INDEX else TIMESTEP_RUN_STEPS


@pytest.fixture(scope="module")
def drop_ins(cached_run, timestep_run):
    """One drop-in per run (an ONNX Runtime session takes a second or two to create)."""
    return {"cached": DeployedUNet2D(cached_run / "model.onnx", threads=1),
            "timestep": DeployedUNet2D(timestep_run / "model.onnx", threads=1)}


@pytest.fixture(scope="module")
def reference_images(cached_run, timestep_run, default_bundle):
    """The project's sampler over the PyTorch deployed model, fed the signature's own time input (step indexes for
    the cached run): the drop-in's timestep lookup is not on this path."""
    cond, null = default_bundle.condition.for_labels(LABELS), default_bundle.condition.null(len(LABELS))
    images = {}
    for kind, run in (("cached", cached_run), ("timestep", timestep_run)):
        reference = open_runner(run / "checkpoint" / "quantized_unet.safetensors")
        images[kind] = sample(reference, reference.signature, cond, null,
                              scheduler_config=default_bundle.scheduler_config,
                              num_steps=_num_steps(reference.signature), guidance_scale=GUIDANCE, seed=SEED)
    return images


def _diffusers_loop(unet, bundle, num_steps: int) -> torch.Tensor:
    """What a user writes: a diffusers DDIM loop with classifier-free guidance (same noise as the sampler's)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(bundle.scheduler_config)
    scheduler.set_timesteps(num_steps)
    cond, null = bundle.condition.for_labels(LABELS), bundle.condition.null(len(LABELS))
    states = torch.cat([cond, null])
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn((len(LABELS), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size),
                          generator=generator) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
        noise_cond, noise_null = unet(model_input, timestep, encoder_hidden_states=states).sample.chunk(2)
        noise = noise_null + GUIDANCE * (noise_cond - noise_null)
        latents = scheduler.step(noise, timestep, latents, eta=0.0).prev_sample
    return latents.clamp(-1.0, 1.0)


@pytest.mark.parametrize("kind", ["cached", "timestep"])
def test_diffusers_scheduler_loop_gives_the_pytorch_models_images(drop_ins, reference_images, default_bundle, kind):
    unet, reference = drop_ins[kind], reference_images[kind]
    assert unet.signature.time_input is (TimeInput.STEP_INDEX if kind == "cached" else TimeInput.TIMESTEP)
    images = _diffusers_loop(unet, default_bundle, _num_steps(unet.signature))
    assert float(reference.std()) > 0.1, "the reference images are flat: the comparison would prove nothing"
    value = psnr(images, reference)
    assert value >= MIN_PSNR_DB, f"drop-in vs PyTorch deployed: {value:.1f} dB < {MIN_PSNR_DB} dB"


@pytest.mark.parametrize("kind", ["cached", "timestep"])
def test_project_sampler_drives_the_drop_in(drop_ins, reference_images, default_bundle, kind):
    unet = drop_ins[kind]
    cond, null = default_bundle.condition.for_labels(LABELS), default_bundle.condition.null(len(LABELS))
    images = sample(unet_runner(unet), unet.timestep_signature, cond, null,
                    scheduler_config=default_bundle.scheduler_config, num_steps=_num_steps(unet.signature),
                    guidance_scale=GUIDANCE, seed=SEED)
    value = psnr(images, reference_images[kind])
    assert value >= MIN_PSNR_DB, f"sampler over the drop-in vs PyTorch deployed: {value:.1f} dB"


def test_config_is_derived_from_the_signature(drop_ins, default_bundle):
    unet = drop_ins["cached"]
    expected = default_bundle.unet.config
    assert unet.config.in_channels == unet.in_channels == expected.in_channels
    assert unet.config.out_channels == expected.out_channels
    assert unet.config.sample_size == expected.sample_size
    assert unet.config.cross_attention_dim == expected.cross_attention_dim
    assert unet.config.step_timesteps == list(unet.signature.step_timesteps) and len(unet.config.step_timesteps) == 3
    assert unet.dtype == torch.float32 and unet.device == torch.device("cpu")


def test_step_index_lookup_is_exact(drop_ins):
    signature = drop_ins["cached"].signature
    timesteps = list(signature.step_timesteps)
    assert len(timesteps) == CACHED_STEPS
    looked_up = time_input_for(signature, torch.tensor(timesteps[::-1], dtype=torch.float32), CACHED_STEPS)
    assert looked_up.dtype == torch.int64
    assert looked_up.tolist() == list(range(CACHED_STEPS))[::-1]
    assert time_input_for(signature, timesteps[1], 2).tolist() == [1, 1]


def test_timestep_forms_broadcast_to_the_batch(drop_ins):
    unet = drop_ins["timestep"]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *unet.signature.sample_shape, generator=generator)
    states = torch.randn(2, unet.signature.seq_len, unet.signature.cross_attention_dim, generator=generator)
    expected = unet(latents, torch.tensor([500.0, 500.0]), states).sample
    for timestep in (500, 500.0, torch.tensor(500), torch.tensor([500])):
        assert torch.equal(unet(latents, timestep, states).sample, expected), timestep
    per_sample = unet(latents, torch.tensor([900, 100]), states).sample
    assert torch.equal(per_sample[1:], unet(latents[1:], 100, states[1:]).sample)
    assert not torch.equal(per_sample[1:], expected[1:])


def test_return_dict_false_and_dtype_follow_the_caller(drop_ins):
    unet = drop_ins["cached"]
    latents = torch.randn(1, *unet.signature.sample_shape, dtype=torch.float64)
    states = torch.randn(1, unet.signature.seq_len, unet.signature.cross_attention_dim)
    output = unet(latents, unet.signature.step_timesteps[0], states, return_dict=False)
    assert isinstance(output, tuple) and len(output) == 1 and output[0].dtype == torch.float64
    assert torch.equal(output[0], unet.forward(latents, unet.signature.step_timesteps[0], states).sample)


def test_drop_in_over_an_open_runner(cached_run):
    runner = open_runner(cached_run / "model.onnx", threads=1)
    unet = DeployedUNet2D(runner)
    assert unet.runner is runner
    with pytest.raises(UserError, match="apply to a file"):
        DeployedUNet2D(runner, threads=2)
    with pytest.raises(UserError, match="path to model.onnx"):
        DeployedUNet2D(42)


# ---- refusals ----------------------------------------------------------------------------------------------------
@pytest.fixture
def cached_unet(drop_ins):
    return drop_ins["cached"]


def _inputs(unet, batch: int = 2, states_batch: int | None = None):
    signature = unet.signature
    return (torch.zeros(batch, *signature.sample_shape),
            torch.zeros(states_batch or batch, signature.seq_len, signature.cross_attention_dim))


def test_timestep_off_the_cached_schedule_names_schedule_and_fix(cached_unet):
    latents, states = _inputs(cached_unet)
    off = cached_unet.signature.step_timesteps[0] - 1
    with pytest.raises(UserError) as error:
        cached_unet(latents, off, states)
    message = str(error.value)
    assert f"timestep(s) {off}" in message and f"ddim, {CACHED_STEPS} steps" in message
    assert f"set_timesteps({CACHED_STEPS})" in message
    assert str(list(cached_unet.signature.step_timesteps)) in message


def test_wrong_batch_of_states_is_refused(cached_unet):
    latents, states = _inputs(cached_unet, batch=2, states_batch=3)
    with pytest.raises(UserError, match="encoder_hidden_states.*batch 2"):
        cached_unet(latents, cached_unet.signature.step_timesteps[0], states)


def test_wrong_sample_shape_and_timestep_count_are_refused(cached_unet):
    latents, states = _inputs(cached_unet)
    timestep = cached_unet.signature.step_timesteps[0]
    with pytest.raises(UserError, match="sample has shape"):
        cached_unet(latents[:, :, :8], timestep, states)
    with pytest.raises(UserError, match="3 values for a batch of 2"):
        cached_unet(latents, torch.tensor([timestep] * 3), states)


@pytest.mark.parametrize("argument", sorted(REFUSED_ARGUMENTS))
def test_arguments_that_change_the_math_are_refused(cached_unet, argument):
    latents, states = _inputs(cached_unet)
    value = {"scale": 0.5} if argument.endswith("kwargs") else torch.ones(1)
    with pytest.raises(UserError, match=f"no input for {argument}"):
        cached_unet(latents, cached_unet.signature.step_timesteps[0], states, **{argument: value})


def test_unset_arguments_as_pipelines_pass_them_are_accepted(cached_unet):
    latents, states = _inputs(cached_unet)
    timestep = cached_unet.signature.step_timesteps[0]
    plain = cached_unet(latents, timestep, states).sample
    passed = cached_unet(latents, timestep, states, cross_attention_kwargs=None, added_cond_kwargs={},
                         down_block_additional_residuals=(), timestep_cond=None).sample
    assert torch.equal(plain, passed)
