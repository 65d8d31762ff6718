"""How sure a front is: bootstrap over the evaluation images (pure numpy + moocore).

Every trial of a study is scored on the same images, so a resample of the images is a resample of
every trial's objectives at once (paired). Two questions are answered from the same resamples:
- :func:`front_probability`: how often each trial is on the first Pareto front;
- :func:`distinguishable`: for two trials, whether some objective differs beyond the noise (the
  95% percentile interval of the paired difference excludes 0).

Inputs are per-image scores: an ``(n_trials, n_objectives, n_images)`` array whose entry is 1/0
for correct/wrong, or the fraction of the defense's random draws that were correct.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import moocore
import numpy as np

from analysis.errors import AnalysisError
from atop.progress import track

#: bootstrap resamples used by default (the issue asks for >= 200)
RESAMPLES = 1000


def _check(per_image: np.ndarray, maximise: np.ndarray) -> np.ndarray:
    per_image = np.asarray(per_image, dtype=float)
    if per_image.ndim != 3 or 0 in per_image.shape:
        raise AnalysisError(
            f"per-image scores must be (trials, objectives, images) with none empty, got {per_image.shape}"
        )
    if len(maximise) != per_image.shape[1]:
        raise AnalysisError(f"{len(maximise)} directions for {per_image.shape[1]} objectives")
    return per_image


def resampled_objectives(per_image: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Objective values of every trial under ``resamples`` bootstrap resamples of the images.

    Args:
        per_image: ``(n_trials, n_objectives, n_images)`` per-image scores in [0, 1].
        resamples: number of resamples (each draws n_images images with replacement).
        seed: seed of the resampling; the same seed gives the same resamples.

    Returns:
        ``(resamples, n_trials, n_objectives)`` means over each resample's images.
    """
    n_images = per_image.shape[2]
    rng = np.random.default_rng(seed)
    # a resample is a count per image (multinomial), so its mean is one matrix product
    weights = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=resamples) / n_images
    return np.einsum("tmi,bi->btm", per_image, weights)


def front_probability(
    per_image: np.ndarray, maximise: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0
) -> np.ndarray:
    """Probability of each trial being on the first Pareto front, by bootstrap over images.

    A trial counts as on the front in a resample when no other trial dominates it there (ties,
    i.e. identical objective vectors, are all on the front).

    Args:
        per_image: ``(n_trials, n_objectives, n_images)`` per-image scores in [0, 1].
        maximise: one flag per objective.
        resamples, seed: see :func:`resampled_objectives`.

    Returns:
        ``(n_trials,)`` fractions of resamples in which each trial is on the front.
    """
    maximise = np.asarray(maximise, dtype=bool)
    per_image = _check(per_image, maximise)
    values = resampled_objectives(per_image, resamples=resamples, seed=seed)
    resampled = track(values, f"bootstrap front probability ({per_image.shape[0]} trials)", unit="resample")
    on_front = np.array(
        [moocore.is_nondominated(v, maximise=maximise, keep_weakly=True) for v in resampled]
    )
    return on_front.mean(axis=0)


def difference_intervals(
    per_image: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap intervals of the paired difference of every pair of trials.

    Returns:
        ``(lo, hi)``, each ``(n_trials, n_trials, n_objectives)``: the interval of trial i's value
        minus trial j's on each objective.
    """
    per_image = np.asarray(per_image, dtype=float)
    values = resampled_objectives(per_image, resamples=resamples, seed=seed)
    diffs = values[:, :, None, :] - values[:, None, :, :]
    tail = 100 * (1 - level) / 2
    return np.percentile(diffs, tail, axis=0), np.percentile(diffs, 100 - tail, axis=0)


def distinguishable(
    per_image: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95
) -> np.ndarray:
    """Which pairs of trials differ beyond the noise on at least one objective.

    Args:
        per_image: ``(n_trials, n_objectives, n_images)`` per-image scores in [0, 1].
        resamples, seed: see :func:`resampled_objectives`; level: the interval's coverage.

    Returns:
        ``(n_trials, n_trials)`` bool, symmetric, False on the diagonal: True where the paired
        interval of some objective's difference excludes 0.
    """
    lo, hi = difference_intervals(per_image, resamples=resamples, seed=seed, level=level)
    return np.asarray(((lo > 0) | (hi < 0)).any(axis=2))


@dataclass(frozen=True)
class FrontUncertainty:
    """How sure a study's first front is, from one set of paired resamples of the images.

    Attributes:
        run_ids: The trials resampled (every kept trial with per-image scores).
        probability: ``(len(run_ids),)`` fraction of resamples in which each is on the front.
        front: The point estimate's front members among ``run_ids``.
        apart: ``(len(front), len(front))`` bool: the pair differs beyond the noise on some
            objective (:func:`distinguishable`).
        resamples, seed: The bootstrap's size and seed.
        n_images: Images resampled.
    """

    run_ids: tuple[str, ...]
    probability: np.ndarray
    front: tuple[str, ...]
    apart: np.ndarray
    resamples: int
    seed: int
    n_images: int

    def probability_of(self, run_id: str) -> float | None:
        """A trial's front probability, None when it was not resampled."""
        if run_id not in self.run_ids:
            return None
        return float(self.probability[self.run_ids.index(run_id)])


def assess(
    per_image: np.ndarray,
    run_ids: Sequence[str],
    front: Sequence[str],
    maximise: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> FrontUncertainty:
    """Front probability of every trial and distinguishability of the front's members.

    Args:
        per_image: ``(n_trials, n_objectives, n_images)`` per-image scores of ``run_ids``.
        run_ids: The trials' ids, in the order of ``per_image``.
        front: Ids of the point estimate's front members (those not in ``run_ids`` are skipped).
        maximise: One flag per objective.
        resamples, seed: See :func:`resampled_objectives` (the same for both answers).
    """
    probability = front_probability(per_image, maximise, resamples=resamples, seed=seed)
    members = [r for r in front if r in run_ids]
    rows = [list(run_ids).index(r) for r in members]
    apart = np.zeros((0, 0), bool)
    if rows:
        apart = distinguishable(per_image[rows], resamples=resamples, seed=seed)
    return FrontUncertainty(
        tuple(run_ids), probability, tuple(members), apart, resamples, seed, per_image.shape[2]
    )
