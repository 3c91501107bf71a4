"""The default model's prompt encoder and condition source."""

from __future__ import annotations

import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.models.conditioning import PromptEncoder, digit_prompt


def test_prompt_text():
    assert digit_prompt(7) == "a handwritten digit seven"
    with pytest.raises(UserError, match="out of range"):
        digit_prompt(10)


def test_known_prompt_is_deterministic(default_bundle):
    condition = default_bundle.condition
    first = condition.encode(["a handwritten digit seven", "A handwritten digit TWO"])
    second = condition.encode(["a handwritten digit seven", "a handwritten digit two"])
    assert first.shape == (2, condition.seq_len, condition.dim) == (2, 8, 64)
    assert torch.equal(first, second)
    assert torch.equal(condition.for_labels([7, 2]), first)
    assert not torch.equal(first[0], first[1])
    assert condition.prompt(7) == "a handwritten digit seven"


def test_unknown_word_lists_the_vocabulary(default_bundle):
    with pytest.raises(UserError, match="outside the default model's vocabulary: cat.*use only: .*seven"):
        default_bundle.condition.encode(["a handwritten cat"])
    with pytest.raises(UserError, match="at most 8"):
        default_bundle.condition.encode(["a a a a a a a a a"])


def test_null_is_the_empty_prompt(default_bundle):
    condition = default_bundle.condition
    null = condition.null(3)
    assert null.shape == (3, 8, 64)
    assert torch.equal(null[2], condition.encode([""])[0])
    assert not torch.equal(null[0], condition.for_labels([0])[0])


def test_sample_draws_labels_and_their_prompts(default_bundle):
    condition = default_bundle.condition
    states, labels = condition.sample(16, torch.Generator().manual_seed(3))
    again, labels_again = condition.sample(16, torch.Generator().manual_seed(3))
    assert labels.dtype == torch.long and 0 <= int(labels.min()) and int(labels.max()) < 10
    assert torch.equal(labels, labels_again) and torch.equal(states, again)
    assert torch.equal(states, condition.for_labels(labels.tolist()))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    encoder = PromptEncoder(seq_len=6, dim=16)
    encoder.save(tmp_path / "enc")
    loaded = PromptEncoder.load(tmp_path / "enc")
    prompts = ["a handwritten digit four", ""]
    with torch.no_grad():
        assert torch.equal(encoder.encode(prompts), loaded.encode(prompts))
    assert loaded.config == encoder.config


def test_missing_prompt_encoder_files(tmp_path):
    with pytest.raises(UserError, match="train_default_model.py"):
        PromptEncoder.load(tmp_path)
