"""Gradient-masking audit: the pure flag function on made-up numbers, and the runner on a
deliberately gradient-masked toy defense (flagged) and a normal trained classifier (not flagged)."""
from __future__ import annotations

from attack_fixtures import MaskedDefense, eval_images, trained_classifier

from atop.audit import FLAGS, audit_flags, run_audit
from atop.config import Config

HEALTHY = {"eps_acc": [0.40, 0.20, 0.05, 0.0], "acc": 0.40, "acc_2x_steps": 0.39, "acc_2x_eot": 0.40,
           "whitebox_acc": 0.38, "blackbox_acc": 0.55, "pgd_acc": 0.40, "bpda_acc": 0.60}


def test_healthy_numbers_raise_no_flag() -> None:
    flags = audit_flags(HEALTHY, n=100)
    assert set(flags) == {*FLAGS, "gradient_masking_suspected"}
    assert not any(flags.values())


def test_each_sign_of_masking_raises_its_flag() -> None:
    cases = {
        "acc_rises_with_eps": {"eps_acc": [0.40, 0.60, 0.05, 0.0]},
        "not_zero_at_large_eps": {"eps_acc": [0.40, 0.35, 0.30, 0.30]},
        "steps_not_converged": {"acc_2x_steps": 0.20},
        "weaker_with_more_steps": {"acc_2x_steps": 0.60},
        "eot_not_converged": {"acc_2x_eot": 0.25},
        "weaker_with_more_eot": {"acc_2x_eot": 0.55},
        "blackbox_stronger": {"blackbox_acc": 0.20},
        "bpda_stronger": {"bpda_acc": 0.10},
    }
    for flag, change in cases.items():
        flags = audit_flags({**HEALTHY, **change}, n=100)
        assert flags[flag] is True, flag
        assert flags["gradient_masking_suspected"] is True
        assert [k for k in FLAGS if flags[k]] == [flag]


def test_tolerance_is_stated_and_includes_one_image_of_slack() -> None:
    # 0.40 -> 0.34 is within 0.05 + 1/100 ... but not within 0.05 + 1/1000
    numbers = {**HEALTHY, "acc_2x_steps": 0.34}
    assert audit_flags(numbers, n=100)["steps_not_converged"] is False
    assert audit_flags(numbers, n=1000)["steps_not_converged"] is True


def test_missing_measurements_leave_flags_unset() -> None:
    flags = audit_flags({"acc": 0.3}, n=10)
    assert all(flags[k] is None for k in FLAGS) and flags["gradient_masking_suspected"] is False


def test_gradient_masked_toy_defense_is_flagged() -> None:
    masked = MaskedDefense(trained_classifier())
    report = run_audit(masked, eval_images(24), Config(), steps=3, eot=1, queries=50)
    assert report.flags["gradient_masking_suspected"] is True
    assert report.flags["bpda_stronger"] is True  # identity backward breaks what zero gradients hid
    assert report.flags["blackbox_stronger"] is True  # random search beats a gradient that is 0
    assert report.measurements["bpda_acc"] < report.measurements["pgd_acc"]


def test_normal_trained_classifier_is_not_flagged() -> None:
    report = run_audit(trained_classifier(), eval_images(24), Config(), steps=5, eot=1, queries=50)
    assert report.flags["gradient_masking_suspected"] is False, report.flags
    assert report.measurements["eps_acc"][-1] <= 0.1
    assert set(report.runs) >= {"pgd_linf", "pgd_linf_2x_steps", "pgd_linf_2x_eot", "bpda_linf", "square_linf"}
