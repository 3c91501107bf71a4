"""Conditions (cross-attention states) for a UNet: prompts for the embedded default, seeded noise for the rest.

The default model has no text encoder to ship; its prompts go through ``PromptEncoder``, a learned token table over
a fixed word vocabulary trained jointly with the UNet. The empty prompt is the unconditional (CFG / dropped) state.
"""

from __future__ import annotations

import abc
import os
import re
from typing import Sequence

import torch
from torch import nn

from ..errors import UserError
from ..io import load_small_module, save_small_module

PAD_TOKEN = "<pad>"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_VOCABULARY = (PAD_TOKEN, "a", "an", "the", "handwritten", "digit", "number", "of", "picture", "image",
                      *DIGIT_WORDS)
PROMPT_TEMPLATE = "a handwritten digit {word}"
# Foreign checkpoints are SD-like: CLIP text states are 77 tokens long.
FOREIGN_SEQ_LEN = 77
_NULL_SEED = 0


def digit_prompt(label: int) -> str:
    if not 0 <= int(label) < len(DIGIT_WORDS):
        raise UserError(f"digit label {label} is out of range; labels are 0..{len(DIGIT_WORDS) - 1}")
    return PROMPT_TEMPLATE.format(word=DIGIT_WORDS[int(label)])


class PromptEncoder(nn.Module):
    """Word-level token table + learned positions + LayerNorm -> ``[B, seq_len, dim]``; pads fill short prompts."""

    def __init__(self, vocabulary: Sequence[str] = DEFAULT_VOCABULARY, seq_len: int = 8, dim: int = 64):
        super().__init__()
        if not vocabulary or vocabulary[0] != PAD_TOKEN:
            raise ValueError(f"the vocabulary must start with {PAD_TOKEN!r}")
        self.vocabulary = tuple(vocabulary)
        self.seq_len = seq_len
        self.dim = dim
        self._token_ids = {word: index for index, word in enumerate(self.vocabulary)}
        self.token_embedding = nn.Embedding(len(self.vocabulary), dim)
        self.position_embedding = nn.Parameter(torch.zeros(seq_len, dim))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.position_embedding, std=0.1)

    @property
    def config(self) -> dict:
        return {"vocabulary": list(self.vocabulary), "seq_len": self.seq_len, "dim": self.dim}

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            words = re.findall(r"[a-z]+|[^\sa-z]", prompt.lower())
            unknown = sorted({word for word in words if word not in self._token_ids or word == PAD_TOKEN})
            if unknown:
                known = ", ".join(self.vocabulary[1:])
                raise UserError(f"prompt {prompt!r} has words outside the default model's vocabulary: "
                                f"{', '.join(unknown)}; use only: {known} (e.g. {digit_prompt(7)!r})")
            if len(words) > self.seq_len:
                raise UserError(f"prompt {prompt!r} has {len(words)} words; the default model takes at most "
                                f"{self.seq_len}")
            ids = [self._token_ids[word] for word in words]
            rows.append(ids + [0] * (self.seq_len - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.seq_len)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.token_embedding(token_ids) + self.position_embedding)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self(self.tokenize(prompts))

    def save(self, path: str | os.PathLike) -> None:
        save_small_module(path, self.config, self)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptEncoder":
        config, state = load_small_module(path, "prompt encoder", "regenerate the default model with "
                                          "`python scripts/train_default_model.py`")
        encoder = cls(**config)
        encoder.load_state_dict(state, strict=True)
        return encoder.eval().requires_grad_(False)


class ConditionSource(abc.ABC):
    """Where a UNet's ``encoder_hidden_states`` come from: ``[B, seq_len, dim]`` float32 tensors."""

    seq_len: int
    dim: int
    num_classes: int | None

    @abc.abstractmethod
    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Random conditions and, for class-conditional models, the labels they encode (else None)."""

    @abc.abstractmethod
    def for_labels(self, labels: Sequence[int]) -> torch.Tensor:
        """The conditions that ask for the given class labels."""

    @abc.abstractmethod
    def null(self, batch: int) -> torch.Tensor:
        """The unconditional state (empty prompt), repeated ``batch`` times."""

    @abc.abstractmethod
    def prompt(self, label: int) -> str:
        """The text prompt of a class label."""


class PromptConditionSource(ConditionSource):
    """Digit prompts through the default model's jointly trained ``PromptEncoder``."""

    def __init__(self, encoder: PromptEncoder):
        self.encoder = encoder.eval().requires_grad_(False)
        self.seq_len = encoder.seq_len
        self.dim = encoder.dim
        self.num_classes = len(DIGIT_WORDS)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encoder.encode(list(prompts))

    def prompt(self, label: int) -> str:
        return digit_prompt(label)

    def for_labels(self, labels: Sequence[int]) -> torch.Tensor:
        return self.encode([self.prompt(int(label)) for label in labels])

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        labels = torch.randint(0, self.num_classes, (batch,), generator=generator)
        return self.for_labels(labels.tolist()), labels

    def null(self, batch: int) -> torch.Tensor:
        return self.encode([""]).expand(batch, -1, -1).contiguous()


class RandomConditionSource(ConditionSource):
    """For foreign checkpoints (no text encoder here): seeded N(0, 1) states in the UNet's cross-attention shape."""

    def __init__(self, dim: int, seq_len: int = FOREIGN_SEQ_LEN):
        self.seq_len = seq_len
        self.dim = dim
        self.num_classes = None
        # A fixed draw stands in for the empty-prompt embedding, so CFG and dropped conditions are reproducible.
        self._null = torch.randn((1, seq_len, dim), generator=torch.Generator().manual_seed(_NULL_SEED))

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.randn((batch, self.seq_len, self.dim), generator=generator), None

    def for_labels(self, labels: Sequence[int]) -> torch.Tensor:
        raise UserError("class labels only exist for the embedded default model; this checkpoint has no class "
                        "prompts (use random conditions, e.g. `data: gaussian`, or the default model)")

    def null(self, batch: int) -> torch.Tensor:
        return self._null.expand(batch, -1, -1).clone()

    def prompt(self, label: int) -> str:
        raise UserError("prompts need the embedded default model's prompt encoder; foreign checkpoints here "
                        "are driven by random conditions")
