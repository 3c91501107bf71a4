"""The deployed signature: the one spelling of the deployed graph's inputs."""

import json
import re

import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.signature import DeployedSignature, TensorSpec, TimeInput, signature_for, unet_keywords

TIMESTEP = DeployedSignature((4, 8, 8), seq_len=77, cross_attention_dim=32)
STEP_INDEX = DeployedSignature((4, 8, 8), 77, 32, TimeInput.STEP_INDEX, (900, 600, 300, 0), "ddim, 4 steps")


@pytest.mark.parametrize("signature", [TIMESTEP, STEP_INDEX])
def test_round_trip(signature):
    assert DeployedSignature.from_json(signature.to_json()) == signature


def test_inputs_and_profiles():
    assert TIMESTEP.input_names == ("sample", "timestep", "encoder_hidden_states")
    assert STEP_INDEX.input_names == ("sample", "step_index", "encoder_hidden_states")
    assert STEP_INDEX.time_spec.dtype == "int64" and TIMESTEP.time_spec.dtype == "float32"
    assert STEP_INDEX.shape_ranges((1, 2, 8)) == {
        "sample": ((1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 8, 8)),
        "step_index": ((1,), (2,), (8,)),
        "encoder_hidden_states": ((1, 77, 32), (2, 77, 32), (8, 77, 32)),
    }
    assert STEP_INDEX.dynamic_axes()["encoder_hidden_states"] == {0: "batch", 1: "tokens"}
    assert STEP_INDEX.dynamic_axes()["noise_pred"] == {0: "batch"}


def test_feeds_are_typed_and_checked():
    feeds = STEP_INDEX.feeds(torch.zeros(2, 4, 8, 8), torch.tensor([0, 3]), torch.zeros(2, 77, 32))
    assert list(feeds) == list(STEP_INDEX.input_names) and feeds["step_index"].dtype == torch.int64
    with pytest.raises(UserError, match=r"out of range.*indexes run 0\.\.3"):
        STEP_INDEX.feeds(torch.zeros(2, 4, 8, 8), torch.tensor([0, 4]), torch.zeros(2, 77, 32))
    with pytest.raises(UserError, match="has shape"):
        TIMESTEP.feeds(torch.zeros(2, 4, 8, 8), torch.zeros(3), torch.zeros(2, 77, 32))
    with pytest.raises(UserError, match="unknown input"):
        TIMESTEP.check_feeds({"sample": torch.zeros(1, 4, 8, 8), "step_index": torch.zeros(1)})


def test_time_feed_by_index_or_value():
    assert STEP_INDEX.time_feed(torch.tensor(600), 1, 3).tolist() == [1, 1, 1]
    assert TIMESTEP.time_feed(torch.tensor(600), 1, 2).tolist() == [600.0, 600.0]


def test_inconsistent_signatures_are_refused():
    with pytest.raises(ValueError, match="step_timesteps"):
        DeployedSignature((4, 8, 8), 77, 32, TimeInput.STEP_INDEX)
    with pytest.raises(UserError, match="version"):
        DeployedSignature.from_dict({**TIMESTEP.to_dict(), "version": 99})


SDXL_ADDED = (TensorSpec("text_embeds", "float32", ("batch", 8), "pooled"),
              TensorSpec("time_ids", "float32", ("batch", 6), "micro-conditioning"))
CLASS_ADDED = (TensorSpec("class_labels", "int64", ("batch",), "class index", high=5),)
SDXL = DeployedSignature((4, 8, 8), 77, 32, added_conditions=SDXL_ADDED)
CLASS_STEP_INDEX = DeployedSignature((1, 8, 8), 4, 16, TimeInput.STEP_INDEX, (900, 600, 300, 0), "ddim, 4 steps",
                                     CLASS_ADDED)


