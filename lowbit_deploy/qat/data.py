"""Training batches for QAT: clean samples x0 and their conditions, from a registry of data sources.

``digits``   -- the embedded default's real images (scikit-learn digits) with their class prompts.
``gaussian`` -- data-free: x0 ~ N(0, I) in the UNet's sample shape, random conditions. Works for any checkpoint
                (e.g. SD1.5 latents are roughly unit-variance); the teacher defines the target, not the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..errors import UserError
from ..models import sample_shape
from ..recipes import DataSource


@dataclass
class Batch:
    x0: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # added conditions (SDXL, class labels) by name


class BatchSampler(Protocol):
    def __call__(self, batch_size: int, generator: torch.Generator) -> Batch: ...


def digits_sampler(bundle) -> BatchSampler:
    from ..models import load_digits

    if bundle.condition.num_classes is None:
        raise UserError("train.data=digits needs the embedded default model (class prompts); "
                        "use `data: gaussian` for other checkpoints")
    images, labels = load_digits("train", image_size=sample_shape(bundle.unet)[1])

    def sample(batch_size: int, generator: torch.Generator) -> Batch:
        index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        return Batch(images[index], bundle.condition.for_labels(labels[index].tolist()),
                     bundle.condition.draw_added(batch_size, generator))

    return sample


def gaussian_sampler(bundle) -> BatchSampler:
    shape = sample_shape(bundle.unet)

    def sample(batch_size: int, generator: torch.Generator) -> Batch:
        x0 = torch.randn((batch_size, *shape), generator=generator)
        conditions = bundle.condition.sample_conditions(batch_size, generator)
        return Batch(x0, conditions.encoder_hidden_states, conditions.added)

    return sample


DATA_SOURCES: dict[DataSource, Callable[[object], BatchSampler]] = {
    DataSource.DIGITS: digits_sampler,
    DataSource.GAUSSIAN: gaussian_sampler,
}


def resolve_source(source: DataSource, bundle) -> DataSource:
    """``auto`` is the embedded default's digits when the model has class prompts, else data-free gaussian."""
    if source is DataSource.AUTO:
        return DataSource.DIGITS if bundle.condition.num_classes is not None else DataSource.GAUSSIAN
    return source


def make_sampler(source: DataSource, bundle) -> BatchSampler:
    return DATA_SOURCES[resolve_source(source, bundle)](bundle)
