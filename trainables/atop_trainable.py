"""The Ray Tune function trainable of an AToP study: a thin adapter over `atop.finetune.finetune`.

The Tune config is a flat `atop.config.Config` dict plus the reserved keys in `TRIAL_KEYS`
(the Optuna trial number and the MLflow child run made for it by the driver). Everything shared by
all trials (data, pre-trained weights, MLflow coordinates) arrives once through the object store:

    trainable = tune.with_parameters(train_atop, ctx=StudyContext(...))

Per epoch: `tune.report(metrics, checkpoint=...)` and the same metrics to MLflow (step = epoch).
A restarted trial (Ray `FailureConfig`) resumes from its last Tune checkpoint and logs to the same
MLflow run. Failures that a retry cannot fix (NaN loss, bad config, bad checkpoint) end the trial
with a result carrying `atop_failed=1` and `atop_error` instead of raising, so Tune does not retry
them; anything else raises and is retried from the last checkpoint.

Trials reuse their worker process (`reuse_actors=True` in `study/phases.py`): imports, Ray's actor
start and the pre-trained weights, deserialized once per process (`trainables.worker.pretrained`),
are paid once per worker instead of once per trial. Nothing else outlives a trial: each builds
fresh modules from the cached state dicts, hands back the heap earlier trials freed, seeds torch's
global generator with its own seed, sets its own thread count, and opens its own MLflow logger and
fault plan.

Checkpoints and the final `defense.pt` (`trainables.trial_state`) name the frozen classifier by
sha256 (`classifier_ref`) instead of holding it: the study stores it once, in its pre-training
cache, where `atop.load_defense` finds it (see docs/CHECKPOINTS.md).

GPUs: a fractional `gpus_per_trial` caps the trial process's CUDA memory to that fraction; asking
for a GPU on a node without CUDA, and running out of CUDA memory, are permanent failures
(`trainables.worker`).

The names exchanged with the driver and MLflow are in `tracking.contract`; the artifacts are made
by `atop.artifacts`, the test-only fault hook is `trainables.faults`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atop import progress
from atop.artifacts import image_grid, write_parquet
from atop.config import Config, ConfigError
from atop.data import Split
from atop.defense import Defense
from atop.evaluate import evaluate, how_obtained
from atop.finetune import finetune
from tracking.contract import (
    COMPUTE_S,
    EPOCH,
    ERROR_KEY,
    ERROR_TAG,
    EVAL_LEVEL_TAG,
    EVAL_SPLIT_TAG,
    EVALUATION_TAG,
    FAILED_KEY,
    LAST_ERROR_TAG,
    NODE_TAG,
    RESOURCES_TAG,
    RESTORED_TAG,
    RESUME_FROM,
    RESUMED_FROM_TAG,
    RUN_ID,
    STAGE_TAG,
    TRIAL_KEYS,
    TRIAL_NUMBER,
    EvalSplit,
    Stage,
)
from tracking.mlflow_log import RunLogger, quiet_http
from tracking.spool_sender import node_logger
from trainables.faults import FaultPlan
from trainables.trial_state import DEFENSE_FILE, restore_state, save_final, save_state
from trainables.worker import (
    PERMANENT,
    device_name,
    failure_message,
    pretrained,
    release_freed_memory,
    trial_device,
)

if TYPE_CHECKING:
    from study.storage import Storage


PER_EXAMPLE_FILE, GRID_FILE = "per_example.parquet", "images.png"
#: keys of a confirm trial's last result: per-image rates (JSON) and the audit's flags
PER_IMAGE_KEY, AUDIT_KEY, NOT_AUDITED = "atop_per_image", "atop_audit_flags", "not audited"


@dataclass
class StudyContext:
    """What every trial of a stage shares; sent once through the object store.

    The search's trials score on validation images (`eval_split` "val", carved from the train split
    by `atop.data.carve_validation`); the confirm stage's on test images (`eval_split` "test"), with
    their MLflow metrics named `test/<figure>` (`metric_prefix`).
    """

    train: Split  # the fine-tuning images (already the study's `n_train` subset of the training pool)
    eval_data: Split  # the images every trial is scored on (`n_eval` of them)
    classifier_ckpt: bytes  # pre-trained checkpoint files, as bytes (no shared file system needed)
    purifier_ckpt: bytes
    mlflow_uri: str
    spool_dir: str  # where a trial spools MLflow calls during an outage
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    tags: dict[str, str] = field(default_factory=dict)  # git SHA, package versions, ... for every run
    eval_split: str = EvalSplit.VAL.value
    stage: str = Stage.SEARCH.value
    metric_prefix: str = ""  # put before every MLflow metric name (the Tune result keeps plain names)
    store: Storage | None = None  # the study folder: where an interrupted trial's checkpoint is (`RESUME_FROM`)


def split_config(config: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """(typed config, reserved trial keys); unknown keys raise `ConfigError`."""
    reserved: dict[str, Any] = {k: config[k] for k in TRIAL_KEYS if k in config}
    return Config.from_dict({k: v for k, v in config.items() if k not in TRIAL_KEYS}), reserved


def train_atop(config: dict[str, Any], ctx: StudyContext) -> None:
    """Fine-tune one purifier with AToP and report every epoch (see the module docstring)."""
    from ray import tune

    quiet_http()
    progress.quiet()  # Tune reports every epoch itself; concurrent trials' lines would bury the driver's
    cfg, reserved = split_config(config)
    number, run_id = int(reserved.get(TRIAL_NUMBER, -1)), reserved.get(RUN_ID)
    torch.set_num_threads(max(1, round(ctx.cpus_per_trial)))
    # a reused worker ran other trials before this one: nothing may depend on what they left behind
    release_freed_memory()
    torch.manual_seed(cfg.seed)
    if cfg.compile:  # compiled code of earlier trials' modules would fill dynamo's cache, then run eager
        torch._dynamo.reset()
    trial_dir = Path(tune.get_context().get_trial_dir())
    # sent by this node's sender: a trial worker that imports no MLflow is ~90 MB smaller
    log = node_logger(ctx.mlflow_uri, run_id, Path(ctx.spool_dir) / spool_file(ctx.stage, number, cfg.seed)) \
        if run_id else None

    checkpoint = tune.get_checkpoint()  # this trial's own (Tune retries it from there)
    state, start_epoch, compute_s = None, 0, 0.0
    try:
        device = trial_device(ctx.gpus_per_trial)
        weights = pretrained(ctx.classifier_ckpt, ctx.purifier_ckpt)
        classifier_ref = weights.classifier_ref
        classifier, purifier, discriminator = weights.build()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state, start_epoch, compute_s = restore_state(Path(d), classifier_ref)
        carried = _carried(reserved.get(RESUME_FROM), ctx, classifier_ref, cfg) if checkpoint is None else None
        if carried is not None:
            state, start_epoch, compute_s = carried
        if log:
            log.set_status("RUNNING")
            if checkpoint is None:
                log.log_params(cfg.to_dict())
                log.set_tags({**ctx.tags, "seed": cfg.seed, "device": device_name(device),
                              RESOURCES_TAG: f"cpu={ctx.cpus_per_trial},gpu={ctx.gpus_per_trial}",
                              EVAL_LEVEL_TAG: cfg.eval_level.value, EVAL_SPLIT_TAG: ctx.eval_split,
                              EVALUATION_TAG: how_obtained(cfg, len(ctx.eval_data), ctx.eval_split),
                              STAGE_TAG: ctx.stage, NODE_TAG: node_name(),
                              **({RESTORED_TAG: start_epoch, RESUMED_FROM_TAG: reserved[RESUME_FROM]}
                                 if carried is not None else {})})
            else:
                log.set_tags({RESTORED_TAG: start_epoch, NODE_TAG: node_name()})
        _check_sizes(cfg, ctx)
        faults = FaultPlan.from_env(number, ctx.stage)
        faults.at(start_epoch, purifier)

        started = time.perf_counter()
        final = None  # the last epoch's report, if any epoch ran here
        # a confirm trial scores its final purifier only: test images are not scored after every epoch
        for report in finetune(cfg, classifier, purifier, discriminator, ctx.train, ctx.eval_data, device=device,
                               state=state, start_epoch=start_epoch, score_every_epoch=ctx.stage == Stage.SEARCH.value):
            metrics = {**report.metrics, COMPUTE_S: compute_s + time.perf_counter() - started}
            if log:
                log.log_metrics({ctx.metric_prefix + k: v for k, v in metrics.items()}, step=report.epoch)
            last = {PER_IMAGE_KEY: per_image_payload(report), AUDIT_KEY: audit_flags(report.audit)} \
                if ctx.stage == Stage.CONFIRM.value and report.epoch == cfg.epochs else {}
            if log and report.epoch == cfg.epochs:  # before the report that ends the trial: a trial stopped
                # after it (SIGTERM, Ctrl+C: the driver tells it COMPLETE from that report) has them
                _final_artifacts(log, number, cfg, ctx, classifier, classifier_ref, purifier, discriminator, report,
                                 trial_dir, device)
            with tempfile.TemporaryDirectory(prefix="atop-ckpt-") as d:
                save_state(Path(d), cfg, report, classifier_ref, purifier, discriminator, metrics[COMPUTE_S])
                tune.report({**metrics, **last, EPOCH: report.epoch, TRIAL_NUMBER: number},
                            checkpoint=tune.Checkpoint.from_directory(d))
            faults.at(report.epoch, purifier)
            final = report
        if log:
            # retried by Tune from its last epoch's checkpoint (it failed after that report): nothing ran
            # here, and the artifacts, made in the failed attempt's trial folder, are made again
            if final is None:
                _final_artifacts(log, number, cfg, ctx, classifier, classifier_ref, purifier, discriminator, None,
                                 trial_dir, device)
            log.set_status("FINISHED")
            if left := log.close(timeout_s=10):  # bounded: the driver replays what is left after the trial
                print(f"MLflow unreachable ({log.last_error}); {left} unsent call(s) kept in {log.spool}", flush=True)
    except PERMANENT as exc:
        message = failure_message(exc, cfg, ctx.gpus_per_trial)
        if log:
            log.set_tags({ERROR_TAG: message})
            log.set_status("FAILED")
            log.close(timeout_s=10)
        tune.report({FAILED_KEY: 1, ERROR_KEY: message, TRIAL_NUMBER: number})
    except BaseException as exc:
        # Tune ends a trial it stops (a scheduler's prune) by raising SystemExit(0) in the trial's
        # thread, and Ctrl+C reaches the trial's worker too (the terminal's whole process group; the
        # driver settles the stop): neither is an error to record
        stopped = isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and not exc.code)
        if log and not stopped:
            # Tune may retry it from the last checkpoint; the driver settles the final status
            log.set_tags({LAST_ERROR_TAG: f"{type(exc).__name__}: {exc}"})
            log.flush()
        raise


def node_name() -> str:
    """The Ray node this process runs on, for its run's `atop.node` tag: `<node id> <node IP>`."""
    import ray

    context = ray.get_runtime_context()
    return f"{context.get_node_id()} {ray.util.get_node_ip_address()}"