@pytest.mark.parametrize("config, key", [
    ({"class_embed_type": "timestep", "num_class_embeds": None}, "class_embed_type='timestep'"),
    ({"time_cond_proj_dim": 256}, "time_cond_proj_dim=256"),
    ({"addition_embed_type": "text"}, "addition_embed_type='text'"),
    ({"addition_embed_type": "image"}, "addition_embed_type='image'"),
    ({"encoder_hid_dim_type": "image_proj", "encoder_hid_dim": 16}, "encoder_hid_dim_type='image_proj'"),
    ({"class_embed_type": "learned"}, "class_embed_type='learned'"),
    ({"out_channels": 2}, "out_channels=2"),  # learned variance: the output is not the sample's shape
    ({"class_embed_type": "projection", "projection_class_embeddings_input_dim": None},
     "class_embed_type='projection'"),
    # text_time without room for 6 time ids of addition_time_embed_dim features
    ({"addition_embed_type": "text_time", "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 24},
     "addition_embed_type='text_time'"),
])
def test_unsupported_extra_inputs_are_refused_naming_the_key_and_what_is_supported(tiny_unet, config, key):
    tiny_unet.register_to_config(**config)
    with pytest.raises(UserError, match=re.escape(key) + ".*text_time.*num_class_embeds"):
        signature_for(tiny_unet, 8)


def test_sdxl_unets_take_text_embeds_and_time_ids():
    from tinymodels import TINY_SDXL_TEXT_DIM, make_tiny_sdxl_unet

    signature = signature_for(make_tiny_sdxl_unet(), 4)
    assert signature.input_names == ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
    text, time_ids = signature.added_conditions
    assert (text.dtype, text.shape) == ("float32", ("batch", TINY_SDXL_TEXT_DIM))
    assert (time_ids.dtype, time_ids.shape) == ("float32", ("batch", 6))
    assert signature.shape_ranges((1, 2, 4))["text_embeds"] == ((1, TINY_SDXL_TEXT_DIM), (2, TINY_SDXL_TEXT_DIM),
                                                                (4, TINY_SDXL_TEXT_DIM))
    assert signature.dynamic_axes()["time_ids"] == {0: "batch"}


@pytest.mark.parametrize("config, dtype, shape", [
    ({"num_class_embeds": 5}, "int64", ("batch",)),
    ({"class_embed_type": "projection", "projection_class_embeddings_input_dim": 12}, "float32", ("batch", 12)),
    ({"class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 12}, "float32",
     ("batch", 12)),
    ({"class_embed_type": "identity"}, "float32", ("batch", 32)),  # the time embedding's width (4 x 8 channels)
])
def test_class_conditional_unets_take_class_labels(tiny_unet, config, dtype, shape):
    tiny_unet.register_to_config(**config)
    (spec,) = signature_for(tiny_unet, 4).added_conditions
    assert (spec.name, spec.dtype, spec.shape) == ("class_labels", dtype, shape)
    assert spec.high == config.get("num_class_embeds")


@pytest.mark.parametrize("signature", [SDXL, CLASS_STEP_INDEX])
def test_signatures_with_added_conditions_round_trip_as_version_2(signature):
    data = json.loads(signature.to_json())
    assert data["version"] == 2 and data["inputs"] == list(signature.input_names)
    assert DeployedSignature.from_json(signature.to_json()) == signature


def test_version_1_signatures_still_read_and_plain_ones_are_still_written_as_version_1():
    assert TIMESTEP.to_dict()["version"] == 1
    old = {"version": 1, "sample_shape": [4, 8, 8], "seq_len": 77, "cross_attention_dim": 32,
           "time_input": "timestep", "step_timesteps": [], "schedule": "", "added_conditions": [],
           "inputs": ["sample", "timestep", "encoder_hidden_states"], "outputs": ["noise_pred"]}
    assert DeployedSignature.from_dict(old) == TIMESTEP
    without_key = {key: value for key, value in old.items() if key != "added_conditions"}
    assert DeployedSignature.from_dict(without_key) == TIMESTEP


def test_random_feeds_draw_the_added_conditions_the_caller_does_not_give():
    generator = torch.Generator().manual_seed(0)
    feeds = CLASS_STEP_INDEX.random_feeds(64, generator, torch.zeros(64, 4, 16))
    labels = feeds["class_labels"]
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(5))
    sdxl = SDXL.random_feeds(2, torch.Generator().manual_seed(0), torch.zeros(2, 77, 32))
    assert sdxl["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2  # 8x8 latents = 64x64 pixels
    assert sdxl["text_embeds"].shape == (2, 8) and sdxl["text_embeds"].std() > 0.5
    # Models without added conditions draw exactly what they drew before (same sample and time).
    plain = TIMESTEP.random_feeds(2, torch.Generator().manual_seed(0), torch.zeros(2, 77, 32))
    assert torch.equal(plain["sample"], sdxl["sample"]) and torch.equal(plain["timestep"], sdxl["timestep"])


def test_feeds_check_the_added_conditions():
    sample, states = torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 32)
    feeds = SDXL.feeds(sample, torch.zeros(2), states, text_embeds=torch.zeros(2, 8), time_ids=torch.zeros(2, 6))
    assert list(feeds) == list(SDXL.input_names)
    with pytest.raises(UserError, match="'text_embeds' is missing"):
        SDXL.feeds(sample, torch.zeros(2), states, time_ids=torch.zeros(2, 6))
    with pytest.raises(UserError, match=r"'time_ids' has shape \(2, 5\).*\['batch', 6\]"):
        SDXL.feeds(sample, torch.zeros(2), states, text_embeds=torch.zeros(2, 8), time_ids=torch.zeros(2, 5))
    with pytest.raises(UserError, match=r"class_labels \[0, 5\] is out of range.*5 classes \(0\.\.4\)"):
        CLASS_STEP_INDEX.feeds(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]), torch.zeros(2, 4, 16),
                               class_labels=torch.tensor([0, 5]))


def test_unet_keywords_spell_the_diffusers_call():
    text, ids, labels = torch.zeros(1, 8), torch.zeros(1, 6), torch.zeros(1, dtype=torch.int64)
    keywords = unet_keywords({"text_embeds": text, "time_ids": ids, "class_labels": labels})
    assert keywords.keys() == {"added_cond_kwargs", "class_labels"} and keywords["class_labels"] is labels
    assert keywords["added_cond_kwargs"] == {"text_embeds": text, "time_ids": ids}
    assert unet_keywords({}) == {}


def test_encoder_hid_dim_text_projection_sets_the_states_width(tiny_unet):
    tiny_unet.register_to_config(encoder_hid_dim=24, encoder_hid_dim_type="text_proj")
    assert signature_for(tiny_unet, 4).cross_attention_dim == 24


def test_sdxl_base_config_gives_its_pooled_width_and_1024_pixel_time_ids():
    """The keys of stabilityai/stable-diffusion-xl-base-1.0's unet/config.json that decide the added inputs."""
    from lowbit_deploy.models.conditioning import draw_added
    from lowbit_deploy.signature import added_conditions_for

    config = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
              "projection_class_embeddings_input_dim": 2816, "class_embed_type": None, "num_class_embeds": None,
              "time_cond_proj_dim": None, "encoder_hid_dim_type": None, "cross_attention_dim": 2048,
              "block_out_channels": [320, 640, 1280]}
    text, time_ids = added_conditions_for(config)
    assert text.shape == ("batch", 1280) and time_ids.shape == ("batch", 6)  # CLIP ViT-bigG's pooled width
    drawn = draw_added((time_ids,), 1, torch.Generator(), (4, 128, 128))
    assert drawn["time_ids"].tolist() == [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]
