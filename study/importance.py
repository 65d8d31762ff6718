"""Which searched hyperparameters move each objective: Optuna's fANOVA importances, per objective.

The driver computes them at the end of each run from the study's own COMPLETE trials (feasible or not:
importance describes the response surface, not the front), prints them, and logs them to the
study's parent run as metrics `importance/<objective>/<param>` (each objective's importances sum
to 1) with `importance/n_trials`; `analysis` puts them in report.md. They are point estimates of a
random forest fitted to the trials (seeded, so reproducible) with no interval: with few trials
they are indicative only, and the printed table says over how many trials they were fitted.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import optuna
from optuna.trial import TrialState

from study.tables import columns
from study.warmstart import own
from tracking.contract import (
    IMPORTANCE_METRIC,
    IMPORTANCE_TRIALS_METRIC,
    OBJECTIVES,
    importance_order,
)

#: fewer COMPLETE trials than this and no importance is computed (a forest on 3 points says nothing)
MIN_TRIALS = 5


def importances(study: optuna.Study, seed: int = 0) -> dict[str, dict[str, float]]:
    """Objective -> searched parameter -> fANOVA importance (sums to 1 per objective).

    Empty when fewer than `MIN_TRIALS` trials are COMPLETE or no parameter varies over them; an
    objective with nothing to attribute (the same value in every trial, or a forest that explains
    none of its variance) is left out.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(own(complete)) < len(complete):  # `--warm-start` copies: this study's trials only
        complete = own(complete)
        study = optuna.create_study(directions=study.directions)
        study.add_trials(complete)
    if len(complete) < MIN_TRIALS:
        return {}
    varying = [p for p in sorted({p for t in complete for p in t.params})
               if all(p in t.params for t in complete) and len({repr(t.params[p]) for t in complete}) > 1]
    if not varying:
        return {}
    out = {}
    for k, objective in enumerate(OBJECTIVES):
        if len({t.values[k] for t in complete}) < 2:
            continue
        try:
            out[objective] = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed), params=varying,
                target=functools.partial(_value, k))
        except (RuntimeError, ValueError):  # fANOVA: "zero total variance in all trees" (explains nothing)
            continue
    return out


def _value(k: int, trial: optuna.trial.FrozenTrial) -> float:
    return trial.values[k]


def metrics(found: Mapping[str, Mapping[str, float]], n_trials: int) -> dict[str, float]:
    """The parent run's metrics of `found` (see the module docstring)."""
    if not found:
        return {}
    return {IMPORTANCE_TRIALS_METRIC: float(n_trials),
            **{IMPORTANCE_METRIC.format(objective=o, param=p): float(v)
               for o, by_param in found.items() for p, v in by_param.items()}}


def table(found: Mapping[str, Mapping[str, float]], n_trials: int) -> str:
    """The importances as a text table, parameters as rows (most important first on average)."""
    if not found:
        return (f"hyperparameter importances: not computed ({n_trials} complete trial(s); at least "
                f"{MIN_TRIALS}, with a parameter and an objective that vary, are needed)")
    rows = [[p, *(f"{found[o].get(p, 0.0):.2f}" for o in found)] for p in importance_order(found)]
    title = (f"hyperparameter importances (Optuna fANOVA over {n_trials} complete trials; each objective's "
             "sum to 1; a point estimate without an interval, indicative with few trials):")
    missing = [o for o in OBJECTIVES if o not in found]
    note = [f"not attributed (no variance the parameters explain): {', '.join(missing)}"] if missing else []
    return "\n".join([title, *columns(["parameter", *found], rows), *note])
