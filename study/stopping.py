"""Ending the search before `--num-trials`: a time budget and a plateau of the front.

    --time-budget 2.5            no new trial starts 2.5 hours after this driver started
    --stop-on-plateau 8,0.002    no new trial starts once the last 8 finished trials together grew
                                 the front's hypervolume by 0.002 or less

Both stop gracefully: a trial already running runs to its last epoch and is told as usual (so the
search can end up to one trial's duration after the budget), and the confirm stage follows; it is
bounded by `--confirm-top` x `--confirm-seeds` and not part of the budget. The budget is this
driver's: a `--resume` starts a new one.

The hypervolume is that of the feasible COMPLETE trials' objective vectors (accuracies, all
maximised) against the reference point 0, as `analysis` computes it: a number in [0, 1], so EPS is
absolute. "Finished" trials are those `--num-trials` counts (COMPLETE or FAIL), in the order they
ended, the study's earlier runs included; a FAIL adds nothing to the front and so counts towards a
plateau.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import moocore
import numpy as np
import optuna

from study.constraints import infeasible
from study.errors import StudyError
from study.resume import COUNTED_STATES
from study.warmstart import own


@dataclass(frozen=True)
class Plateau:
    """`--stop-on-plateau K,EPS`."""

    trials: int  # K: finished trials in the window
    eps: float  # EPS: the most hypervolume the window may add and still be a plateau

    @classmethod
    def parse(cls, text: str) -> Plateau:
        """`K,EPS` with K an integer >= 1 and EPS a number >= 0; else a one-line `StudyError`."""
        accepted = "accepted: K,EPS with K an integer >= 1 and EPS a number >= 0 (e.g. 8,0.002)"
        head, sep, tail = str(text).partition(",")
        try:
            trials, eps = int(head), float(tail)
        except ValueError:
            raise StudyError(f"--stop-on-plateau {text!r} is not K,EPS; {accepted}") from None
        if not sep or trials < 1 or not eps >= 0 or math.isinf(eps):
            raise StudyError(f"--stop-on-plateau {text!r} is out of range; {accepted}")
        return cls(trials, eps)

    def reached(self, study: optuna.Study) -> str | None:
        """Why the search should stop (a sentence), or None while the front still grows."""
        finished = sorted(own(study.get_trials(deepcopy=False, states=COUNTED_STATES)),
                          key=lambda t: (t.datetime_complete or 0, t.number))
        if len(finished) < self.trials:
            return None
        before = front_hypervolume(finished[: len(finished) - self.trials])
        growth = front_hypervolume(finished) - before
        if growth > self.eps:
            return None
        return (f"the last {self.trials} finished trials grew the front's hypervolume by {growth:.4g} "
                f"(<= {self.eps:g}, --stop-on-plateau)")


def front_hypervolume(trials: list[optuna.trial.FrozenTrial]) -> float:
    """Hypervolume of the feasible COMPLETE trials among `trials` (reference point 0)."""
    points = [t.values for t in trials if t.state == optuna.trial.TrialState.COMPLETE and not infeasible(t)]
    if not points:
        return 0.0
    return float(moocore.hypervolume(np.array(points, dtype=float), ref=np.zeros(len(points[0])), maximise=True))


def check_time_budget(hours: float | None) -> None:
    """A one-line `StudyError` unless `hours` is None or a finite number > 0."""
    if hours is not None and (isinstance(hours, bool) or not isinstance(hours, (int, float))
                              or not 0 < hours < math.inf):
        raise StudyError(f"--time-budget {hours!r} is out of range; accepted: a number of hours > 0 (e.g. 2.5)")


@dataclass(frozen=True)
class SearchStop:
    """What may end a search early; `AskTellSearcher` asks it before each new trial."""

    deadline: float | None = None  # time.time() after which no trial starts
    budget_h: float | None = None  # the --time-budget the deadline came from (for the message)
    plateau: Plateau | None = None

    @classmethod
    def of(cls, time_budget_h: float | None, stop_on_plateau: str | None, started: float) -> SearchStop | None:
        """The stop of a study's settings (None when it has neither), the budget counted from `started`."""
        if time_budget_h is None and stop_on_plateau is None:
            return None
        deadline = started + time_budget_h * 3600 if time_budget_h is not None else None
        return cls(deadline, time_budget_h, Plateau.parse(stop_on_plateau) if stop_on_plateau else None)

    def expired(self, now: float | None = None) -> str | None:
        """Why no trial may start any more because of the time budget, or None."""
        if self.deadline is None or (now if now is not None else time.time()) < self.deadline:
            return None
        return f"the time budget of {self.budget_h:g} h is spent (--time-budget)"

    def plateaued(self, study: optuna.Study) -> str | None:
        """Why no trial may start any more because the front stopped growing, or None."""
        return self.plateau.reached(study) if self.plateau is not None else None
