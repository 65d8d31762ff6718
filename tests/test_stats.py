"""atop.stats: Wilson intervals against hand computation, and the seeded two-stage bootstrap."""
from __future__ import annotations

import math

import numpy as np
import pytest

from atop.stats import Z95, bootstrap, wilson


def test_wilson_matches_hand_computation() -> None:
    # k = 0 of n: lo 0, hi z^2 / (n + z^2); k = n mirrors it; k = n/2 is symmetric about 1/2 with
    # half-width z / (n + z^2) * sqrt(n/4 + z^2/4)
    z2 = Z95 ** 2
    assert wilson(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-12)
    assert wilson(0, 10)[1] == pytest.approx(0.277533, abs=1e-6)
    assert wilson(10, 10) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-12)
    half = Z95 / (10 + z2) * math.sqrt(10 / 4 + z2 / 4)
    assert wilson(5, 10) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert wilson(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)


def test_wilson_contains_the_proportion_and_accepts_a_fractional_count() -> None:
    for n in (1, 7, 64, 512):
        for k in np.linspace(0, n, 13):
            lo, hi = wilson(float(k), n)
            assert 0 <= lo <= k / n <= hi <= 1


@pytest.mark.parametrize("k, n, message", [(1, 0, "n=0"), (-1, 10, "k=-1"), (11, 10, "k=11")])
def test_wilson_refuses_impossible_counts(k: float, n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        wilson(k, n)


def test_bootstrap_is_seeded_and_near_the_normal_interval() -> None:
    correct = np.arange(400) % 5 < 2  # 40% of 400 images
    lo, hi = bootstrap(correct, seed=3)
    assert (lo, hi) == bootstrap(correct, seed=3) != bootstrap(correct, seed=4)
    half = Z95 * math.sqrt(0.4 * 0.6 / 400)
    assert lo == pytest.approx(0.4 - half, abs=0.01) and hi == pytest.approx(0.4 + half, abs=0.01)


def test_bootstrap_resamples_the_draws_too() -> None:
    # each image right in exactly one of its 2 draws: every image's mean is 1/2, so resampling
    # images alone gives no spread; resampling each image's draws does
    correct = np.stack([np.arange(100) % 2 == 0, np.arange(100) % 2 == 1])
    lo, hi = bootstrap(correct, seed=0)
    assert lo < 0.5 < hi
    per_image = bootstrap(correct.mean(axis=0), seed=0)
    assert per_image == (0.5, 0.5)


def test_paired_bootstrap_of_identical_runs_is_zero_and_of_a_shift_excludes_zero() -> None:
    a = np.arange(200) % 2 == 0
    assert bootstrap(a, a.copy()) == (0.0, 0.0)
    b = a.copy()
    b[:40:2] = False  # 20 images lost, none gained: mean(a) - mean(b) = 0.1
    lo, hi = bootstrap(a, b, seed=1)
    assert 0 < lo < 0.1 < hi


def test_bootstrap_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        bootstrap(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="N >= 1"):
        bootstrap(np.ones((2, 0)))
    with pytest.raises(ValueError, match="level"):
        bootstrap(np.ones(5), level=1.0)