def spool_file(stage: str, number: int, seed: int) -> str:
    """A trial's MLflow spool file name, made of numbers only (never of a searched value, which could
    hold a path): `trial-0007.jsonl`, or `confirm-0007-seed2.jsonl` for a confirm trial."""
    if stage == Stage.SEARCH.value:
        return f"trial-{int(number):04d}.jsonl"
    return f"confirm-{int(number):04d}-seed{int(seed)}.jsonl"


def confirm_atop(config: dict[str, Any], ctx: StudyContext) -> None:
    """A confirm trial (`study.confirm`): `train_atop` on the job in `config["job"]` (Tune grid entry:
    number, seed, run_id, config, resume_from), named by its search trial's number."""
    job = config["job"]
    carried = {RESUME_FROM: job["resume_from"]} if job.get("resume_from") else {}
    train_atop({**job["config"], TRIAL_NUMBER: job["number"], RUN_ID: job["run_id"], **carried}, ctx)


def _check_sizes(cfg: Config, ctx: StudyContext) -> None:
    if cfg.n_train and len(ctx.train) != cfg.n_train:
        raise ConfigError(f"n_train={cfg.n_train} but the study shared {len(ctx.train)} training images; "
                          "n_train is a study-level setting, not a searched one")
    if len(ctx.eval_data) != cfg.n_eval:
        raise ConfigError(f"n_eval={cfg.n_eval} but the study shared {len(ctx.eval_data)} evaluation images")


