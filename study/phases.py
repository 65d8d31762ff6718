"""The study's phases after `study.run.prepare`: open the study, share data and weights, search,
confirm, settle, report (`study.run.run` calls them in that order). Each imports the heavy modules
it needs itself, so that importing this module stays light (tests/test_refusal.py)."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shutil
import subprocess
import warnings
from typing import TYPE_CHECKING, Any

# Only light modules here: bad input is refused (study.args, then `prepare`) before torch, Optuna,
# MLflow or Ray are imported; each function imports the heavy modules it needs (tests/test_refusal.py).
from atop.config import Config
from atop.io import atomic_write_text
from study import lease, optuna_storage
from study.args import STUDY_FILE
from study.cluster import ROOT, join_ray, loopback_ray, ray_cpus
from study.layout import CONFIRM_EXPERIMENT, SEARCH_EXPERIMENT, experiment_name, trial_folder
from study.plan import OpenStudy
from study.storage import job_submission_id
from study.tables import pareto_table
from study.trial_lines import say, trial_lines
from tracking import mlflow_log, spool_sender
from tracking.contract import (
    ATTR_REFERENCE,
    ATTR_RUN_ID,
    DIRECTIONS,
    DRIVER_WALL_S,
    ERROR_TAG,
    EVAL_LEVEL_TAG,
    INFEASIBLE_TAG,
    OBJECTIVES,
    OPTUNA_STATE_TAG,
    PARETO_ARTIFACT,
    PRETRAINED_TAG,
    REFERENCE_TAG,
    SEARCH_STOPPED_TAG,
    SPACE_TAG,
    STOPPED_TAG,
    STUDY_TAG,
    TEST_PREFIX,
    TRIAL_COUNT_METRIC,
    TRIAL_LABEL,
    TRIAL_NUMBER,
    EvalSplit,
    Stage,
    TrialSummary,
    eval_level_note,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from study.interrupt import StopRequest
    from study.plan import StudyPlan
    from study.settings import StudySettings
    from trainables.atop_trainable import StudyContext


def run_tags() -> dict[str, str]:
    """Reproducibility tags for every run: git SHA, package versions, host."""
    import mlflow
    import numpy
    import optuna
    import ray
    import torch

    sha = os.environ.get("ATOP_GIT_SHA", "")
    if not sha:
        try:
            sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=False, capture_output=True, text=True,
                                 timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   check=False, capture_output=True, text=True, timeout=10).stdout.strip()
            sha = f"{sha}{'-dirty' if dirty else ''}" if sha else ""
        except (OSError, subprocess.SubprocessError):
            sha = ""
    return {"git_sha": sha or "unknown", "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "optuna": optuna.__version__, "mlflow": mlflow.__version__,
            "numpy": numpy.__version__, "host": platform.node()}


def make_scheduler(settings: StudySettings, epochs: int, study: Any = None):
    """The Tune scheduler of `--scheduler`: None (run every trial to its last epoch) or MO-ASHA,
    its rung records rebuilt from `study`'s stored trials (an `optuna.Study`; None: start empty)."""
    if settings.scheduler == "mo-asha":
        from study.scheduler import MOASHAScheduler

        scheduler = MOASHAScheduler(max_t=epochs, grace_period=settings.grace_period,
                                    reduction_factor=settings.reduction_factor)
        if study is not None:
            scheduler.restore_trials(study.get_trials(deepcopy=False))
        return scheduler
    return None


def where_to_watch(plan: StudyPlan, opened: OpenStudy) -> list[str]:
    """Lines telling where the running study can be followed: MLflow and, under a job, the job
    (`init_ray` prints the Ray dashboard's URL where there is one)."""
    uri = plan.mlflow_uri
    lines = [f"MLflow experiment: {uri.rstrip('/')}/#/experiments/{opened.experiment_id}"
             if uri.startswith(("http:", "https:")) else f"MLflow: mlflow ui --backend-store-uri {uri}"]
    submission = job_submission_id()
    if submission:  # under `ray job submit`: how to follow and stop this job
        lines.append(f"Ray job {submission}: follow with `ray job logs -f {submission}`, stop with "
                     f"`ray job stop {submission}`")
    return lines


