"""The Optuna study is the single source of truth: a Ray Tune `Searcher` driving it by ask/tell.

Ray's `OptunaSearch` writes trial states itself and cannot record PRUNED for a multi-objective
study, and `Tuner.restore` has lost searcher state before; here the driver asks the RDB-stored study
for each trial and tells it COMPLETE, PRUNED (stopped before its last epoch, e.g. by a scheduler) or
FAIL. Each asked trial gets exactly one MLflow child run, made here, whose id travels in the Tune
config with the Optuna trial number. Each trial's objective vector at every reported epoch is kept
in its user attrs (`study.scheduler.ATTR_EPOCH_OBJECTIVES`): MO-ASHA's rung records, rebuilt on resume.

`n_trials` counts trials that end COMPLETE or FAIL (`study.resume.COUNTED_STATES`); given
`max_trials`, a trial a scheduler stops early (PRUNED) is replaced by a new one, so that
`--num-trials` with MO-ASHA still yields that many trials run to their last epoch, up to a cap
(`study.scheduler.MOASHAScheduler.trials_for`) that ends a study whose rungs let nothing through.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from atop.config import Config, ConfigError
from search_spaces import Space
from study.constraints import Constraint
from study.interrupt import StopRequest
from study.resume import COUNTED_STATES
from study.scheduler import ATTR_EPOCH_OBJECTIVES, objective_vector
from study.stopping import SearchStop
from study.trial_lines import say
from tracking.contract import (
    ATTR_ERROR,
    ATTR_INTERVALS,
    ATTR_REFERENCE,
    ATTR_RESUME_FROM,
    ATTR_RUN_ID,
    ATTR_STOPPED_AT,
    COMPUTE_S,
    EPOCH,
    IMAGES_PER_S,
    RESUME_FROM,
    RUN_ID,
    TRIAL_LABEL,
    TRIAL_NUMBER,
    TrialSummary,
)

#: (trial number, state, summary) -> None: settles the trial's MLflow run
Settle = Callable[[int, TrialState, TrialSummary], None]


def trial_label(trial: optuna.trial.BaseTrial) -> str:
    """How the driver's lines name `trial`: `trial 3 (lambda_ce=0.09459, rt=rt2)`, with an enqueued
    reference's name first (`trial 0 (rt2-atop-fgsm: arm=rt2-atop-fgsm)`). Only the parameters the
    space suggested: a conditional one it skipped (RT3's `num_masks` for RT2) is not shown."""
    values = ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                       for name, value in sorted(trial.params.items()))
    reference = trial.user_attrs.get(ATTR_REFERENCE)
    inside = f"{reference}: {values}" if reference and values else reference or values
    return f"trial {trial.number} ({inside})" if inside else f"trial {trial.number}"


