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


def test_scores_come_from_the_column_that_scored_each_objective():
    import pyarrow as pa

    from analysis.per_example import UnusableScores, score_source, trial_scores
    from atop.config import Config, Norm
    from atop.scoring import seen_attack

    for norm in Norm:  # the seen objective is PGD in the training norm, as the evaluation says
        cfg = Config().replace(train_norm=norm)
        assert score_source("robust_acc_seen", {"params.train_norm": norm.value}) == seen_attack(cfg)
    assert score_source("robust_acc/apgd_dlr_linf", {}) == "apgd_dlr_linf"
    assert score_source("loss/ce", {}) is None
    table = pa.table({"index": [5, 3], "clean_correct": [True, False],
                      "clean_correct_rate": [0.75, 0.25], "unseen_correct": [False, False]})  # fmt: skip
    index, scores = trial_scores(table, ["clean_acc", "robust_acc_unseen"], [0.5, 0.0], {})
    assert index.tolist() == [5, 3] and scores.tolist() == [[0.75, 0.25], [0.0, 0.0]]  # rate first
    with pytest.raises(UnusableScores, match="mean of unseen_correct 0.0000 is not the logged"):
        trial_scores(table, ["robust_acc_unseen"], [0.1], {})
    with pytest.raises(UnusableScores, match="no per-image column scores loss/ce"):
        trial_scores(table, ["loss/ce"], [0.1], {})


def test_trials_are_aligned_on_the_images_they_share():
    from analysis.per_example import align

    found = {
        "x": (np.array([3, 1, 2]), np.array([[0.3, 0.1, 0.2]])),
        "y": (np.array([2, 3, 4, 9]), np.array([[2.0, 3.0, 4.0, 9.0]])),
    }
    per = align(found, {"z": "no file"}, 1)
    assert per.run_ids == ("x", "y") and per.n_images == 2 and per.most_images == 4
    assert per.scores.tolist() == [[[0.2, 0.3]], [[2.0, 3.0]]]  # images 2 and 3, in index order
    assert per.missing == {"z": "no file"}


def test_the_artifact_name_is_the_trainables():
    from analysis.per_example import PER_EXAMPLE_ARTIFACT
    from trainables.atop_trainable import PER_EXAMPLE_FILE

    assert PER_EXAMPLE_ARTIFACT == PER_EXAMPLE_FILE
