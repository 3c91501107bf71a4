"""A small CNN that recognises 16x16 digits: the judge of generated samples (conditional accuracy)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..io import load_small_module, save_small_module



class DigitClassifier(nn.Module):
    """Two conv blocks and a two-layer head; input ``[N, 1, S, S]`` in [-1, 1] with S divisible by 4."""

    def __init__(self, image_size: int = 16, channels: tuple[int, int] = (16, 32), hidden: int = 64,
                 num_classes: int = 10):
        super().__init__()
        self.config = {"image_size": image_size, "channels": list(channels), "hidden": hidden,
                       "num_classes": num_classes}
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, first, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(first, second, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(second * (image_size // 4) ** 2, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, hidden]`` (for FID-like distances between image sets)."""
        return self.head[:-1](self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head[-1](self.embed(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        was_training = self.training
        self.eval()
        images = images.float().clamp(-1.0, 1.0)
        predictions = [self(chunk).argmax(dim=1) for chunk in images.split(batch_size)]
        self.train(was_training)
        return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(images) == labels.to(torch.long)).float().mean())

    def save(self, path: str | os.PathLike) -> None:
        save_small_module(path, self.config, self)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "DigitClassifier":
        """The classifier saved in ``path`` (default: the one shipped in ``models/default/classifier``)."""
        from . import DEFAULT_MODEL_DIR

        folder = Path(path) if path is not None else DEFAULT_MODEL_DIR / "classifier"
        config, state = load_small_module(folder, "digit classifier",
                                          "regenerate it with `python scripts/train_default_model.py`")
        config["channels"] = tuple(config["channels"])
        model = cls(**config)
        model.load_state_dict(state, strict=True)
        return model.eval()


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 30, seed: int = 0,
                     batch_size: int = 64, lr: float = 3e-3) -> DigitClassifier:
    """Fit a DigitClassifier with +-1-pixel shift augmentation (generated digits are rarely perfectly centred)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(image_size=images.shape[-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for batch_index in order.split(batch_size):
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            batch = torch.roll(images[batch_index], shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(model(batch), labels[batch_index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    return model.eval()
