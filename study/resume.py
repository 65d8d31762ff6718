"""Resuming a study: settle what a killed driver left behind, count what is finished.

Optuna's RDB storage is the source of truth. A trial left RUNNING by a killed driver is told FAIL
(user attr `interrupted`), its MLflow run is ended KILLED (tag `atop.interrupted=true`), and its
parameters are enqueued so the sampler's proposal is still evaluated. `--num-trials` counts trials
that ended COMPLETE or FAIL (`COUNTED_STATES`); interrupted trials and trials a scheduler stopped
early (PRUNED: they are replaced by new trials) do not count.
"""
from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from tracking import mlflow_log
from tracking.contract import ATTR_INTERRUPTED, ATTR_RERUN_OF, INTERRUPTED_TAG, SPACE_TAG

COUNTED_STATES = (TrialState.COMPLETE, TrialState.FAIL)
MLFLOW_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}


def settle_interrupted(study: optuna.Study, storage: optuna.storages.BaseStorage, mlflow_uri: str,
                       experiment_id: str, parent_run_id: str, log=print) -> int:
    """Settle trials and runs a killed driver left RUNNING; returns how many trials were interrupted."""
    interrupted = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, ATTR_INTERRUPTED, True)
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={ATTR_RERUN_OF: trial.number}, skip_if_exists=False)
        interrupted += 1
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    runs = mlflow_log.trial_runs(mlflow_uri, experiment_id, parent_run_id)
    client = mlflow_log.client(mlflow_uri)
    space = client.get_run(parent_run_id).data.tags.get(SPACE_TAG, "")
    for trial in study.get_trials(deepcopy=False):
        # killed between `study.ask()` and the creation of its run: give it one, so that every Optuna
        # trial has exactly one MLflow child run (ended KILLED below)
        if trial.user_attrs.get(ATTR_INTERRUPTED) and trial.number not in runs:
            run_id = mlflow_log.create_trial_run(mlflow_uri, experiment_id, parent_run_id, trial.number, space, {})
            runs[trial.number] = client.get_run(run_id)
    for number, run in runs.items():
        if run.info.status not in ("RUNNING", "SCHEDULED"):
            continue
        state = states.get(number)
        trial_attrs = study.trials[number].user_attrs if number < len(study.trials) else {}
        if state in MLFLOW_STATUS and not trial_attrs.get(ATTR_INTERRUPTED):
            client.set_terminated(run.info.run_id, MLFLOW_STATUS[state])
        else:
            client.set_tag(run.info.run_id, INTERRUPTED_TAG, "true")
            client.set_terminated(run.info.run_id, "KILLED")
    if interrupted:
        log(f"resume: {interrupted} trial(s) interrupted by the last driver marked FAIL/KILLED and re-enqueued")
    return interrupted


def finished_count(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False, states=COUNTED_STATES)
               if not t.user_attrs.get(ATTR_INTERRUPTED))


def counts(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    return {state.name.lower(): sum(1 for t in trials if t.state is state) for state in TrialState}
