"""Hyperparameter importances (study/importance.py): real Optuna fANOVA on a study whose objectives
each depend on one parameter, logged as the parent run's metrics and read back by `analysis`."""
from __future__ import annotations

import numpy as np
import optuna
import pyarrow as pa

from analysis.report import _importance_section
from analysis.report import importances as read_back
from study.importance import MIN_TRIALS, importances, metrics, table
from tracking.contract import DIRECTIONS, OBJECTIVES


def _study(n: int) -> optuna.Study:
    """clean_acc follows lambda_ce, robust_acc_seen follows rt, robust_acc_unseen follows neither."""
    rng = np.random.default_rng(0)
    study = optuna.create_study(directions=list(DIRECTIONS))
    dists = {"rt": optuna.distributions.CategoricalDistribution(["rt1", "rt2", "rt3"]),
             "lambda_ce": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for i in range(n):
        rt, lam = ["rt1", "rt2", "rt3"][i % 3], float(rng.uniform())
        values = [0.2 + 0.6 * lam, {"rt1": 0.1, "rt2": 0.5, "rt3": 0.3}[rt], float(rng.uniform(0.3, 0.31))]
        study.add_trial(optuna.trial.create_trial(values=values, params={"rt": rt, "lambda_ce": lam},
                                                  distributions=dists))
    return study


def test_each_objective_is_attributed_to_the_parameter_it_follows():
    found = importances(_study(30))
    assert set(found) == set(OBJECTIVES)
    assert found["clean_acc"]["lambda_ce"] > 0.8 and found["robust_acc_seen"]["rt"] > 0.8
    for by_param in found.values():
        assert abs(sum(by_param.values()) - 1.0) < 1e-6
    assert importances(_study(30)) == found  # seeded: the same study gives the same figures
    text = table(found, 30)
    assert "fANOVA over 30 complete trials" in text and text.splitlines()[3].startswith("lambda_ce")


def test_an_objective_that_never_varies_is_left_out_not_an_error():
    """The tiny preset's trials often score the same on 8 images: fANOVA raises on zero variance."""
    study = optuna.create_study(directions=list(DIRECTIONS))
    dists = {"lambda_ce": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for i in range(6):
        study.add_trial(optuna.trial.create_trial(values=[0.125, 0.125, 0.1 * i], params={"lambda_ce": 0.1 * i},
                                                  distributions=dists))
    found = importances(study)
    assert list(found) == ["robust_acc_unseen"] and found["robust_acc_unseen"]["lambda_ce"] == 1.0
    assert "not attributed (no variance the parameters explain): clean_acc, robust_acc_seen" in table(found, 6)
    flat = optuna.create_study(directions=list(DIRECTIONS))
    for i in range(6):
        flat.add_trial(optuna.trial.create_trial(values=[0.125] * 3, params={"lambda_ce": 0.1 * i},
                                                 distributions=dists))
    assert importances(flat) == {}


def test_too_few_trials_compute_nothing_and_say_so():
    assert importances(_study(MIN_TRIALS - 1)) == {}
    assert metrics({}, 4) == {}
    assert "not computed (4 complete trial(s)" in table({}, 4)


def test_the_parent_runs_metrics_read_back_in_analysis():
    found = importances(_study(12))
    logged = metrics(found, 12)
    assert logged["importance/n_trials"] == 12 and "importance/clean_acc/lambda_ce" in logged
    row = {"run_id": "parent", "role": "study", **{f"final.{k}": v for k, v in logged.items()}}
    trial = {"run_id": "t0", "role": "trial", **{f"final.{k}": None for k in logged}}
    back, n = read_back(pa.Table.from_pylist([trial, row]), "parent")
    assert n == 12 and back == {o: {p: v for p, v in by.items()} for o, by in found.items()}
    assert read_back(pa.Table.from_pylist([trial]), "parent") == ({}, 0)
    section = "\n".join(_importance_section(back, n))
    assert "## Hyperparameter importances" in section and "over the study's 12 complete trials" in section
    assert f"| lambda_ce | {found['clean_acc']['lambda_ce']:.2f} |" in section
