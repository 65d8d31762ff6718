"""A two-parameter space for load tests and CI: the RT type and lambda (seconds per trial).

Uses the cheapest training attack (FGSM against the classifier alone).
"""
from __future__ import annotations

from typing import Any

import optuna

from atop.config import RTType
from search_spaces.paper import FIXED as PAPER_FIXED

FIXED: dict[str, Any] = dict(PAPER_FIXED)


def suggest(trial: optuna.trial.BaseTrial) -> dict[str, Any]:
    return {"rt": trial.suggest_categorical("rt", [rt.value for rt in RTType]),
            "lambda_ce": trial.suggest_float("lambda_ce", 0.01, 1.0, log=True)}
