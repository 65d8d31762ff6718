"""The trial contract (`tracking.contract`): stored names frozen, copies agree, analysis stays light."""
from __future__ import annotations

import subprocess
import sys

import optuna

from atop.config import EvalLevel
from atop.evaluate import LEVEL_ATTACKS, LEVELS
from tests.conftest import REPO
from tracking.contract import (
    ATTACK_FIGURE_PREFIX,
    ATTR_RESUME_FROM,
    AUTOATTACK_FIGURE,
    CHECKPOINT_FILES,
    DIRECTIONS,
    OBJECTIVES,
    ROLE_TAG,
    TRIAL_KEYS,
    TRIAL_TAG,
    Role,
    TrialSummary,
    eval_level_note,
)

OK = {"clean_acc": 0.5, "robust_acc_seen": 0.25, "robust_acc_unseen": 0.125, "epoch": 2, "compute_s": 3.0}


def test_stored_names_are_frozen():
    # Optuna storages and MLflow stores of earlier studies hold these strings: a rename breaks
    # --resume and analysis of every existing study, so this test pins them (the one literal copy).
    assert OBJECTIVES == ("clean_acc", "robust_acc_seen", "robust_acc_unseen")
    assert DIRECTIONS == ("maximize",) * 3
    assert (ROLE_TAG, TRIAL_TAG, Role.STUDY.value, Role.TRIAL.value) == (
        "atop.role", "optuna.trial_number", "study", "trial")
    assert TRIAL_KEYS == ("optuna_trial_number", "mlflow_run_id", "atop_resume_from", "atop_trial_label")
    # a rerun's user attr names the checkpoint it starts from, in the files a trial checkpoints
    assert (ATTR_RESUME_FROM, CHECKPOINT_FILES) == ("resume_from", ("defense.pt", "trainer_state.pt"))


def test_the_driver_the_scheduler_and_analysis_use_the_contract():
    from analysis.__main__ import parse_args
    from study.scheduler import MOASHAScheduler

    assert tuple(parse_args(["--mlflow-uri", "sqlite:////x.db", "--experiment", "e", "--out", "o"]).objectives) \
        == OBJECTIVES
    assert tuple(MOASHAScheduler(max_t=3).objectives) == OBJECTIVES
    study = optuna.create_study(directions=list(DIRECTIONS))
    assert [d.name.lower() for d in study.directions] == list(DIRECTIONS)


def test_the_autoattack_figure_names_the_ensemble_the_final_levels_run():
    # atop names the attack, the contract names its figure (atop imports nothing outside atop)
    attack = AUTOATTACK_FIGURE.removeprefix(ATTACK_FIGURE_PREFIX)
    assert all(attack in LEVEL_ATTACKS[level] for level in (EvalLevel.LIGHT, EvalLevel.FULL))


def test_trial_summary_of_a_result():
    ok = TrialSummary.of(OK)
    assert not ok.failed and ok.values == (0.5, 0.25, 0.125) and ok.epoch == 2 and ok.compute_s == 3.0
    assert TrialSummary.of({"atop_failed": 1, "atop_error": "boom"}) == TrialSummary(failed=True, error="boom")
    assert TrialSummary.of(None).error == "no result reported"
    assert TrialSummary.of({"clean_acc": 1.0}).error == "result lacks robust_acc_seen, robust_acc_unseen"


def test_eval_level_note_says_screening_figures_are_not_final():
    screen = eval_level_note(EvalLevel.SCREEN.value, LEVELS[EvalLevel.SCREEN])
    assert screen == "screen level: PGD-10, EOT 2, 1 draw; not final"
    full = eval_level_note(EvalLevel.FULL.value, LEVELS[EvalLevel.FULL])
    assert full == "full level: PGD-100, EOT 20, 5 draws"
    light = eval_level_note(EvalLevel.LIGHT.value, LEVELS[EvalLevel.LIGHT], precision="bf16", audit_images=100)
    assert light == ("light level: PGD-20, EOT 4, 3 draws, the defense in bf16, Square 1000 queries, "
                     "AutoAttack-rand, audit on the first 100 images; lighter than full")


def test_analysis_imports_neither_torch_nor_ray():
    code = ("import sys, analysis, analysis.load, analysis.compute, analysis.draw, analysis.report, "
            "analysis.__main__; heavy = sorted({'torch', 'ray'} & set(sys.modules)); print(heavy); "
            "sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_atop_evaluation_reports_every_objective_of_the_contract():
    # atop/ writes the metric names itself (it imports nothing outside atop): check they agree.
    import torch

    from atop.config import Config
    from atop.data import Split
    from atop.defense import Defense
    from atop.evaluate import evaluate
    from atop.models import CLASSIFIERS, PURIFIERS
    from atop.transforms import RandomTransform

    cfg = Config.from_dict({"n_eval": 2, "batch_size": 2, "purifier_width": 4, "unseen_attacks": "fgsm_linf"})
    torch.manual_seed(0)
    defense = Defense(RandomTransform.from_config(cfg), PURIFIERS["unet"](4), CLASSIFIERS["small_cnn"](10), seed=0)
    data = Split(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.tensor([1, 2]))
    result = evaluate(defense.eval(), data, cfg, level="screen", steps=1, eot=1)
    assert set(OBJECTIVES) <= set(result.metrics)
    assert TrialSummary.of({**result.metrics, "epoch": 1}).values == tuple(result.metrics[m] for m in OBJECTIVES)


def test_importance_tables_list_parameters_most_important_first_over_all_objectives():
    from tracking.contract import importance_order

    found = {"clean_acc": {"lr": 0.7, "rt": 0.3}, "robust_acc_seen": {"rt": 0.9, "lambda_ce": 0.1}}
    assert importance_order(found) == ["rt", "lr", "lambda_ce"]  # 1.2, 0.7, 0.1
    assert importance_order({}) == []
