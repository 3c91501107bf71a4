"""The digits data and the shipped digit classifier."""

from __future__ import annotations

import pytest
import torch

from lowbit_deploy.errors import UserError
from lowbit_deploy.models import DigitClassifier, load_digits


def test_digits_splits_are_fixed_and_disjoint():
    train_images, train_labels = load_digits("train")
    val_images, val_labels = load_digits("val")
    assert train_images.shape == (1438, 1, 16, 16) and val_images.shape == (359, 1, 16, 16)
    assert train_labels.dtype == torch.long and set(val_labels.tolist()) == set(range(10))
    assert float(train_images.min()) == -1.0 and float(train_images.max()) <= 1.0
    again, _ = load_digits("val")
    assert torch.equal(val_images, again)
    # No val image appears in train (sklearn digits has no exact duplicates across the split).
    train_rows = {tuple(row) for row in train_images.flatten(1).tolist()}
    assert not any(tuple(row) in train_rows for row in val_images.flatten(1).tolist())


def test_digits_other_size_and_bad_split():
    images, _ = load_digits("val", image_size=8)
    assert images.shape == (359, 1, 8, 8)
    with pytest.raises(UserError, match="train, val"):
        load_digits("test")


def test_shipped_classifier_accuracy_on_val():
    classifier = DigitClassifier.load()
    images, labels = load_digits("val")
    predictions = classifier.predict(images)
    assert predictions.dtype == torch.long and predictions.shape == labels.shape
    assert classifier.accuracy(images, labels) >= 0.9


def test_classifier_of_bundle_matches_shipped(default_bundle):
    images, _ = load_digits("val")
    assert torch.equal(default_bundle.classifier.predict(images[:32]), DigitClassifier.load().predict(images[:32]))


def test_missing_classifier(tmp_path):
    with pytest.raises(UserError, match="cannot load the digit classifier"):
        DigitClassifier.load(tmp_path)
