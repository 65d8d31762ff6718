"""A two-parameter space for load tests and CI: the RT type and lambda (seconds per trial).

Uses the cheapest training attack (FGSM against the classifier alone).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from search_spaces.paper import FIXED as PAPER_FIXED
from search_spaces.paper import RTS

if TYPE_CHECKING:  # a space only calls trial methods: listing or checking spaces needs no Optuna
    import optuna

FIXED: dict[str, Any] = dict(PAPER_FIXED)


def suggest(trial: optuna.trial.BaseTrial) -> dict[str, Any]:
    return {"rt": trial.suggest_categorical("rt", list(RTS)),
            "lambda_ce": trial.suggest_float("lambda_ce", 0.01, 1.0, log=True)}
