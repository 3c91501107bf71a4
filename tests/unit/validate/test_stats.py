import math

import numpy as np
import pytest

from lowbit_deploy.recipes import Tolerances
from lowbit_deploy.validate.stats import check, compare, merge


def test_identical_outputs():
    x = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    stats = compare(x, x)
    assert stats.max_abs == 0 and stats.cosine == 1.0 and math.isinf(stats.sqnr_db)
    assert check(stats, Tolerances(max_abs=0, min_cosine=1.0, min_sqnr_db=1e9)) == []


def test_known_error_figures():
    reference = np.array([1.0, -2.0, 3.0, 4.0])
    candidate = reference + np.array([0.1, 0.0, 0.0, -0.1])
    stats = compare(reference, candidate)
    assert stats.max_abs == pytest.approx(0.1)
    assert stats.max_rel == pytest.approx(0.1)
    assert stats.sqnr_db == pytest.approx(10 * math.log10(30 / 0.02))
    assert stats.cosine == pytest.approx(np.dot(reference, candidate)
                                         / np.linalg.norm(reference) / np.linalg.norm(candidate))


def test_failures_name_the_tolerance_that_would_pass():
    stats = compare(np.ones(4), np.array([1.0, 1.0, 1.0, 1.5]))
    failures = check(stats, Tolerances(max_abs=0.1, max_rel=0.1, min_cosine=0.9999, min_sqnr_db=40))
    assert len(failures) == 4
    assert "passes with --max-abs 0.5" in failures[0]
    assert check(stats, Tolerances(max_abs=0.5, max_rel=0.5, min_cosine=0.98, min_sqnr_db=10)) == []


def test_merge_keeps_the_worst_case():
    good = compare(np.ones(3), np.ones(3))
    bad = compare(np.ones(3), np.array([1.0, 2.0, 1.0]))
    merged = merge([good, bad])
    assert merged.max_abs == bad.max_abs and merged.cosine == bad.cosine and merged.sqnr_db == bad.sqnr_db


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        compare(np.ones(3), np.ones(4))