def open_study(plan: StudyPlan) -> OpenStudy:
    """Create or load the study folder, the Optuna study, the MLflow experiment and parent run.

    The driver first takes the study's lease (`study.lease`): a second driver of a running study is
    refused before it writes or settles anything. A new study whose records cannot be created leaves
    no folder behind. On resume, the trials and runs a killed driver left RUNNING are settled first
    (`study.resume.settle_interrupted`).
    """
    loopback_ray()
    import optuna

    from search_spaces import SPACES, fingerprint
    from study.enqueue import enqueue_references
    from study.resume import settle_interrupted
    from study.settings import make_sampler

    settings, folder, uri, name = plan.settings, plan.folder, plan.mlflow_uri, plan.name
    created = not plan.store.exists()
    plan.store.make()
    folder.mkdir(parents=True, exist_ok=True)
    held = lease.take(plan.optuna_url, name)  # refused: another driver is in the folder, leave it as it is
    warm = plan.warm_start.study if plan.warm_start else None
    weights = None
    if plan.resume:  # kept from when the study was created (its trials were copied, its weights made then)
        saved = plan.store.read_json(STUDY_FILE)
        warm, weights = saved.get("warm_start"), saved.get("weights")
        if weights is None and plan.weights:  # a study from before the record: the files its trial runs name
            from study.pretrained import weights_record

            weights = weights_record(*plan.weights)
    try:
        plan.store.write_json(STUDY_FILE, {
            "settings": settings.to_dict(), "mlflow_uri": uri, "data_dir": plan.data_dir,
            "validation": plan.validation_record, "pretrained": plan.pretrained,
            "space_fingerprint": fingerprint(SPACES[settings.space]),
            "warm_start": warm, "weights": weights,
            "optuna_storage": optuna_storage.public(plan.optuna_url)})
        storage = optuna.storages.RDBStorage(plan.optuna_url)
        optuna.logging.set_verbosity(optuna.logging.INFO if plan.verbose else optuna.logging.WARNING)
        n_existing = len(optuna.load_study(study_name=name, storage=storage).trials) if plan.resume else 0
        study = optuna.create_study(study_name=name, storage=storage, directions=[optuna.study.StudyDirection[d.upper()] for d in DIRECTIONS],
                                    load_if_exists=True, sampler=make_sampler(
                                        settings.sampler, plan.cfg.seed, settings.population_size, n_existing))
        with warnings.catch_warnings():  # marked experimental; say nothing to every study
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(OBJECTIVES))
        if plan.warm_start and not plan.resume:
            from study.warmstart import copy_trials

            copied = copy_trials(study, plan.warm_start.study, plan.warm_start.url, settings.parsed_constraints())
            print(plan.warm_start.note(copied), flush=True)
        local_store = not uri.startswith(("http:", "https:", "databricks"))
        experiment_id = mlflow_log.ensure_experiment(
            uri, name, artifact_location=(folder / "mlartifacts").as_uri() if local_store else None)
        tags = run_tags()
        parent_id = mlflow_log.ensure_parent_run(uri, experiment_id, name, {
            "preset": settings.to_dict(), "space": settings.space, "sampler": settings.sampler,
            "num_trials": settings.num_trials, "study_folder": plan.store.where(),
            "validation": json.dumps(plan.validation_record), **({"warm_start": warm} if warm else {})},
            {**tags, SPACE_TAG: settings.space, EVAL_LEVEL_TAG: plan.cfg.eval_level.value})
    except Exception:
        held.release()
        if created and not plan.resume:
            plan.store.remove()
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if plan.resume:
        settle_interrupted(study, storage, uri, experiment_id, parent_id, store=plan.store)
    enqueue_references(study, list(plan.references))
    return OpenStudy(study, storage, experiment_id, parent_id, tags, held)


def shared_context(plan: StudyPlan, opened: OpenStudy, stop: Callable[[], bool] | None = None) -> StudyContext:
    """Data and weights every trial shares: the data subsets and the pre-trained models (made once).

    Raises:
        study.pretrained.PretrainingStopped: `stop()` became true while pre-training ran (`pretrain_once`).
    """
    from atop.data import subset
    from study.pretrained import pretrain_once, weights_record
    from trainables.atop_trainable import StudyContext

    settings, cfg = plan.settings, plan.cfg
    if plan.weights:  # a resumed study: the weights its earlier trials used (checked in prepare), never new ones
        clf_path, pur_path = plan.weights
        print(f"reusing the study's pre-trained {clf_path} and {pur_path.name}", flush=True)
    else:
        clf_path, pur_path = pretrain_once(
            cfg, settings.pretrain_settings(), plan.pretraining_data, plan.pretrained_cache,
            cpus=min(settings.cpus * settings.max_concurrent, ray_cpus()), gpus=settings.gpus,
            pretrained=plan.pretrained, stop=stop)
        saved = plan.store.read_json(STUDY_FILE)
        plan.store.write_json(STUDY_FILE, {**saved, "weights": weights_record(clf_path, pur_path)})
    return StudyContext(
        train=subset(plan.pool, cfg.n_train, seed=cfg.seed), eval_data=plan.val,
        classifier_ckpt=clf_path.read_bytes(), purifier_ckpt=pur_path.read_bytes(), mlflow_uri=plan.mlflow_uri,
        spool_dir=str(plan.spool_dir), cpus_per_trial=settings.cpus, gpus_per_trial=settings.gpus,
        tags={**opened.tags, STUDY_TAG: plan.name, PRETRAINED_TAG: f"{clf_path.name},{pur_path.name}"},
        store=plan.store)


