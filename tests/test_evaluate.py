"""evaluate(): levels, metric names, intervals, majority votes, clean-gated robustness, worst case,
audit, screening labels; and the `python -m atop.evaluate` CLI, bad inputs included."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from attack_fixtures import (
    DATA_DIR,
    eval_images,
    need_data,
    noisy_defense,
    tiny_defense,
    trained_classifier,
)
from torch import nn

from atop.attacks import ATTACKS
from atop.checkpoint import save_checkpoint
from atop.config import Config, EvalLevel
from atop.data import Split
from atop.evaluate import (
    EXAMPLE_IMAGES,
    LEVELS,
    accuracy,
    describe,
    evaluate,
    level_budget,
    main,
    measure,
    seen_attack,
)
from atop.scoring import attacked_count, measure_attack
from tracking.contract import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]
CFG = Config.from_dict({"n_eval": 4, "batch_size": 4, "unseen_attacks": "pgd_l2,apgd_dlr_linf"})
FIGURES = {*OBJECTIVES, "robust_acc/pgd_linf", "robust_acc/pgd_l2", "robust_acc/apgd_dlr_linf"}


def check_intervals(metrics: dict[str, float], figures: set[str]) -> None:
    for name in figures:
        assert metrics[f"{name}_lo"] <= metrics[name] <= metrics[f"{name}_hi"], name
        assert 0 <= metrics[f"{name}_lo"] and metrics[f"{name}_hi"] <= 1 and 0 <= metrics[f"{name}_majority"] <= 1


def test_screen_stays_cheap_and_reports_the_objectives() -> None:
    assert LEVELS[EvalLevel.SCREEN]["steps"] == 10 and LEVELS[EvalLevel.SCREEN]["eot"] == 2
    assert LEVELS[EvalLevel.FULL]["steps"] == 100 and LEVELS[EvalLevel.FULL]["eot"] >= 20
    assert LEVELS[EvalLevel.FULL]["queries"] == 5000  # reference AutoAttack's Square budget
    result = evaluate(tiny_defense(), eval_images(4), CFG, level="screen", steps=2)
    assert set(result.metrics) == {f"{n}{s}" for n in FIGURES for s in ("", "_lo", "_hi", "_majority")}
    check_intervals(result.metrics, FIGURES)
    for name in FIGURES:  # one draw: the majority vote is that draw
        assert result.metrics[f"{name}_majority"] == result.metrics[name]
        assert result.metrics[f"{name}_hi"] - result.metrics[f"{name}_lo"] > 0.3  # 4 images say little
    assert result.audit is None and result.budget["eot"] == 2 and result.budget["steps"] == 2
    assert result.settings[seen_attack(CFG)]["level"] == "screen"
    assert len(result.per_example["clean_correct"]) == 4
    assert result.screening and result.level is EvalLevel.SCREEN and result.n_images == 4
    assert result.description == ("screening (PGD-2, EOT 2, 1 draw): not a final robustness figure; 4 test images; "
                                  "WEAKENED below the level's standard budget (steps 2 < 10): overstates robustness")


def test_describe_says_how_a_figure_was_obtained() -> None:
    assert describe(level_budget("screen"), 64, "test") == (
        "screening (PGD-10, EOT 2, 1 draw): not a final robustness figure; 64 test images")
    full = describe(level_budget("full"), 512, "validation")
    assert full == "full evaluation (PGD/APGD 100 steps, EOT 20, Square 5000 queries, 5 draws); 512 validation images"
    with pytest.raises(ValueError, match="eot=0"):
        level_budget("full", eot=0)


def test_accuracy_gives_the_mean_its_wilson_interval_and_the_majority_vote() -> None:
    correct = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0]], dtype=bool)  # 3 draws of 4 images
    figures = accuracy("acc", correct)
    assert figures["acc"] == pytest.approx(5 / 12)
    assert figures["acc_majority"] == 0.5  # images 0 and 2 are right in 2 of 3 draws
    # Wilson of 5/3 "images" of 4 (the mean as a count), by hand: centre (p + z^2/8) / (1 + z^2/4), p = 5/12
    assert figures["acc_lo"] == pytest.approx(0.110018, abs=1e-6) and figures["acc_hi"] == pytest.approx(0.804964, abs=1e-6)
    assert accuracy("a", np.array([[1, 0], [0, 0]], dtype=bool))["a_majority"] == 0  # a tie is not a majority


class SineModel(nn.Module):
    """Two classes by the sign of sin(omega * (mean pixel - centre)): FGSM's ascent step on the
    loss of label 1 overshoots by half a period, so it turns a misclassified image into a right one."""

    def __init__(self, centre: float, omega: float):
        super().__init__()
        self.centre, self.omega = centre, omega

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sin(self.omega * (x.mean(dim=(1, 2, 3)) - self.centre))
        return torch.stack([torch.zeros_like(s), s], dim=1)


def test_a_draw_wrong_on_the_clean_image_never_counts_as_robust() -> None:
    eps = 8 / 255
    data = Split(torch.full((4, 3, 8, 8), 128, dtype=torch.uint8), torch.ones(4, dtype=torch.int64))
    omega = math.pi / eps  # one FGSM step moves the phase by -pi: from -pi/4 (wrong) to -5pi/4 (right)
    model = SineModel(centre=128 / 255 + math.pi / 4 / omega, omega=omega)
    fgsm = ATTACKS["fgsm_linf"].build(model, eps=eps)
    assert measure(model, data, None).sum() == 0 and measure(model, data, fgsm).all()  # the case holds
    cfg = Config.from_dict({"batch_size": 4, "unseen_attacks": "fgsm_linf"})
    result = evaluate(model, data, cfg, level="screen", steps=1)
    assert result.metrics["clean_acc"] == 0
    assert result.metrics["robust_acc/fgsm_linf"] == 0 and result.metrics["robust_acc_unseen"] == 0
    assert not result.per_example["fgsm_linf_correct"].any()


def test_full_runs_autoattack_and_the_audit_and_takes_the_worst_case() -> None:
    result = evaluate(tiny_defense(), eval_images(4), CFG, level="full", steps=1, eot=1, queries=4, repeats=2)
    m = result.metrics
    assert "robust_acc/autoattack_rand_linf" in m and result.audit is not None
    assert "gradient_masking_suspected" in result.audit["flags"]
    robust = [v for k, v in m.items() if k.startswith("robust_acc/")]
    assert m["worst_case_acc"] <= min(robust + [m["clean_acc"]]) + 1e-9
    assert "robust_acc/square_linf" in m and "robust_acc/bpda_linf" in m  # audit runs count too
    assert result.per_example["worst_case_correct_rate"].shape == (4,)
    assert set(result.std) >= {"clean_acc", "worst_case_acc"}
    check_intervals(m, {k for k in result.std})
    assert not result.screening and result.description.startswith("full evaluation")
    for name in result.std:  # every attack run on a draw the clean image passed
        assert m[name] <= m["clean_acc"] + 1e-9


def test_an_audit_on_the_first_images_flags_the_defense_without_joining_the_figures() -> None:
    cfg = CFG.replace(audit_images=2)
    result = evaluate(tiny_defense(), eval_images(4), cfg, level="full", steps=1, eot=1, queries=4, repeats=2)
    assert result.audit is not None and result.audit["images"] == 2
    assert "gradient_masking_suspected" in result.audit["flags"]
    assert result.settings["square_linf"]["images"] == 2 and result.settings["square_linf"]["audit"] == 1
    # its runs cover 2 of the 4 images: no figure or per-image column of the 4 comes from them
    assert "robust_acc/square_linf" not in result.metrics and "square_linf_correct" not in result.per_example
    assert result.per_example["worst_case_correct"].shape == (4,)
    with pytest.raises(ValueError, match="audit_images"):
        CFG.replace(audit_images=-1)


def test_unknown_attack_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate(tiny_defense(), eval_images(4), CFG, attacks=["pgd_linf2"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    defense = tiny_defense()
    cfg = CFG.replace(purifier_width=4)
    path = tmp_path_factory.mktemp("ckpt") / "defense.pt"
    # the tiny SmallCNN(width 8) does not match the registry's small_cnn: embed it by state dict only
    # where it fits, so use the registry classifier here
    from atop.models import CLASSIFIERS

    return save_checkpoint(path, kind="defense", cfg=cfg, classifier=CLASSIFIERS["small_cnn"](10),
                           purifier=defense.purifier)


def test_cli_writes_eval_json_and_parquet(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    need_data()
    out = tmp_path / "eval"
    code = main(["--checkpoint", str(checkpoint), "--level", "full", "--n-images", "3", "--out", str(out),
                 "--data-dir", str(DATA_DIR), "--steps", "1", "--eot", "1", "--queries", "3", "--repeats", "2",
                 "--attacks", "cw_l2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "WEAKENED" in printed and "steps 1 < 100" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["n_images"] == 3 and report["level"] == "full"
    assert report["budget"] == {"level": "full", "steps": 1, "eot": 1, "queries": 3, "repeats": 2, "precision": "fp32"}
    assert report["weakened"]["eot"] == "1 < 20"
    assert report["screening"] is False and "WEAKENED" in report["description"] and report["split"] == "test"
    assert {"pgd_linf", "pgd_l2", "apgd_dlr_linf", "autoattack_rand_linf", "cw_l2", "square_linf",
            "bpda_linf"} <= set(report["attacks"])
    for entry in report["attacks"].values():
        assert entry["lo"] <= entry["acc"] <= entry["hi"] and 0 <= entry["majority"] <= 1
        assert entry["std_over_draws"] >= 0 and {"eps", "norm", "eot", "repeats"} <= set(entry["settings"])
    assert 0 <= report["worst_case_acc"]["acc"] <= report["clean_acc"]["acc"]
    assert isinstance(report["audit"]["flags"]["gradient_masking_suspected"], bool)
    table = pq.read_table(out / "per_image.parquet").to_pandas()
    assert len(table) == 3 and {"index", "label", "clean_correct", "worst_case_correct"} <= set(table.columns)
    assert table["clean_correct"].dtype == np.bool_
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_cli_screen_outputs_say_they_are_screening(checkpoint: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    need_data()
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(checkpoint), "--level", "screen", "--n-images", "3", "--out", str(out),
                 "--data-dir", str(DATA_DIR)]) == 0
    label = "screening (PGD-10, EOT 2, 1 draw): not a final robustness figure; 3 test images"
    assert label in capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    assert report["screening"] is True and report["description"] == label and report["weakened"] == {}
    assert report["attacks"]["pgd_linf"]["settings"]["steps"] == 10 and report["audit"] is None
    assert report["metrics"]["robust_acc_seen_lo"] <= report["robust_acc_seen"]["acc"]


@pytest.mark.parametrize("args, message", [
    (["--attacks", "pgd_linf,nope"], "unknown attack"),
    (["--eps-linf", "-0.1"], "--eps-linf"),
    (["--n-images", "0"], "--n-images"),
    (["--data-dir", "/nonexistent/data"], "--data-dir"),
    (["--steps", "0"], "--steps"),
])
def test_cli_bad_input(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                       message: str) -> None:
    out = tmp_path / "eval"
    base = ["--checkpoint", str(checkpoint), "--out", str(out), "--data-dir", str(DATA_DIR)]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_missing_and_corrupt_checkpoint(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    for path, message in ((tmp_path / "missing.pt", "does not exist"), (corrupt, "corrupt")):
        out = tmp_path / "eval"
        # the real command, as a user runs it
        proc = subprocess.run([sys.executable, "-m", "atop.evaluate", "--checkpoint", str(path), "--out", str(out)],
                              check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_cli_publishes_its_folder_with_the_mode_a_plain_mkdir_gives(checkpoint: Path, tmp_path: Path) -> None:
    need_data()
    out = tmp_path / "eval"
    old = os.umask(0o027)
    try:
        assert main(["--checkpoint", str(checkpoint), "--level", "screen", "--n-images", "2", "--out", str(out),
                     "--data-dir", str(DATA_DIR), "--steps", "1"]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o750  # not mkdtemp's 0700
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {"eval.json": 0o640,
                                                                         "per_image.parquet": 0o640}


def test_cli_refuses_foreign_checkpoint_files_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    for name, reason in (("folder.pt", "is a folder"), ("empty.pt", "empty file"), ("notes.txt", "corrupt"),
                         ("plain.pt", "not an atop checkpoint")):
        out = tmp_path / "eval"
        assert main(["--checkpoint", str(tmp_path / name), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert name in err and reason in err and ("accepted" in err or "expected" in err), err
        assert "weights_only" not in err and not out.exists()


def test_cli_refuses_a_non_empty_out(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_autoattack_is_scored_as_the_per_draw_worst_case_of_its_components() -> None:
    defense, data = noisy_defense(trained_classifier()), eval_images(32)

    def autoattack():  # a new one per use: its components' random starts begin anew
        return ATTACKS["autoattack_rand_linf"].build(defense, eps=8 / 255, steps=3, eot=2, seed=0)

    clean = measure(defense, data, None, repeats=3)
    ours = measure_attack(defense, data, autoattack(), clean=clean, repeats=3)
    parts, standing = [], clean  # each component gated by what the earlier ones left standing
    for part in autoattack().attacks:
        standing = measure(defense, data, part, clean=standing, repeats=3)
        parts.append(standing)
    assert np.array_equal(ours, np.logical_and.reduce(parts))  # per image and per draw
    first_alone = measure(defense, data, autoattack().attacks[0], clean=clean, repeats=3)
    assert np.array_equal(parts[0], first_alone) and (ours <= first_alone).all()  # never above the first
    assert ours.mean() < clean.mean()  # the attack did something


class CountingAttack:
    """An attack (FGSM, deterministic per image) that records how many images it was given."""

    def __init__(self, model: nn.Module):
        self.inner, self.seen = ATTACKS["fgsm_linf"].build(model, eps=8 / 255), 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.inner(x, y)


def test_images_no_clean_draw_got_right_are_not_attacked_and_the_figures_do_not_change() -> None:
    """Gated by the clean draws, `measure` attacks only the images some draw classified correctly;
    with a deterministic model and attack, every other image's answer is the same as attacking all."""
    model, data = trained_classifier(), eval_images(64)
    clean = measure(model, data, None, batch_size=16)
    assert 0 < clean.sum() < len(data)  # some images wrong on the clean draw: the case holds
    gated, everyone = CountingAttack(model), CountingAttack(model)
    ours = measure(model, data, gated, clean=clean, batch_size=16)  # type: ignore[arg-type]
    plain = measure(model, data, everyone, batch_size=16) & clean  # type: ignore[arg-type]
    assert gated.seen == attacked_count(data, clean) == clean.any(axis=0).sum() and everyone.seen == len(data)
    assert np.array_equal(ours, plain)
    assert 0 < ours.sum() < clean.sum()  # the attack did something and left something standing
    nobody = CountingAttack(model)
    assert not measure(model, data, nobody, clean=np.zeros_like(clean), batch_size=16).any()  # type: ignore[arg-type]
    assert nobody.seen == 0


