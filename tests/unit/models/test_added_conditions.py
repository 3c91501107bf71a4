"""Added conditions from the condition source (models/conditioning.py): SDXL text_embeds / time_ids and class labels,
their null values, the Conditions bundle, and the defaults a ConditionSource subclass inherits."""

from __future__ import annotations

import pytest
import torch
from tinymodels import TINY_SDXL_TEXT_DIM, make_tiny_class_unet, make_tiny_sdxl_unet

from lowbit_deploy.errors import UserError
from lowbit_deploy.models import ModelBundle, load_model
from lowbit_deploy.models.conditioning import ConditionSource, Conditions, RandomConditionSource, as_conditions
from lowbit_deploy.signature import added_conditions_for, signature_for


class _OnlyTheAbstractMethods(ConditionSource):
    """A source written against the four abstract methods only (as a text-encoder source is)."""

    seq_len, dim, num_classes = 3, 16, None

    def sample(self, batch, generator):
        return torch.randn(batch, self.seq_len, self.dim, generator=generator), None

    def for_labels(self, labels):
        return torch.ones(len(labels), self.seq_len, self.dim)

    def null(self, batch):
        return torch.zeros(batch, self.seq_len, self.dim)

    def prompt(self, label):
        return str(label)


def _source(unet, source=None):
    source = source or RandomConditionSource(dim=16, seq_len=4)
    source.use_added_conditions(added_conditions_for(unet.config), (unet.config.in_channels, 8, 8))
    return source


def test_sdxl_draws_normal_text_embeds_and_the_usual_time_ids_with_zero_text_for_the_null():
    source = _source(make_tiny_sdxl_unet())
    conditions = source.sample_conditions(512, torch.Generator().manual_seed(0))
    text, time_ids = conditions.added["text_embeds"], conditions.added["time_ids"]
    assert text.shape == (512, TINY_SDXL_TEXT_DIM) and abs(float(text.mean())) < 0.05
    assert float(text.std()) == pytest.approx(1.0, abs=0.05)
    # original size = target size = 8x8 latents x 8 = 64 pixels, no crop
    assert time_ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 512
    null = source.null_conditions(3)
    assert torch.equal(null.added["text_embeds"], torch.zeros(3, TINY_SDXL_TEXT_DIM))
    assert torch.equal(null.added["time_ids"], time_ids[:3])


def test_class_labels_cover_every_class_and_the_null_is_the_last():
    source = _source(make_tiny_class_unet(num_classes=5))
    labels = source.sample_conditions(400, torch.Generator().manual_seed(0)).added["class_labels"]
    assert labels.dtype == torch.int64 and torch.bincount(labels).min() > 50  # uniform over 0..4
    assert source.null_conditions(3).added["class_labels"].tolist() == [4, 4, 4]


def test_a_source_without_added_conditions_draws_exactly_what_it_drew_before():
    source = RandomConditionSource(dim=16, seq_len=4)
    drawn = source.sample_conditions(2, torch.Generator().manual_seed(5))
    states, _ = source.sample(2, torch.Generator().manual_seed(5))
    assert drawn.added == {} and torch.equal(drawn.encoder_hidden_states, states)
    assert drawn.unet_keywords().keys() == {"encoder_hidden_states"}


def test_subclasses_with_only_the_abstract_methods_get_the_added_conditions():
    source = _source(make_tiny_sdxl_unet(), _OnlyTheAbstractMethods())
    conditions = source.sample_conditions(2, torch.Generator().manual_seed(0))
    assert conditions.added.keys() == {"text_embeds", "time_ids"}
    assert source.label_conditions([1, 2]).encoder_hidden_states.shape == (2, 3, 16)
    assert source.null_conditions(2).added["text_embeds"].abs().sum() == 0


def test_conditions_bundle_replaces_concatenates_and_expands_row_by_row():
    cond = Conditions(torch.ones(3, 2, 4), {"class_labels": torch.tensor([0, 1, 2]),
                                            "text_embeds": torch.ones(3, 8)})
    null = Conditions(torch.zeros(3, 2, 4), {"class_labels": torch.tensor([9, 9, 9]),
                                             "text_embeds": torch.zeros(3, 8)})
    mixed = cond.replace_rows(torch.tensor([True, False, True]), null)
    assert mixed.added["class_labels"].tolist() == [9, 1, 9]
    assert mixed.encoder_hidden_states[:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    assert mixed.added["text_embeds"][:, 0].tolist() == [0.0, 1.0, 0.0]
    both = cond.cat(Conditions(null.encoder_hidden_states[:1], {k: v[:1] for k, v in null.added.items()}).expand(3))
    assert both.batch == 6 and both.added["class_labels"].tolist() == [0, 1, 2, 9, 9, 9]
    keywords = both.unet_keywords()
    assert keywords["class_labels"] is both.added["class_labels"]
    assert keywords["added_cond_kwargs"] == {"text_embeds": both.added["text_embeds"]}
    with pytest.raises(ValueError, match="batch 3"):
        cond.expand(4)
    assert as_conditions(cond) is cond and as_conditions(torch.zeros(1, 2, 4)).added == {}


@pytest.mark.parametrize("make", [make_tiny_sdxl_unet, make_tiny_class_unet], ids=["sdxl", "class"])
def test_loaded_checkpoints_condition_with_their_unets_added_inputs(make, tmp_path):
    make().save_pretrained(tmp_path / "model" / "unet")
    bundle = load_model(tmp_path / "model")
    names = [spec.name for spec in signature_for(bundle.unet, 4).added_conditions]
    assert [spec.name for spec in bundle.condition.added_specs] == names
    assert list(bundle.condition.sample_conditions(2, torch.Generator()).added) == names


def test_a_bundle_refuses_an_unsupported_unet_as_soon_as_it_is_made():
    unet = make_tiny_class_unet()
    unet.register_to_config(time_cond_proj_dim=32)
    with pytest.raises(UserError, match="time_cond_proj_dim=32.*guidance-scale embedding"):
        ModelBundle(unet, "here", RandomConditionSource(dim=16), None, {})


def test_a_folder_with_an_unsupported_unet_is_refused_before_its_weights_are_read(tmp_path):
    import json

    make_tiny_class_unet().save_pretrained(tmp_path / "model" / "unet")
    config_path = tmp_path / "model" / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "addition_embed_type": "image"}))
    for weights in (tmp_path / "model" / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not read")  # a corrupt file would be the error if the weights were opened first
    with pytest.raises(UserError, match="addition_embed_type='image'"):
        load_model(tmp_path / "model")
