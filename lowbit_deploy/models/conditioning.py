"""Conditions (cross-attention states) for a UNet: prompts for the embedded default, seeded noise for the rest.

The default model has no text encoder to ship; its prompts go through ``PromptEncoder``, a learned token table over
a fixed word vocabulary trained jointly with the UNet. The empty prompt is the unconditional (CFG / dropped) state.

UNets with added conditions (the deployed signature's ``added_conditions``: SDXL ``text_embeds`` / ``time_ids``,
``class_labels``) get them from the same source as one :class:`Conditions` bundle (``sample_conditions``,
``null_conditions``). Unless a source overrides ``draw_added`` / ``null_added`` they are drawn by :data:`ADDED_DRAWS`:

* ``text_embeds``: N(0, 1) (a pooled text embedding's scale); null: zeros (SDXL's ``force_zeros_for_empty_prompt``);
* ``time_ids``: SDXL's usual micro-conditioning, original size = target size = the latent size x 8 pixels, crop
  (0, 0); the same for the null (SDXL pipelines reuse them for the negative prompt);
* ``class_labels`` (class indexes): uniform over every class 0..N-1, so every row of the embedding table is seen;
  null: the last class, N-1. UNet2DConditionModel has no unconditional class of its own; class-conditional models
  trained with label dropout keep the "no class" embedding in the table's last row (DiT's convention), and that
  row is what guidance and dropped conditions use here;
* ``class_labels`` (class vectors, projection / identity embeddings): N(0, 1); null: zeros.
"""

from __future__ import annotations

import abc
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..io import load_small_module, save_small_module
from ..signature import BATCH_AXIS, LATENT_SCALE, TensorSpec, unet_keywords

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


# ---- added conditions -------------------------------------------------------------------------------------------
def _time_ids(spec: TensorSpec, batch: int, sample_shape: Sequence[int]) -> torch.Tensor:
    height, width = (LATENT_SCALE * int(size) for size in sample_shape[1:])
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(batch, -1).clone()