def search(plan: StudyPlan, opened: OpenStudy, ctx: StudyContext, n_trials: int, started: float,
           interrupt: StopRequest | None = None) -> str | None:
    """Run `n_trials` more trials with Ray Tune, asked from and told to the Optuna study; returns why
    `--time-budget` (counted from `started`) or `--stop-on-plateau` ended it early, if either did.
    Once `interrupt` is set (SIGTERM or Ctrl+C, `study.interrupt`) no trial is asked and Tune ends the running
    ones; those that had reported their last epoch are told, the others left RUNNING in Optuna for
    the caller to settle."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from search_spaces import SPACES
    from study.searcher import AskTellSearcher
    from trainables.atop_trainable import train_atop

    settings, uri, study = plan.settings, plan.mlflow_uri, opened.study
    space = SPACES[settings.space]
    constraints = settings.parsed_constraints()

    def new_run(number: int) -> str | None:
        reference = study.trials[number].user_attrs.get(ATTR_REFERENCE)
        return mlflow_log.create_trial_run(uri, opened.experiment_id, opened.parent_id, number, space.name,
                                           {**opened.tags, **({REFERENCE_TAG: reference} if reference else {})})

    def settle_run(number: int, state: Any, summary: TrialSummary) -> None:
        run_id = study.trials[number].user_attrs.get(ATTR_RUN_ID)
        if not run_id:
            return
        log = mlflow_log.RunLogger(uri, run_id, plan.spool_dir / f"driver-{number:04d}.jsonl")
        extra = {OPTUNA_STATE_TAG: state.name}
        broken = [str(c) for c in constraints if not summary.failed and c.violation(summary.values) > 0]
        if broken and state.name == "COMPLETE":
            extra[INFEASIBLE_TAG] = ",".join(broken)
        if summary.failed:
            extra[ERROR_TAG] = mlflow_log.failure_message(uri, run_id, summary.error)
        if state.name == "PRUNED":
            extra[STOPPED_TAG] = "true"
        log.set_tags(extra)
        log.set_status("FAILED" if state.name == "FAIL" else "FINISHED")

    scheduler = make_scheduler(settings, plan.cfg.epochs, study)
    searcher = AskTellSearcher(study, space, plan.cfg, n_trials, new_run, settle_run, constraints,
                               max_trials=scheduler.trials_for(n_trials) if scheduler else None,
                               stop=settings.search_stop(started), interrupt=interrupt)
    trainable = tune.with_resources(tune.with_parameters(train_atop, ctx=ctx),
                                    {"cpu": settings.cpus, "gpu": settings.gpus})
    spool_sender.start_senders()  # trials log through their node's sender (tracking.spool_sender)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent),
                                    scheduler=scheduler,
                                    num_samples=-1,  # the searcher says when it is done
                                    reuse_actors=True,  # warm workers: see trainables.atop_trainable
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=experiment_name(SEARCH_EXPERIMENT), **plan.store.tune_location(),
            verbose=tune_verbosity(plan), failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1), stop=interrupt,
            callbacks=[trial_lines("search", _epochs, _trial_label, started_label=_started_label, log=say)]))
    tuner.fit()
    if interrupt is not None and interrupt.stop_all():
        searcher.tell_ended()  # Tune stopped them without telling the searcher
    return searcher.stopped


def confirm(plan: StudyPlan, opened: OpenStudy, ctx: StudyContext | None,
            interrupt: StopRequest | None = None) -> tuple[list[Any], bool]:
    """Fine-tune the front's configurations again on new seeds and score them on test (`study.confirm`).
    Once `interrupt` is set (SIGTERM or Ctrl+C) Tune ends the running confirm trials and the configurations
    not yet confirmed are left for `--resume`.

    Returns:
        (every confirmed configuration's outcome, whether any confirm trial ran now).
    """
    from ray import tune

    from atop.data import subset
    from search_spaces import SPACES
    from study.confirm import Ended, Fit, job_label, run_confirm
    from trainables.atop_trainable import confirm_atop

    s = plan.settings
    base = s.confirm_base()

    def start() -> tuple[dict[str, str], Fit]:
        nonlocal ctx
        if ctx is None:  # a resumed study whose search was done: start Ray for the confirm trials
            join_ray(plan)
            ctx = shared_context(plan, opened)
        return ctx.tags, functools.partial(fit, ctx)

    def fit(context: StudyContext, jobs: list[dict[str, Any]], ended: Ended) -> None:
        test_ctx = dataclasses.replace(context, eval_data=subset(plan.test, base.n_eval), eval_split=EvalSplit.TEST.value,
                                       stage=Stage.CONFIRM.value, metric_prefix=TEST_PREFIX)
        trainable = tune.with_resources(tune.with_parameters(confirm_atop, ctx=test_ctx),
                                        {"cpu": s.cpus, "gpu": s.gpus})
        spool_sender.start_senders()
        tuner = tune.Tuner(
            trainable, param_space={"job": tune.grid_search(jobs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=s.max_concurrent, reuse_actors=True,
                                        trial_name_creator=_confirm_name, trial_dirname_creator=_confirm_name),
            run_config=tune.RunConfig(
                name=experiment_name(CONFIRM_EXPERIMENT), **plan.store.tune_location(),
                verbose=tune_verbosity(plan), failure_config=tune.FailureConfig(max_failures=s.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1), stop=interrupt,
                callbacks=[trial_lines("confirm", _job_epochs, job_label, total=len(jobs), prefix="test ",
                                       ended=lambda config, result: ended(config["job"], result), log=say)]))
        tuner.fit()

    return run_confirm(study=opened.study, space=SPACES[s.space], base=plan.cfg, overrides=s.confirm_config,
                       top=s.confirm_top, seeds=s.confirm_seeds, folder=plan.folder, store=plan.store,
                       uri=plan.mlflow_uri, experiment_id=opened.experiment_id, parent_id=opened.parent_id,
                       start=start, note=level_note(base), interrupted=interrupt.stop_all if interrupt else None)


def settle(plan: StudyPlan) -> None:
    """Send the MLflow calls trials spooled during an outage; say where any still unsent are kept.

    The nodes' senders are stopped first (their calls left in the spool files), so that each file
    has one writer: this process."""
    spool_sender.stop_senders()
    _say_unsent(plan, mlflow_log.flush_spools(plan.spool_dir, plan.mlflow_uri))


def settle_stopped(plan: StudyPlan, opened: OpenStudy, request: StopRequest) -> int:
    """Settle a study the driver stopped after `request` (`study.interrupt`'s docstring, steps 4 and 5);
    returns the driver's exit status (`StopRequest.exit_status`)."""
    from study.interrupt import resume_command
    from study.resume import settle_interrupted

    interrupted = settle_interrupted(opened.study, opened.storage, plan.mlflow_uri, opened.experiment_id,
                                     opened.parent_id, log=lambda line: None, store=plan.store)  # said below
    log = mlflow_log.RunLogger(plan.mlflow_uri, opened.parent_id, plan.spool_dir / "driver-study.jsonl")
    log.set_status("KILLED")
    log.close()
    settle(plan)
    print(f"{request.reason}: the study is settled ({interrupted} search trial(s) FAIL/KILLED as interrupted and "
          "enqueued again from their last checkpoint); --resume goes on with the rest", flush=True)
    print(f"resume: {resume_command(plan)}", flush=True)
    return request.exit_status


def _say_unsent(plan: StudyPlan, unsent: int) -> None:
    if unsent:
        print(f"MLflow unreachable: {unsent} call(s) kept in {plan.spool_dir}; send them later with "
              f"python -m tracking upload {plan.spool_dir}/*.jsonl --mlflow-uri {plan.mlflow_uri}", flush=True)


def level_note(cfg: Config) -> str:
    """How `cfg`'s figures were obtained, in one line (`tracking.contract.eval_level_note`)."""
    from atop.evaluate import LEVELS

    return eval_level_note(cfg.eval_level.value, LEVELS[cfg.eval_level], precision=cfg.eval_precision.value,
                           audit_images=cfg.audit_images)


def report(plan: StudyPlan, opened: OpenStudy, wall_s: float, confirmed: list[Any] | None, ran: bool = True,
           stopped: str | None = None) -> None:
    """Print the Pareto table (validation), the confirm table (test; None: --no-confirm) and the
    study's whereabouts; log the table and counts to the parent run where this driver ran anything
    (`ran`; a resume with nothing left to run leaves the parent run's figures alone) and, where
    `stopped` says why the search ended early, that too.

    The parent run's calls go through a spool like a trial's, so an MLflow server down at the very
    end leaves them in `spool/driver-study.jsonl` (replayed by `python -m tracking upload`).
    """
    from study import importance
    from study.constraints import infeasible
    from study.resume import counts

    study, uri, name, folder = opened.study, plan.mlflow_uri, plan.name, plan.folder
    table = pareto_table(study, note=level_note(plan.cfg)
                         + f"; {len(plan.val)} validation images (train split)")
    print(table, flush=True)
    if confirmed is not None:
        from study.confirm import STATE_FILE
        from study.confirm import table as confirm_table

        base = plan.settings.confirm_base()
        print("\n" + confirm_table(confirmed, level_note(base)), flush=True)
        print(f"(kept in {plan.store.where(STATE_FILE)})")
    else:
        print("\nno confirm stage (--no-confirm): the figures above are validation figures, not test figures")
    c = counts(study)
    found = importance.importances(study, seed=plan.cfg.seed)
    print("\n" + importance.table(found, c["complete"]), flush=True)
    log = mlflow_log.RunLogger(uri, opened.parent_id, plan.spool_dir / "driver-study.jsonl")
    if ran:
        log.log_artifact(atomic_write_text(folder / PARETO_ARTIFACT, table + "\n"))
        log.log_metrics({**{TRIAL_COUNT_METRIC.format(state=k): c[k] for k in ("complete", "pruned", "fail")},
                         DRIVER_WALL_S: wall_s, **importance.metrics(found, c["complete"])}, step=0)
    if stopped:
        log.set_tags({SEARCH_STOPPED_TAG: stopped})
    log.set_status("FINISHED")
    _say_unsent(plan, log.close())
    broke = [t.number for t in study.trials if t.state.name == "COMPLETE" and infeasible(t)]
    if broke:
        print(f"\n{len(broke)} complete trial(s) broke a --constraint ({', '.join(plan.settings.constraints)}) "
              f"and are kept off the front: {broke}")
    if stopped:
        print(f"\nthe search stopped before --num-trials {plan.settings.num_trials}: {stopped}")
    print(f"\ntrials: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed"
          + (f"; driver wall time {wall_s:.0f} s" if ran else "; nothing left to run (the study's figures unchanged)"))
    print(f"MLflow: {uri}  experiment {name!r}  parent run {opened.parent_id}")
    print(f"study folder: {plan.store.where()}  (Optuna: {optuna_storage.public(plan.optuna_url)})"
          + (f"; this driver's spools in {plan.spool_dir}" if plan.store.remote else ""))
    if uri.startswith("sqlite:"):
        print(f"browse: mlflow ui --backend-store-uri {uri}")
    print(f"analyse: python -m analysis --mlflow-uri {uri} --experiment {name} --out {folder / 'analysis'}")


def _confirm_name(trial: Any) -> str:
    job = trial.config["job"]
    return trial_folder(int(job["number"]), int(job["seed"]), trial.trial_id)


def tune_verbosity(plan: StudyPlan) -> int:
    """Ray Tune's `verbose`: its own tables only with `--verbose`; `study.trial_lines` says what runs.

    Without `--verbose` this also selects Tune's older output (`RAY_AIR_NEW_OUTPUT=0`, unless the
    user set it): at `verbose=0` the newer one still prints an experiment header box, the staging
    path and a TensorBoard hint for every stage; the older one prints nothing.
    """
    if plan.verbose:
        return 1
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return 0


def _trial_label(trial: Any) -> str:
    return f"trial {int(trial.config.get(TRIAL_NUMBER, -1))}"


def _started_label(trial: Any) -> str:
    """A search trial's start line: its number, reference name and searched values (`study.searcher.trial_label`)."""
    return str(trial.config.get(TRIAL_LABEL) or _trial_label(trial))


def _epochs(trial: Any) -> int:
    """A search trial's own last epoch (a reference may fine-tune for none)."""
    return int(trial.config.get("epochs", 0))


def _job_epochs(trial: Any) -> int:
    """A confirm trial's own last epoch."""
    return int(trial.config["job"]["config"].get("epochs", 0))


def _trial_name(trial: Any) -> str:
    """Short trial folder names (Tune's default spells out the whole config)."""
    return trial_folder(int(trial.config.get(TRIAL_NUMBER, -1)), None, trial.trial_id)
