"""Feature-FID: the Fréchet distance against closed forms, and the classifier-feature wrapper."""

import numpy as np
import pytest
import torch

from lowbit_deploy.validate.quality import feature_fid, frechet_distance, prompted_confidence


def test_identical_sets_are_at_distance_zero():
    features = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_shifted_gaussians_closed_form():
    # Same covariance, means 3 apart in every one of D dimensions: FID = D * 9 (the trace term cancels).
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4000, 4))
    assert frechet_distance(base, base + 3.0) == pytest.approx(4 * 9.0, rel=1e-9)


def test_scaled_gaussians_closed_form():
    # Covariances I and s^2 I (exactly, after whitening): trace term D * (1 + s^2 - 2 s) = D * (s - 1)^2.
    rng = np.random.default_rng(2)
    white = rng.normal(size=(6000, 3))
    white = (white - white.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(white, rowvar=False))).T
    assert frechet_distance(white, 2.0 * white) == pytest.approx(3 * 1.0, rel=1e-6)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_classifier_wrappers():
    from lowbit_deploy.models import DigitClassifier, load_digits

    classifier = DigitClassifier.load()
    images, labels = load_digits("val")
    assert feature_fid(classifier, images[:200], images[:200]) == pytest.approx(0.0, abs=1e-6)
    assert feature_fid(classifier, images[:180], images[180:]) > 0
    assert feature_fid(classifier, torch.zeros_like(images[:180]), images[180:]) > \
        10 * feature_fid(classifier, images[:180], images[180:])
    assert prompted_confidence(classifier, images, labels) > 0.9