def _normal(spec: TensorSpec, batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(spec.concrete_shape({BATCH_AXIS: batch}), generator=generator)


def _zeros(spec: TensorSpec, batch: int) -> torch.Tensor:
    return torch.zeros(spec.concrete_shape({BATCH_AXIS: batch}))


def _class_labels(spec: TensorSpec, batch: int, generator: torch.Generator) -> torch.Tensor:
    if spec.high is None:
        return _normal(spec, batch, generator)
    return torch.randint(0, spec.high, (batch,), generator=generator)


def _null_class_labels(spec: TensorSpec, batch: int) -> torch.Tensor:
    return _zeros(spec, batch) if spec.high is None else torch.full((batch,), spec.high - 1, dtype=torch.int64)


@dataclass(frozen=True)
class AddedDraw:
    """How one added condition is drawn (seeded) and what its unconditional value is."""

    draw: Callable[[TensorSpec, int, torch.Generator, Sequence[int]], torch.Tensor]
    null: Callable[[TensorSpec, int, Sequence[int]], torch.Tensor]


# Registry: added-condition name -> its draw and null (see the module docstring for the choices).
ADDED_DRAWS: dict[str, AddedDraw] = {
    "text_embeds": AddedDraw(lambda spec, batch, generator, shape: _normal(spec, batch, generator),
                             lambda spec, batch, shape: _zeros(spec, batch)),
    "time_ids": AddedDraw(lambda spec, batch, generator, shape: _time_ids(spec, batch, shape),
                          lambda spec, batch, shape: _time_ids(spec, batch, shape)),
    "class_labels": AddedDraw(lambda spec, batch, generator, shape: _class_labels(spec, batch, generator),
                              lambda spec, batch, shape: _null_class_labels(spec, batch)),
}


def draw_added(specs: Sequence[TensorSpec], batch: int, generator: torch.Generator,
               sample_shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """Seeded values of ``specs`` (in order; nothing is drawn when there are none)."""
    return {spec.name: ADDED_DRAWS[spec.name].draw(spec, batch, generator, sample_shape) for spec in specs}


def null_added(specs: Sequence[TensorSpec], batch: int, sample_shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """The unconditional values of ``specs``."""
    return {spec.name: ADDED_DRAWS[spec.name].null(spec, batch, sample_shape) for spec in specs}


def _rows_like(mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (value.dim() - 1)))


@dataclass
class Conditions:
    """Everything a UNet is conditioned on besides sample and time: ``encoder_hidden_states`` and the added
    conditions by their deployed input names (empty for SD1.x/2.x-style UNets)."""

    encoder_hidden_states: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def unet_keywords(self) -> dict:
        """Keywords of diffusers' UNet call: ``unet(sample, t, **conditions.unet_keywords())``."""
        return {"encoder_hidden_states": self.encoder_hidden_states, **unet_keywords(self.added)}

    def replace_rows(self, mask: torch.Tensor, other: "Conditions") -> "Conditions":
        """Rows where ``mask`` (bool ``[batch]``) is set taken from ``other`` (e.g. the null conditions)."""
        states = torch.where(_rows_like(mask, self.encoder_hidden_states), other.encoder_hidden_states,
                             self.encoder_hidden_states)
        return Conditions(states, {name: torch.where(_rows_like(mask, value), other.added[name], value)
                                   for name, value in self.added.items()})

    def cat(self, other: "Conditions") -> "Conditions":
        """This batch followed by ``other``'s (conditional and unconditional halves of guidance)."""
        return Conditions(torch.cat([self.encoder_hidden_states, other.encoder_hidden_states.to(
            self.encoder_hidden_states.dtype)]), {name: torch.cat([value, other.added[name].to(value.dtype)])
                                                  for name, value in self.added.items()})

    def expand(self, batch: int) -> "Conditions":
        """A batch of 1 repeated ``batch`` times (a batch of ``batch`` as it is)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"conditions have batch {self.batch}; expected 1 or {batch}")
        return Conditions(self.encoder_hidden_states.expand(batch, *self.encoder_hidden_states.shape[1:]),
                          {name: value.expand(batch, *value.shape[1:]) for name, value in self.added.items()})

    def to(self, device) -> "Conditions":
        return Conditions(self.encoder_hidden_states.to(device),
                          {name: value.to(device) for name, value in self.added.items()})


def as_conditions(value: "Conditions | torch.Tensor", added: Mapping[str, torch.Tensor] | None = None) -> Conditions:
    """``value`` as a :class:`Conditions` (a bare ``encoder_hidden_states`` tensor carries no added conditions)."""
    if isinstance(value, Conditions):
        return value
    return Conditions(value, dict(added or {}))


class ConditionSource(abc.ABC):
    """Where a UNet's ``encoder_hidden_states`` come from: ``[B, seq_len, dim]`` float32 tensors, and, for UNets with
    added conditions, those too (:meth:`sample_conditions`, :meth:`null_conditions`).

    Subclasses implement the four abstract methods; the added conditions have working defaults (``ADDED_DRAWS``),
    which a source with real values for them (e.g. pooled text embeddings) overrides in ``draw_added`` /
    ``null_added``. ``ModelBundle`` tells the source its UNet's added conditions (:meth:`use_added_conditions`)."""

    seq_len: int
    dim: int
    num_classes: int | None
    added_specs: tuple[TensorSpec, ...] = ()
    added_sample_shape: tuple[int, ...] = ()

    def use_added_conditions(self, specs: Sequence[TensorSpec], sample_shape: Sequence[int]) -> None:
        """The added conditions of the UNet this source conditions (the deployed signature's)."""
        self.added_specs = tuple(specs)
        self.added_sample_shape = tuple(sample_shape)

    def draw_added(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Seeded added conditions (empty, drawing nothing, for UNets without them)."""
        return draw_added(self.added_specs, batch, generator, self.added_sample_shape)

    def null_added(self, batch: int) -> dict[str, torch.Tensor]:
        """The unconditional added conditions."""
        return null_added(self.added_specs, batch, self.added_sample_shape)

    def sample_conditions(self, batch: int, generator: torch.Generator) -> Conditions:
        """Random conditions (``sample``'s states, then the added conditions, from ``generator``)."""
        states, _ = self.sample(batch, generator)
        return Conditions(states, self.draw_added(batch, generator))

    def null_conditions(self, batch: int) -> Conditions:
        return Conditions(self.null(batch), self.null_added(batch))

    def label_conditions(self, labels: Sequence[int], seed: int = 0) -> Conditions:
        """The conditions that ask for the given class labels (added conditions drawn from ``seed``)."""
        return Conditions(self.for_labels(labels), self.draw_added(len(labels), torch.Generator().manual_seed(seed)))

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
