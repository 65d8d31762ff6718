"""Gradient-masking audit: the pure functions on made-up per-image results and intervals, and the
runner on a deliberately gradient-masked toy defense (flagged) and a normal trained classifier (not
flagged)."""
from __future__ import annotations

import numpy as np
import pytest
from attack_fixtures import MaskedDefense, eval_images, trained_classifier

from atop.audit import FLAGS, Difference, audit_flags, paired_differences, run_audit
from atop.config import Config

N = 200


def correct(k: int, n: int = N) -> np.ndarray:
    """Per-image correctness with the first k of n images right."""
    return np.arange(n) < k


def flip(a: np.ndarray, lost: int = 0, gained: int = 0) -> np.ndarray:
    """`a` with `lost` right images made wrong and `gained` wrong images made right."""
    b = a.copy()
    b[np.flatnonzero(a)[:lost]] = False
    b[np.flatnonzero(~a)[:gained]] = True
    return b


def healthy() -> dict:
    ref = correct(80)
    return {"sweep": [ref, correct(40), correct(10), correct(0)], "reference": ref, "more_steps": flip(ref, lost=2),
            "more_eot": ref.copy(), "whitebox": flip(ref, lost=4), "blackbox": correct(110), "pgd": ref,
            "bpda": correct(120)}


def test_healthy_results_raise_no_flag() -> None:
    diffs = paired_differences(healthy())
    assert set(diffs) == {"eps_2x_vs_1x", "eps_4x_vs_2x", "eps_8x_vs_4x", "steps_2x_vs_1x", "eot_2x_vs_1x",
                          "blackbox_vs_whitebox", "bpda_vs_pgd"}
    assert diffs["steps_2x_vs_1x"].diff == pytest.approx(-0.01)
    flags = audit_flags(diffs, large_eps_acc=0.0)
    assert set(flags) == {*FLAGS, "gradient_masking_suspected"}
    assert not any(flags.values())


def test_each_sign_of_masking_raises_its_flag() -> None:
    ref = correct(80)
    cases = {
        "acc_rises_with_eps": {"sweep": [ref, correct(120), correct(10), correct(0)]},
        "steps_not_converged": {"more_steps": flip(ref, lost=40)},
        "weaker_with_more_steps": {"more_steps": flip(ref, gained=40)},
        "eot_not_converged": {"more_eot": flip(ref, lost=30)},
        "weaker_with_more_eot": {"more_eot": flip(ref, gained=30)},
        "blackbox_stronger": {"blackbox": correct(40)},
        "bpda_stronger": {"bpda": correct(20)},
    }
    for flag, change in cases.items():
        flags = audit_flags(paired_differences({**healthy(), **change}), large_eps_acc=0.0)
        assert [k for k in FLAGS if flags[k]] == [flag], flag
        assert flags["gradient_masking_suspected"] is True
    flags = audit_flags(paired_differences(healthy()), large_eps_acc=0.3)
    assert [k for k in FLAGS if flags[k]] == ["not_zero_at_large_eps"]


def test_the_tolerance_is_the_measured_spread() -> None:
    # the same net difference, -4 images of 64 (6.25 points, inside the old fixed 5 points + 1/64):
    # 4 images lost and none gained is beyond the paired spread, 20 lost and 16 gained is not
    ref = correct(32, 64)
    one_way = paired_differences({"reference": ref, "more_steps": flip(ref, lost=4)})["steps_2x_vs_1x"]
    churn = paired_differences({"reference": ref, "more_steps": flip(ref, lost=20, gained=16)})["steps_2x_vs_1x"]
    assert one_way.diff == pytest.approx(-4 / 64) and churn.diff == pytest.approx(-4 / 64)
    assert one_way.hi < 0 < churn.hi
    assert audit_flags({"steps_2x_vs_1x": one_way})["steps_not_converged"] is True
    assert audit_flags({"steps_2x_vs_1x": churn})["steps_not_converged"] is False


def test_flags_read_whole_intervals_of_made_up_differences() -> None:
    inside, below, above = Difference(-0.08, -0.2, 0.04), Difference(-0.08, -0.12, -0.01), Difference(0.05, 0.01, 0.1)
    assert audit_flags({"bpda_vs_pgd": inside})["bpda_stronger"] is False
    assert audit_flags({"bpda_vs_pgd": below})["bpda_stronger"] is True
    flags = audit_flags({"eot_2x_vs_1x": above, "eps_2x_vs_1x": inside})
    assert flags["weaker_with_more_eot"] is True and flags["eot_not_converged"] is False
    assert flags["acc_rises_with_eps"] is False


def test_draws_count_in_the_spread() -> None:
    # (R, N) arrays: the reference right in 1 of 2 draws on every image, 2x steps on none:
    # a 0.5 drop that no resampling of images and draws can explain
    ref = np.stack([np.arange(N) % 2 == 0, np.arange(N) % 2 == 1])
    d = paired_differences({"reference": ref, "more_steps": np.zeros_like(ref)})["steps_2x_vs_1x"]
    assert d.diff == -0.5 and d.lo < -0.5 < d.hi < 0


def test_missing_measurements_leave_flags_unset() -> None:
    flags = audit_flags(paired_differences({"reference": correct(30)}))
    assert all(flags[k] is None for k in FLAGS) and flags["gradient_masking_suspected"] is False


def test_gradient_masked_toy_defense_is_flagged() -> None:
    masked = MaskedDefense(trained_classifier())
    # 200 queries: enough for Square to beat the zero gradient beyond the spread of 24 images
    report = run_audit(masked, eval_images(24), Config(), steps=3, eot=1, queries=200)
    assert report.flags["gradient_masking_suspected"] is True
    assert report.flags["bpda_stronger"] is True  # identity backward breaks what zero gradients hid
    assert report.flags["blackbox_stronger"] is True  # random search beats a gradient that is 0
    assert report.measurements["bpda_acc"] < report.measurements["pgd_acc"]
    assert report.measurements["differences"]["bpda_vs_pgd"]["hi"] < 0


def test_normal_trained_classifier_is_not_flagged() -> None:
    report = run_audit(trained_classifier(), eval_images(24), Config(), steps=5, eot=1, queries=50)
    assert report.flags["gradient_masking_suspected"] is False, report.flags
    assert report.measurements["eps_acc"][-1] <= 0.1
    assert set(report.runs) >= {"pgd_linf", "pgd_linf_2x_steps", "pgd_linf_2x_eot", "bpda_linf", "square_linf"}
    assert report.tolerance["n_images"] == 24