def test_a_random_defense_is_attacked_where_any_clean_draw_was_right() -> None:
    defense, data = noisy_defense(trained_classifier()), eval_images(32)
    clean = measure(defense, data, None, repeats=3)
    some = clean.any(axis=0)
    assert (clean.all(axis=0) != some).any()  # some images right on some draws only: the case holds
    attack = CountingAttack(defense)
    measure(defense, data, attack, clean=clean, repeats=3)  # type: ignore[arg-type]
    assert attack.seen == some.sum()


def test_bf16_evaluation_is_said_and_its_attack_is_no_weaker_than_fp32() -> None:
    """`eval_precision: bf16` runs the defense under autocast while it is attacked and scored: the
    report says so, clean accuracy agrees with fp32, and PGD (deterministic model, an eps small enough
    that neither precision reaches 0) leaves no more images standing than in fp32, give or take one."""
    model, data = trained_classifier(), eval_images(64)
    cfg = CFG.replace(n_eval=64, batch_size=64, unseen_attacks="fgsm_linf", eval_eps_linf=1 / 255)
    fp32 = evaluate(model, data, cfg, level="screen", steps=10, eot=1)
    bf16 = evaluate(model, data, cfg.replace(eval_precision="bf16"), level="screen", steps=10, eot=1)
    assert "precision" in fp32.budget and "bf16" not in fp32.description
    assert bf16.budget["precision"] == "bf16" and "run in bf16 (autocast)" in bf16.description
    assert abs(bf16.metrics["clean_acc"] - fp32.metrics["clean_acc"]) <= 2 / 64
    assert 0 < fp32.metrics["robust_acc_seen"] < fp32.metrics["clean_acc"]  # the comparison means something
    assert bf16.metrics["robust_acc_seen"] <= fp32.metrics["robust_acc_seen"] + 1 / 64


