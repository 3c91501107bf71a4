"""The diffusers drop-in on UNets with added conditions: SDXL's ``added_cond_kwargs`` (text_embeds, time_ids) and
class-conditional ``class_labels`` are fed to the deployed graph by name, exactly as the signature's feeds; a missing
one is a clear error, and what the graph has no input for is still refused."""

from __future__ import annotations

import pytest
import torch
from tinymodels import TINY_FAMILIES, tiny_family_recipe

from lowbit_deploy.errors import UserError
from lowbit_deploy.runtime import DeployedUNet2D, open_runner
from lowbit_deploy.validate.sampling import unet_runner


@pytest.fixture(scope="module", params=sorted(TINY_FAMILIES))
def family_run(request, tmp_path_factory):
    """A tiny ``family`` UNet quantized (no QAT steps) and exported with cached time embeddings (~10 s)."""
    from lowbit_deploy.export.onnx_export import export_run
    from lowbit_deploy.qat.trainer import train
    from lowbit_deploy.recipes import parse_recipe

    root = tmp_path_factory.mktemp(f"dropin-{request.param}")
    make, _ = TINY_FAMILIES[request.param]
    make().save_pretrained(root / "model" / "unet")
    data = tiny_family_recipe(cached=True)
    data["train"]["steps"] = 0
    data["quantize"]["scale_init_iterations"] = 1
    train(parse_recipe(data), root / "run", model_path=str(root / "model"), progress=False)
    export_run(root / "run")
    return request.param, root / "run"


def _call_arguments(signature, batch: int = 2):
    """A diffusers call's arguments: timestep values of the cached schedule and the added conditions by keyword."""
    feeds = signature.random_feeds(batch, torch.Generator().manual_seed(0),
                                   torch.randn(batch, signature.seq_len, signature.cross_attention_dim))
    timesteps = torch.tensor(signature.step_timesteps)[feeds["step_index"]]
    keywords = {}
    if "class_labels" in feeds:
        keywords["class_labels"] = feeds["class_labels"]
    if "text_embeds" in feeds:
        keywords["added_cond_kwargs"] = {"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]}
    return feeds, timesteps, keywords


def test_the_drop_in_feeds_added_conditions_by_name(family_run):
    family, run = family_run
    unet = DeployedUNet2D(run / "model.onnx", threads=1)
    feeds, timesteps, keywords = _call_arguments(unet.signature)
    output = unet(feeds["sample"], timesteps, feeds["encoder_hidden_states"], **keywords).sample
    assert torch.equal(output, unet.runner(feeds))  # the same graph on the same inputs, looked up by name
    reference = open_runner(run / "checkpoint" / "quantized_unet.safetensors")
    torch.testing.assert_close(output, reference(feeds), rtol=1e-4, atol=1e-5)  # ~120 dB: float32 op order only
    config = unet.config
    assert config.addition_embed_type == ("text_time" if family == "sdxl" else None)
    assert config.num_class_embeds == (5 if family == "class" else None)
    # The project's sampler drives the drop-in like a diffusers UNet: added conditions pass through unet_runner.
    drop_in_feeds = {**feeds, "timestep": timesteps.float()}
    assert torch.equal(unet_runner(unet)(drop_in_feeds), output)


def test_a_missing_added_condition_names_the_keyword_to_pass(family_run):
    family, run = family_run
    unet = DeployedUNet2D(run / "model.onnx", threads=1)
    feeds, timesteps, keywords = _call_arguments(unet.signature)
    if family == "sdxl":
        keywords["added_cond_kwargs"].pop("time_ids")
        expected = r"takes time_ids .*pass it as added_cond_kwargs\['time_ids'\]"
    else:
        keywords.pop("class_labels")
        expected = r"takes class_labels .*pass it as class_labels"
    with pytest.raises(UserError, match=expected):
        unet(feeds["sample"], timesteps, feeds["encoder_hidden_states"], **keywords)


def test_what_the_graph_has_no_input_for_is_still_refused(family_run):
    family, run = family_run
    unet = DeployedUNet2D(run / "model.onnx", threads=1)
    feeds, timesteps, keywords = _call_arguments(unet.signature)
    extra = {"image_embeds": torch.zeros(2, 4)} if family == "sdxl" else {"text_embeds": torch.zeros(2, 8)}
    keywords["added_cond_kwargs"] = {**keywords.get("added_cond_kwargs", {}), **extra}
    with pytest.raises(UserError, match="no input for added_cond_kwargs"):
        unet(feeds["sample"], timesteps, feeds["encoder_hidden_states"], **keywords)
