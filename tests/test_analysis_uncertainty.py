"""analysis.uncertainty: bootstrap front probabilities and distinguishability, on hand-made scores."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.errors import AnalysisError
from analysis.uncertainty import distinguishable, front_probability, resampled_objectives

MAX2 = np.array([True, True])


def scores(*trials: tuple[list[float], list[float]]) -> np.ndarray:
    """(n_trials, 2 objectives, n_images) from per-trial lists of per-image scores."""
    return np.array([[a, b] for a, b in trials], dtype=float)


def test_a_trial_better_on_every_image_always_dominates():
    good = ([1.0] * 50, [1.0] * 50)
    bad = ([0.0] * 50, [0.0] * 50)
    assert front_probability(scores(good, bad), MAX2).tolist() == [1.0, 0.0]
    assert distinguishable(scores(good, bad)).tolist() == [[False, True], [True, False]]


def test_identical_trials_share_the_front_and_are_indistinguishable():
    rng = np.random.default_rng(0)
    same = (rng.integers(0, 2, 80).tolist(), rng.integers(0, 2, 80).tolist())
    assert front_probability(scores(same, same), MAX2).tolist() == [1.0, 1.0]
    assert not distinguishable(scores(same, same)).any()


def test_one_image_of_difference_is_noise():
    n = 100
    clean = [1.0] * 60 + [0.0] * 40
    better = (clean, [1.0] * 31 + [0.0] * 69)
    worse = (clean, [1.0] * 30 + [0.0] * 70)  # wrong on image 30, where `better` is right
    p = front_probability(scores(better, worse), MAX2, resamples=2000, seed=1)
    assert p[0] == 1.0  # never strictly worse than `worse` on any resample
    # `worse` ties `better` exactly when image 30 is not drawn: (1 - 1/n)^n of the resamples
    assert abs(p[1] - (1 - 1 / n) ** n) < 0.04, p
    assert not distinguishable(scores(better, worse)).any()


def test_a_real_trade_off_keeps_both_on_the_front_and_apart():
    robust = ([1.0] * 40 + [0.0] * 60, [1.0] * 70 + [0.0] * 30)
    accurate = ([1.0] * 90 + [0.0] * 10, [1.0] * 20 + [0.0] * 80)
    assert front_probability(scores(robust, accurate), MAX2).tolist() == [1.0, 1.0]
    assert distinguishable(scores(robust, accurate))[0, 1]


def test_resamples_are_paired_and_seeded():
    per_image = np.random.default_rng(3).random((3, 2, 40))
    a = resampled_objectives(per_image, resamples=50, seed=7)
    assert a.shape == (50, 3, 2)
    assert np.array_equal(a, resampled_objectives(per_image, resamples=50, seed=7))
    # the same images for every trial in a resample: shifting one trial's scores shifts its means only
    shifted = per_image.copy()
    shifted[1] += 0.5
    b = resampled_objectives(shifted, resamples=50, seed=7)
    assert np.allclose(b[:, 1] - a[:, 1], 0.5) and np.allclose(b[:, [0, 2]], a[:, [0, 2]])


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(AnalysisError, match=r"\(trials, objectives, images\)"):
        front_probability(np.zeros((2, 2)), MAX2)
    with pytest.raises(AnalysisError, match="3 directions for 2 objectives"):
        front_probability(np.zeros((2, 2, 5)), np.array([True, True, True]))