def test_an_evaluation_keeps_the_seen_attack_s_images_it_scored() -> None:
    """`EvalResult.examples`: the first images as the seen attack left them and as they were scored
    (deterministic model: classifying the kept images gives the scored answers), the clean image
    where nothing was attacked (every clean draw wrong)."""
    model, data = trained_classifier(), eval_images(16)
    cfg = Config.from_dict({"n_eval": 16, "batch_size": 4, "unseen_attacks": "fgsm_linf"})
    result = evaluate(model, data, cfg, level="screen", steps=3)
    examples = result.examples
    assert examples is not None and examples.attack == seen_attack(cfg) == "pgd_linf"
    assert examples.images.shape == (EXAMPLE_IMAGES, 3, 32, 32)
    clean = result.per_example["clean_correct"][:EXAMPLE_IMAGES]
    assert 0 < clean.sum() < EXAMPLE_IMAGES  # some attacked, some not: the case holds
    assert np.array_equal(examples.attacked, clean)
    shown = data.x[:EXAMPLE_IMAGES].float() / 255
    moved = (examples.images - shown).abs().amax(dim=(1, 2, 3))
    assert (moved[~clean] == 0).all() and (moved[clean] > 0).all()
    assert (moved <= cfg.eval_eps_linf + 1e-6).all()
    with torch.no_grad():
        answers = (model(examples.images).argmax(1) == data.y[:EXAMPLE_IMAGES]).numpy()
    scored = result.per_example["pgd_linf_correct"][:EXAMPLE_IMAGES]
    assert np.array_equal(answers & clean, scored)