def _carried(where: str | None, ctx: StudyContext, classifier_ref: dict[str, Any],
             cfg: Config) -> tuple[dict[str, Any], int, float] | None:
    """`restore_state` of the interrupted trial's checkpoint a rerun was given (`RESUME_FROM`, relative
    to the study folder `ctx.store`), or None: none given, unreadable, or already at the last epoch
    (then the rerun starts from scratch, as it would have without one)."""
    from ray import tune

    if not where or ctx.store is None:
        return None
    try:
        with tune.Checkpoint(ctx.store.path(where), filesystem=ctx.store.fs).as_directory() as d:
            restored = restore_state(Path(d), classifier_ref)
    except Exception as exc:  # noqa: BLE001 - a checkpoint we cannot use costs its epochs, not the trial
        print(f"trial checkpoint {where!r} not usable ({type(exc).__name__}: {exc}); starting from scratch", flush=True)
        return None
    return restored if restored[1] < cfg.epochs else None


def per_image_payload(report: Any) -> str:
    """The last epoch's per-image rates (figure -> list), as JSON: one compact cell of a Tune result."""
    return json.dumps({k: [round(float(v), 4) for v in rates] for k, rates in report.rates.items()})


def audit_flags(audit: dict[str, Any] | None) -> str:
    """The audit's raised flags, comma-separated ("" none raised; `NOT_AUDITED` when it did not run)."""
    if audit is None:
        return NOT_AUDITED
    return ",".join(k for k, v in audit["flags"].items() if v is True and k != "gradient_masking_suspected")


