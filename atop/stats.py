"""Sampling uncertainty of accuracies: closed-form Wilson intervals and a seeded bootstrap.

numpy only (no torch), so `analysis/` can use it on tables of per-image results.

- `wilson(k, n)`: the Wilson score interval for a proportion of k successes in n trials. It stays
  inside [0, 1], is not empty at k = 0 or k = n (where the normal interval collapses to a point),
  and always contains k / n.
- `bootstrap(a, b)`: a percentile bootstrap interval for the mean of per-image results, or for the
  paired difference mean(a) - mean(b) when `b` is given. Images are resampled with replacement and,
  where an (R, N) array of R draws per image is given, each picked image's R draws are resampled
  with replacement too (two-stage), so the interval covers both the choice of images and the
  randomness of the draws. Paired: the same resampled images and draws are used for `a` and `b`;
  with `paired_draws=False` the rows of `a` and `b` are independent (e.g. the fine-tuning seeds of
  two configurations): the images are still resampled once for both, each one's rows on their own.
"""
from __future__ import annotations

import math

import numpy as np

#: the standard normal quantile of a two-sided 95% interval
Z95 = 1.959963984540054


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (Wilson 1927): 95% by default.

    Args:
        k: successes, 0 <= k <= n; a fractional k (e.g. n times a mean over several draws per
            image) is accepted.
        n: trials (images), >= 1.
        z: normal quantile of the interval (1.96 for 95%).

    Returns:
        (lo, hi), with 0 <= lo <= k/n <= hi <= 1.

    Raises:
        ValueError: n < 1 or k outside [0, n].
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be in [0, n={n}]")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # clip rounding only: mathematically lo <= p <= hi within [0, 1]
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def bootstrap(a: np.ndarray, b: np.ndarray | None = None, *, n_boot: int = 2000, level: float = 0.95,
              seed: int = 0, paired_draws: bool = True) -> tuple[float, float]:
    """Percentile bootstrap interval over images (and draws) of mean(a), or of mean(a) - mean(b).

    Args:
        a: per-image results, shape (N,) or (R, N) (R draws of each of N images); bool or numbers.
        b: optional second run on the same images: the interval is then of the paired difference
            mean(a) - mean(b), with the same resampled images for both.
        n_boot: bootstrap resamples (>= 1).
        level: coverage of the interval, in (0, 1).
        seed: seed of the resampling generator (`numpy.random.default_rng`): the same inputs and
            seed give the same interval.
        paired_draws: True: `b` has the same shape and its draws are those of `a` (row r of both
            is one draw), resampled together. False: the rows of `a` and `b` are unrelated (e.g.
            fine-tuning seeds of two configurations; their counts may differ): within each picked
            image, `a`'s rows and `b`'s rows are resampled independently.

    Returns:
        (lo, hi), the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled statistic.

    Raises:
        ValueError: shapes that differ (in images; also in draws when paired) or are not 1-D / 2-D,
            no images, n_boot < 1, level outside (0, 1).
    """
    a = np.atleast_2d(np.asarray(a, dtype=float))
    runs = [a]
    if b is not None:
        b = np.atleast_2d(np.asarray(b, dtype=float))
        if b.shape != a.shape and (paired_draws or b.shape[1:] != a.shape[1:]):
            raise ValueError(f"paired arrays differ in shape: {a.shape} vs {b.shape}")
        # paired draws: the difference per draw and image, resampled as one array
        runs = [a - b] if paired_draws else [a, b]
    if any(r.ndim != 2 or r.shape[1] < 1 for r in runs):
        raise ValueError(f"expected an (N,) or (R, N) array with N >= 1, got shape {a.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    # bounds the index arrays to a few MB each
    chunk = max(1, 2_000_000 // (n * max(r.shape[0] for r in runs)))
    for start in range(0, n_boot, chunk):
        c = min(chunk, n_boot - start)
        images = rng.integers(0, n, size=(c, 1, n))
        means = []
        for r in runs:
            draws = r.shape[0]
            picked = (rng.integers(0, draws, size=(c, draws, n)) if draws > 1
                      else np.zeros((c, 1, n), dtype=int))
            means.append(r[picked, images].mean(axis=(1, 2)))
        stats[start:start + c] = means[0] - means[1] if len(means) == 2 else means[0]
    tail = (1 - level) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    return float(lo), float(hi)
