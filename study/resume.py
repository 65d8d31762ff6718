"""Resuming a study: settle what a killed driver left behind, count what is finished.

Optuna's RDB storage is the source of truth. A trial left RUNNING by a killed driver is told FAIL
(user attr `interrupted`), its MLflow run is ended KILLED (tag `atop.interrupted=true`), and its
parameters are enqueued so the sampler's proposal is still evaluated, from the interrupted trial's
last checkpoint where the study folder holds one (a long trial loses at most one epoch).
`--num-trials` counts trials that ended COMPLETE or FAIL (`COUNTED_STATES`); interrupted trials and
trials a scheduler stopped early (PRUNED: they are replaced by new trials) do not count.
"""
from __future__ import annotations

import posixpath
from typing import Any

import optuna
from optuna.trial import TrialState

from study.layout import CONFIRM_EXPERIMENT, SEARCH_EXPERIMENT, trial_folder
from study.storage import Storage
from study.warmstart import own
from tracking import mlflow_log
from tracking.contract import (
    ATTR_INTERRUPTED,
    ATTR_RERUN_OF,
    ATTR_RESUME_FROM,
    CHECKPOINT_FILES,
    INTERRUPTED_TAG,
    SPACE_TAG,
)

COUNTED_STATES = (TrialState.COMPLETE, TrialState.FAIL)
MLFLOW_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "FINISHED", TrialState.FAIL: "FAILED"}


def settle_interrupted(study: optuna.Study, storage: optuna.storages.BaseStorage, mlflow_uri: str,
                       experiment_id: str, parent_run_id: str, log=print, store: Storage | None = None) -> int:
    """Settle trials and runs a killed driver left RUNNING; returns how many trials were interrupted.

    Each interrupted trial's parameters are enqueued again; where `store` (the study folder) holds
    its last Tune checkpoint (`latest_checkpoint`), the rerun starts from it (user attr `resume_from`).
    """
    interrupted = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, ATTR_INTERRUPTED, True)
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        if trial.params:
            attrs: dict[str, Any] = {ATTR_RERUN_OF: trial.number}
            found = latest_checkpoint(store, trial.number) if store is not None else None
            if found:
                attrs[ATTR_RESUME_FROM] = found
            study.enqueue_trial(trial.params, user_attrs=attrs, skip_if_exists=False)
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


def latest_checkpoint(store: Storage, number: int, seed: int | None = None) -> str | None:
    """The newest complete Tune checkpoint that search trial `number` (or, with `seed`, its confirm
    trial of that seed) left in the study folder `store`, in any experiment, as a path relative to it
    (None: none). Tune's layout there: `<experiment_name(...)>/<trial_folder(...)>/checkpoint_<k>/`; a
    checkpoint counts only with every file of `CHECKPOINT_FILES` (a driver killed while Tune copied
    one leaves it incomplete)."""
    found: list[tuple[str, int, str]] = []
    experiments, trials = SEARCH_EXPERIMENT if seed is None else CONFIRM_EXPERIMENT, trial_folder(number, seed, "")
    for experiment in (e for e in store.listdir() if e.startswith(experiments)):
        for trial in (t for t in store.listdir(experiment) if t.startswith(trials)):
            for name in (c for c in store.listdir(experiment, trial) if c.startswith("checkpoint_")):
                folder = posixpath.join(experiment, trial, name)
                if all(store.exists(folder, f) for f in CHECKPOINT_FILES) and name.split("_")[-1].isdigit():
                    found.append((experiment, int(name.split("_")[-1]), folder))
    # the newest experiment first (its name ends in its start time), then the last checkpoint in it:
    # Tune counts a trial's checkpoints from 0 again in each experiment
    return max(found)[2] if found else None


def finished_count(study: optuna.Study) -> int:
    """This study's own trials that count towards `--num-trials` (`--warm-start` copies do not)."""
    return sum(1 for t in own(study.get_trials(deepcopy=False, states=COUNTED_STATES))
               if not t.user_attrs.get(ATTR_INTERRUPTED))


def counts(study: optuna.Study) -> dict[str, Any]:
    """This study's own trials by state (lower-case state names)."""
    trials = own(study.get_trials(deepcopy=False))
    return {state.name.lower(): sum(1 for t in trials if t.state is state) for state in TrialState}