class AskTellSearcher(Searcher):
    """Asks `study` for trials until `n_trials` of them end COMPLETE or FAIL; suggests from `space`
    over `base`, tells results.

    Args:
        study: the Optuna study (several objectives, all maximised).
        space: the search space.
        base: the config every trial starts from (`StudySettings.base_config()`).
        n_trials: how many trials should end COMPLETE or FAIL in this run of the driver.
        new_run: trial number -> MLflow child run id (created by the driver).
        settle: called once per finished trial with its final Optuna state.
        max_trials: a scheduler may stop trials early: ask one more trial for each PRUNED one, at
            most `max_trials` in all (suggest answers None, "not now", while the running trials
            could still fill `n_trials`). None: ask exactly `n_trials` trials.
        log: where the line saying the cap ended the search goes (default `say`). Never `print`
            itself: Tune pickles the searcher with its experiment, and Ray's tqdm support replaces
            `builtins.print` once a worker's output reaches the driver, after which the original
            `print` no longer pickles ("it's not the same object as builtins.print").
        constraints: `--constraint`s, set on each COMPLETE trial before it is told.
        stop: `--time-budget` / `--stop-on-plateau` (`study.stopping`): once it says so, no new
            trial is asked; `stopped` then holds why, for the driver's report.
        interrupt: the stop request of SIGTERM or Ctrl+C (`study.interrupt`): once set, no new trial is asked (Tune
            ends the running ones; the driver settles them).
    """

    def __init__(self, study: optuna.Study, space: Space, base: Config, n_trials: int,
                 new_run: Callable[[int], str | None], settle: Settle, constraints: Sequence[Constraint] = (),
                 max_trials: int | None = None, log: Callable[[str], None] | None = None,
                 stop: SearchStop | None = None, interrupt: StopRequest | None = None):
        super().__init__(metric=None, mode=None)
        self.study, self.space, self.base, self.n_trials = study, space, base.to_dict(), n_trials
        self.new_run, self.settle, self.max_trials, self.log = new_run, settle, max_trials, log or say
        self.constraints = tuple(constraints)
        self.stop, self.interrupt = stop, interrupt
        self.stopped: str | None = None  # why `stop` ended the search
        self.counted = 0  # trials asked here that ended COMPLETE or FAIL
        self.pruned = 0
        self.capped = False  # max_trials reached with fewer than n_trials counted
        self.live: dict[str, tuple[optuna.Trial, int]] = {}  # tune trial id -> (optuna trial, epochs)
        self.last: dict[str, dict[str, Any]] = {}
        self.vectors: dict[str, dict[str, dict[str, Any]]] = {}  # tune trial id -> ATTR_EPOCH_OBJECTIVES
        self._check_plateau()  # a resumed study may have reached it already

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # the space comes from `space`, the objectives are fixed

    # Ray's own searchers return Searcher.FINISHED (a str) too; its annotation omits it
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        while self._more():
            trial = self.study.ask()
            params = self.space.suggest(trial)
            try:
                cfg = Config.from_dict({**self.base, **params})
            except ConfigError as exc:  # a suggested combination the config refuses: FAIL, ask again
                trial.set_user_attr(ATTR_ERROR, str(exc))
                self.study.tell(trial, state=TrialState.FAIL)
                self.counted += 1
                continue
            run_id = self.new_run(trial.number)
            if run_id:
                trial.set_user_attr(ATTR_RUN_ID, run_id)
            self.live[trial_id] = (trial, cfg.epochs)
            resume = trial.user_attrs.get(ATTR_RESUME_FROM)  # a rerun of an interrupted trial (study.resume)
            return {**cfg.to_dict(), TRIAL_NUMBER: trial.number, RUN_ID: run_id, TRIAL_LABEL: trial_label(trial),
                    **({RESUME_FROM: resume} if resume else {})}
        if self.max_trials is not None and self.counted < self.n_trials and not self.capped and not self.stopped \
                and not self._interrupted():
            if self.live:
                return None  # a running trial may yet be pruned: ask again when one ends
            self.capped = True
            self.log(f"search: stopped at the cap of {self.max_trials} trials; {self.counted} of "
                     f"{self.n_trials} ran to their end, the others were stopped early (PRUNED)")
        return Searcher.FINISHED

    def _more(self) -> bool:
        """Whether to ask another trial now."""
        if self.stop is not None and not self.stopped:
            self._stop_because(self.stop.expired())
        if self.stopped or self._interrupted():
            return False
        asked = self.counted + len(self.live) + self.pruned
        if self.max_trials is None:
            return asked < self.n_trials
        return self.counted + len(self.live) < self.n_trials and asked < self.max_trials

    def _interrupted(self) -> bool:
        return self.interrupt is not None and self.interrupt.stop_all()

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.last[trial_id] = result
        self._record(trial_id, result)

    def _record(self, trial_id: str, result: dict[str, Any]) -> None:
        """Keep the result's objective vector under its epoch in the Optuna trial (rung records)."""
        vector = objective_vector(result)
        if vector is None or trial_id not in self.live:
            return
        vectors = self.vectors.setdefault(trial_id, {})
        epoch = str(int(result[EPOCH]))
        if vectors.get(epoch, {}).get("values") == vector:  # the final result again, or a retry's repeat
            return
        # `at` orders a rung's records on resume as the scheduler met them (its ties are order-sensitive)
        vectors[epoch] = {"at": time.time(), "values": vector}
        self.live[trial_id][0].set_user_attr(ATTR_EPOCH_OBJECTIVES, vectors)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self.live:
            return
        if error and self._interrupted():
            # a SIGTERM to more than the driver (a whole container or job) may have killed the trial's
            # worker: not the trial's own failure; left RUNNING, the driver settles it as interrupted
            self.live.pop(trial_id)
            return
        if result:  # a scheduler's STOP reaches the searcher here, never through on_trial_result
            self._record(trial_id, result)
        self.vectors.pop(trial_id, None)
        trial, epochs = self.live.pop(trial_id)
        last = result or self.last.pop(trial_id, None)
        self.last.pop(trial_id, None)
        summary = TrialSummary.of(last)
        if error:
            summary = replace(summary, failed=True,
                              error="the trial raised after its retries (see its error file in the Tune folder)")
        for key, value in ((COMPUTE_S, summary.compute_s), (IMAGES_PER_S, summary.images_per_s)):
            if value is not None:
                trial.set_user_attr(key, value)
        if summary.failed:
            trial.set_user_attr(ATTR_ERROR, summary.error[:1000])
            state = TrialState.FAIL
            self.study.tell(trial, state=state)
        elif summary.epoch < epochs:  # stopped early: its values are not final, keep them off the front
            trial.set_user_attr(ATTR_STOPPED_AT, summary.epoch)
            state = TrialState.PRUNED
            self.study.tell(trial, state=state)
        else:
            state = TrialState.COMPLETE
            trial.set_user_attr(ATTR_INTERVALS, {k: list(v) for k, v in summary.intervals.items()})
            for c in self.constraints:  # Optuna keeps a trial with a value > 0 off the front
                trial.set_constraint(str(c), c.violation(summary.values))
            self.study.tell(trial, list(summary.values))
        if state in COUNTED_STATES:
            self.counted += 1
        else:
            self.pruned += 1
        number = trial.number
        self.settle(number, state, summary)
        self._check_plateau()

    def tell_ended(self) -> None:
        """After Tune was stopped (SIGTERM or Ctrl+C: `study.interrupt`), tell the running trials whose last
        result ended them, as `on_trial_complete` would have: their last epoch (the trial wrote its
        final artifacts before it; it then only marks its MLflow run FINISHED itself) or a failure they
        reported. The others stay RUNNING for the driver to settle as interrupted."""
        for trial_id, (_, epochs) in list(self.live.items()):
            last = self.last.get(trial_id)
            summary = TrialSummary.of(last)
            if last is not None and (summary.failed or summary.epoch >= epochs):
                self.on_trial_complete(trial_id, result=last)

    def _check_plateau(self) -> None:
        if self.stop is not None and not self.stopped:
            self._stop_because(self.stop.plateaued(self.study))

    def _stop_because(self, reason: str | None) -> None:
        if reason:
            self.stopped = reason
            self.log(f"search: no new trials: {reason}; {len(self.live)} running trial(s) run to their end")

    # The Optuna storage holds the state; Tune's searcher checkpoints need none.
    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass
