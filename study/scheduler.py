"""Multi-objective asynchronous successive halving (MO-ASHA) as a Ray Tune scheduler.

Schmucker et al., "Multi-objective Asynchronous Successive Halving" (2021): ASHA's rungs, with the
single-metric cutoff replaced by a non-dominated sort over all objectives. Rungs sit at epochs
`grace_period * eta**k` below the trial's last epoch. When a trial reports the epoch of a rung, its
objective vector (all `tracking.contract.OBJECTIVES`, maximised) is compared with the vectors every
earlier trial had at that rung: it continues if it is among the best `max(1, floor(n / eta))` of
the `n` vectors by (Pareto rank, then NSGA-II crowding distance), else it is stopped. A trial that
ties the cutoff continues (as ASHA's `<` cutoff) unless its vector duplicates one recorded earlier
(it would add no hypervolume); the first trial at a rung always continues.

A stopped trial reaches the searcher's `on_trial_complete` with a result before its last epoch,
so `study.searcher.AskTellSearcher` tells Optuna PRUNED (never COMPLETE with partial values, which
is what plain ASHA + OptunaSearch does) and the driver tags its MLflow run `atop.stopped=true`.

Rung records survive the driver: the searcher keeps each trial's objective vector at every epoch in
the Optuna trial's user attribute `ATTR_EPOCH_OBJECTIVES`, and `MOASHAScheduler.restore_trials`
rebuilds the records from the stored trials when a resumed driver starts. Records are keyed by
Optuna trial number, so a trial a killed driver left running keeps its rung decisions through the
trial that reruns its parameters (user attr `rerun_of`).

    python study/run.py --preset tiny --scheduler mo-asha --grace-period 1 --reduction-factor 3

`decide` is the whole rule as a pure function; `MOASHAScheduler` is a thin Ray wrapper over it.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import moocore
import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from tracking.contract import (
    ATTR_INTERRUPTED,
    ATTR_RERUN_OF,
    ATTR_STOPPED_AT,
    EPOCH,
    FAILED_KEY,
    OBJECTIVES,
    TRIAL_NUMBER,
)

#: Optuna user attr: {"<epoch>": {"at": unix time seen, "values": [objective, ...]}}, one entry per
#: reported epoch (written by `study.searcher.AskTellSearcher`, read by `MOASHAScheduler.restore_trials`)
ATTR_EPOCH_OBJECTIVES = "objectives_by_epoch"


def objective_vector(result: Mapping[str, Any], objectives: Sequence[str] = OBJECTIVES) -> list[float] | None:
    """The result's objective vector, or None for a failure report or a result missing an objective."""
    if result.get(FAILED_KEY) or EPOCH not in result or any(o not in result for o in objectives):
        return None
    return [float(result[o]) for o in objectives]


def rungs(grace_period: int, eta: float, max_t: int) -> list[int]:
    """Rung epochs `grace_period * eta**k` strictly below `max_t` (a trial ends at `max_t` anyway).

    Args:
        grace_period: first rung, in epochs (>= 1).
        eta: reduction factor (> 1).
        max_t: the trials' last epoch.

    Returns:
        Increasing, distinct epochs; empty when `grace_period >= max_t`.
    """
    out: list[int] = []
    k = 0
    while (m := round(grace_period * eta ** k)) < max_t:
        if not out or m > out[-1]:
            out.append(m)
        k += 1
    return out


