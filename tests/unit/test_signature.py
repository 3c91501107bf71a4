"""The deployed signature: the one spelling of the deployed graph's inputs."""

import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.signature import DeployedSignature, TimeInput, signature_for

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


def test_unets_with_added_conditions_are_refused_clearly(tiny_unet):
    tiny_unet.register_to_config(class_embed_type="timestep")
    with pytest.raises(UserError, match="added conditions.*class_embed_type='timestep'"):
        signature_for(tiny_unet, 8)