def _final_artifacts(log: RunLogger, number: int, cfg: Config, ctx: StudyContext, classifier: torch.nn.Module,
                     classifier_ref: dict[str, Any], purifier: torch.nn.Module, discriminator: torch.nn.Module,
                     final: Any, trial_dir: Path, device: torch.device) -> None:
    """Final checkpoint (naming the classifier by sha256), image grid and per-example results, kept
    in the trial folder and logged.

    They are made in a scratch folder and moved in whole: Tune copies the trial folder to the
    study's storage while the trial runs, and an atomic write's temporary file that vanished under
    that copy failed its "Saving experiment state" with a traceback on the driver's terminal.
    """
    out = trial_dir / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"atop-trial-{number}-") as scratch:
        made = Path(scratch)
        save_final(made / DEFENSE_FILE, cfg, classifier_ref, purifier, discriminator,
                   final.metrics if final is not None else {})
        defense = Defense.from_config(cfg, purifier, classifier).to(device).eval()
        if final is not None:  # the last epoch's evaluation, at the config's level
            per_example, examples = final.per_example, final.examples
        else:  # resumed after its last epoch: nothing ran here, evaluate the restored purifier
            result = evaluate(defense, ctx.eval_data, cfg, device=device)
            per_example, examples = result.per_example, result.examples
        write_parquet(per_example, made / PER_EXAMPLE_FILE, trial_number=number)
        assert examples is not None  # the last epoch is always evaluated
        # the attacked images that evaluation scored: the grid runs no attack of its own
        image_grid(defense, examples, ctx.eval_data, cfg, made / GRID_FILE, device=device)
        for name in (DEFENSE_FILE, PER_EXAMPLE_FILE, GRID_FILE):
            shutil.move(made / name, out / name)  # a rename where both are on one file system
            log.log_artifact(out / name)