def crowding_distance(points: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each point within its own front (inf at each front's ends).

    Args:
        points: `(n, m)` objective values.
        ranks: `(n,)` Pareto rank of each point (points of equal rank form one front).

    Returns:
        `(n,)` distances >= 0; a front of one or two points is all inf; ties in an objective are
        ordered by index (stable sort), as in NSGA-II implementations.
    """
    dist = np.zeros(len(points))
    for r in np.unique(ranks):
        idx = np.flatnonzero(ranks == r)
        if len(idx) <= 2:
            dist[idx] = np.inf
            continue
        for j in range(points.shape[1]):
            order = idx[np.argsort(points[idx, j], kind="stable")]
            values = points[order, j]
            span = values[-1] - values[0]
            if span > 0:  # an objective constant over the front separates nothing
                dist[order[0]] = dist[order[-1]] = np.inf
                dist[order[1:-1]] += (values[2:] - values[:-2]) / span
    return dist


def decide(rung_records: Sequence[Sequence[float]], new_vector: Sequence[float], eta: float) -> bool:
    """Whether a trial reaching a rung continues (True) or is stopped (False); all objectives maximised.

    Args:
        rung_records: objective vectors of the trials recorded earlier at this rung (`(n-1, m)`).
        new_vector: the arriving trial's objective vector (`(m,)`).
        eta: reduction factor (> 1): about 1 in `eta` trials passes each rung.

    Returns:
        True when fewer than `max(1, floor(n / eta))` recorded vectors beat the new one, where `a`
        beats `b` if `a` has a lower Pareto rank, or the same rank and a larger crowding distance,
        among all `n` vectors, or is equal to `b` (a duplicate adds no hypervolume). Other ties go
        to the new trial.
    """
    new = np.asarray(new_vector, dtype=float).reshape(1, -1)
    if len(rung_records) == 0:
        return True
    points = np.vstack([np.asarray(rung_records, dtype=float).reshape(-1, new.shape[1]), new])
    n = len(points)
    keep = max(1, math.floor(n / eta))
    ranks = moocore.pareto_rank(points, maximise=True)
    crowd = crowding_distance(points, ranks)
    r, c = ranks[-1], crowd[-1]
    others_r, others_c = ranks[:-1], crowd[:-1]
    # an exact copy of a recorded vector adds no hypervolume to the rung: the earlier trial holds it
    duplicate = np.all(points[:-1] == points[-1], axis=1)
    beaten_by = int(np.sum((others_r < r) | ((others_r == r) & ((others_c > c) | duplicate))))
    return beaten_by < keep


class MOASHAScheduler(FIFOScheduler):
    """Stops a trial at a rung when it is not in the best 1/eta there (see the module docstring).

    Args:
        max_t: the trials' last epoch (a trial's own `epochs` config value wins when present).
        grace_period: first rung, in epochs.
        reduction_factor: eta (> 1).
        objectives: result keys, all maximised.
        time_attr: the result key counting epochs.
    """

    def __init__(self, max_t: int, grace_period: int = 1, reduction_factor: float = 3,
                 objectives: Sequence[str] = OBJECTIVES, time_attr: str = EPOCH):
        super().__init__()
        if grace_period < 1 or reduction_factor <= 1:
            raise ValueError(f"MO-ASHA needs grace_period >= 1 and reduction_factor > 1, got "
                             f"{grace_period} and {reduction_factor}")
        self.max_t, self.grace_period, self.eta = max_t, grace_period, reduction_factor
        self.objectives, self.time_attr = tuple(objectives), time_attr
        #: rung epoch -> trial key (Optuna trial number, else Tune trial id) -> objective vector
        self.records: dict[int, dict[str, list[float]]] = {}
        self.stopped: dict[str, int] = {}  # trial key -> the rung it was stopped at
        self._supports_buffered_results = False  # one decision per reported epoch

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the objectives are fixed; Tune's metric/mode are unused

    def trials_for(self, n: int) -> int:
        """Trials to start for about `n` to pass every rung: `n * eta ** rungs` (about 1 in eta passes
        each). The searcher's cap: when ties at a rung stop nearly everything (all trials with the
        same accuracies), the study still ends."""
        return math.ceil(n * self.eta ** len(rungs(self.grace_period, self.eta, self.max_t)))

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        vector = objective_vector(result, self.objectives)
        if vector is None or self.time_attr not in result:
            return TrialScheduler.CONTINUE
        epoch = int(result[self.time_attr])
        config = getattr(trial, "config", {})
        last = int(config.get("epochs") or self.max_t)
        # the Optuna trial number outlives the Tune trial (a resumed driver makes new Tune trials)
        key = str(config[TRIAL_NUMBER]) if TRIAL_NUMBER in config else trial.trial_id
        for milestone in reversed(rungs(self.grace_period, self.eta, last)):
            if epoch < milestone:
                continue
            recorded = self.records.setdefault(milestone, {})
            if key in recorded:  # already decided here (a restored or rerun trial reporting again)
                break
            keep = decide(list(recorded.values()), vector, self.eta)
            recorded[key] = vector
            if not keep:
                self.stopped[key] = milestone
                return TrialScheduler.STOP
            break
        return TrialScheduler.CONTINUE

    def restore_trials(self, trials: Iterable[Any]) -> None:
        """Rebuild the rung records from an Optuna study's stored trials (a resumed driver starts here).

        Each trial's vectors at rung epochs (`ATTR_EPOCH_OBJECTIVES`) go into the rungs in the order
        the searcher saw them. A trial a killed driver interrupted (user attr `interrupted`) hands
        its records to the trial rerunning its parameters (`rerun_of`, followed through repeated
        interruptions): the rerun keeps the decisions already made for it instead of meeting a
        duplicate of itself. PRUNED trials are counted as stopped at `stopped_at_epoch`.

        Args:
            trials: `optuna.study.Study.get_trials()` (FrozenTrials, any state).
        """
        by_number = {t.number: t for t in trials}
        rerun_by = {t.user_attrs[ATTR_RERUN_OF]: t.number for t in by_number.values() if ATTR_RERUN_OF in t.user_attrs}

        def owner(number: int) -> int | None:
            """The trial that holds `number`'s decisions: itself, or the rerun of an interrupted trial."""
            while by_number[number].user_attrs.get(ATTR_INTERRUPTED):
                if rerun_by.get(number) not in by_number:  # never rerun: its records mean nothing now
                    return None
                number = rerun_by[number]
            return number

        entries: list[tuple[float, int, str, list[float]]] = []
        for t in by_number.values():
            if t.state.name == "PRUNED" and ATTR_STOPPED_AT in t.user_attrs:
                self.stopped[str(t.number)] = int(t.user_attrs[ATTR_STOPPED_AT])
            key = owner(t.number)
            if key is None:
                continue
            for epoch, entry in t.user_attrs.get(ATTR_EPOCH_OBJECTIVES, {}).items():
                entries.append((float(entry["at"]), int(epoch), str(key), [float(v) for v in entry["values"]]))
        milestones = set(rungs(self.grace_period, self.eta, self.max_t))
        for _, epoch, owner_key, vector in sorted(entries):
            if epoch in milestones:
                self.records.setdefault(epoch, {}).setdefault(owner_key, vector)

    def debug_string(self) -> str:
        seen = ", ".join(f"epoch {m}: {len(r)}" for m, r in sorted(self.records.items())) or "none yet"
        return f"Using MO-ASHA (eta={self.eta:g}): {len(self.stopped)} stopped; trials per rung: {seen}"

    def save(self, checkpoint_path: str) -> None:
        """Rung records as JSON: nothing of a study is ever unpickled (docs/RELIABILITY.md)."""
        records = {str(m): {t: [float(v) for v in vec] for t, vec in r.items()} for m, r in self.records.items()}
        with open(checkpoint_path, "w") as f:
            json.dump({"records": records, "stopped": self.stopped}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        self.records = {int(m): r for m, r in state["records"].items()}
        self.stopped = state["stopped"]
