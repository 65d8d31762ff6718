"""Run an AToP hyperparameter study: Optuna proposes, Ray Tune runs the trials, MLflow records.

On this machine (Ray started in-process, MLflow in the study folder):

    python study/run.py --preset smoke --data-dir ../shared/data

On a cluster (the same command, submitted; `--working-dir .` uploads the repository):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python study/run.py --preset paper-cifar10 --mlflow-uri http://MLFLOW:5000 --storage-path /shared/studies

Resume a study (after a crash or to extend it):

    python study/run.py --study-name NAME --resume [--num-trials N]

The study folder `<storage-path>/<study-name>/` holds study.json, optuna.db (the source of truth),
mlflow.db (default tracking store), spool/ and the Ray Tune results. `--storage-path` may be an
object store, `s3://BUCKET/PATH` (study/storage.py): then Optuna and MLflow live in the servers
given by `--optuna-storage` and `--mlflow-uri`, and spools stay local to each process. Pre-trained
weights are cached beside the study folders in `<storage-path>/.pretrained-cache/`
(`--pretrained-cache`) for every study with the same settings.
Bad input prints one line `error: ...` to stderr and exits 2 before anything is created. See docs/STUDY.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: import this checkout's packages (atop, study, ...)
    sys.path.insert(0, str(ROOT))

# Only light modules here: bad input is refused (study.args, then `prepare`) before torch, Optuna,
# MLflow or Ray are imported; each function imports the heavy modules it needs (tests/test_refusal.py).
from atop.cli import OneLineParser, one_line_errors
from atop.config import Config
from atop.io import atomic_write_text
from study import lease, optuna_storage
from study.args import STUDY_FILE, StudyError, check_args, check_gpus, check_mlflow_uri, study_name
from study.storage import Storage, job_submission_id, leave_job_working_dir, local_folder, submitted
from study.tables import pareto_table
from tracking import mlflow_log
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
    TRIAL_NUMBER,
    EvalSplit,
    Stage,
    TrialSummary,
    eval_level_note,
)
from tracking.mlflow_log import quiet_http

if TYPE_CHECKING:
    from atop.data import Split
    from study.enqueue import Reference
    from study.lease import Lease
    from study.settings import StudySettings
    from trainables.atop_trainable import StudyContext

#: flags that shape the study itself; on --resume they must match what the study was started with
SHAPING = ("space", "sampler", "population_size", "config", "pretrain", "constraints", "references")
#: flags a resumed study may change besides the trial count and resources
SCHEDULING = ("scheduler", "grace_period", "reduction_factor", "confirm_top", "confirm_seeds", "time_budget_h",
              "stop_on_plateau")


def build_parser(listing: bool = True) -> argparse.ArgumentParser:
    """The command's parser; `listing`: name the presets, spaces and samplers in the help (which
    imports Optuna and torch: `main` asks for it only with --help)."""
    names = {"preset": "", "space": "", "sampler": ""}
    if listing:
        from search_spaces import SPACES
        from study.settings import SAMPLERS, presets

        names = {"preset": f": {', '.join(presets())}", "space": f": {', '.join(SPACES)}",
                 "sampler": f": {', '.join(SAMPLERS)}"}
    p = OneLineParser(prog="python study/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help=f"settings preset (default smoke){names['preset']}")
    p.add_argument("--config", help="settings file (YAML or JSON) merged over the preset")
    p.add_argument("--dataset", help="data set (config key `dataset`)")
    p.add_argument("--data-dir", help="folder with <dataset>_<split>.npz (default $ATOP_DATA_DIR)")
    p.add_argument("--space", help=f"search space (default paper){names['space']}")
    p.add_argument("--sampler", help=f"Optuna sampler (default nsga2){names['sampler']}")
    p.add_argument("--num-trials", type=int, help="trials the study should have that ended COMPLETE or FAIL; "
                   "trials mo-asha stops early (PRUNED) do not count and are replaced by new ones, up to "
                   "N * reduction-factor**rungs trials in all")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--cpus", type=float, help="CPUs per trial (fractions allowed)")
    p.add_argument("--gpus", type=float, help="GPUs per trial (fractions allowed)")
    p.add_argument("--max-failures", type=int, help="retries of a failing trial from its checkpoint")
    p.add_argument("--scheduler", help="early stopping: none (default) or mo-asha (stop dominated trials at rungs)")
    p.add_argument("--grace-period", type=int, help="mo-asha: first rung, in epochs, after the CE warm-up "
                   "(default 1)")
    p.add_argument("--reduction-factor", type=int, help="mo-asha: about 1 in N trials passes each rung (default 3)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs per trial (config key `epochs`)")
    p.add_argument("--seed", type=int, help="seed of the sampler and of every trial (config key `seed`)")
    p.add_argument("--mlflow-uri", help="tracking URI (default sqlite:////<study folder>/mlflow.db)")
    p.add_argument("--optuna-storage", metavar="URL", help="Optuna's database (default sqlite:///<study folder>/"
                   "optuna.db; on a cluster e.g. postgresql://user@db/optuna; also $ATOP_OPTUNA_STORAGE)")
    p.add_argument("--verbose", action="store_true", help="show Ray's and Optuna's own INFO logs")
    p.add_argument("--storage-path", default="studies", help="where study folders go: s3://BUCKET/PATH, "
                   "gs://BUCKET/PATH, file:///PATH or a path (default ./studies; a relative path is refused under "
                   "`ray job submit`). An S3-compatible server: ?endpoint_override=HOST:PORT&scheme=http or "
                   "$AWS_ENDPOINT_URL. On an object store, pass --optuna-storage and --mlflow-uri too "
                   "(study/storage.py)")
    p.add_argument("--pretrained-cache", help="folder of cached pre-trained weights, shared by studies with the "
                   "same pre-training settings, data and code (default <storage-path>/.pretrained-cache; with an "
                   "object store, $ATOP_CACHE_DIR or ~/.cache/atop/pretrained on the driver's node)")
    p.add_argument("--constraint", action="append", metavar="OBJ>=X", help="a bound a configuration must meet, "
                   "e.g. clean_acc>=0.7 (repeatable); breaking trials are kept but never on the front")
    p.add_argument("--time-budget", type=float, dest="time_budget_h", metavar="HOURS", help="no new trial starts "
                   "HOURS after this driver started (running trials run to their end, then the confirm stage; a "
                   "--resume starts a new budget); study/stopping.py")
    p.add_argument("--stop-on-plateau", metavar="K,EPS", help="no new trial starts once the last K finished trials "
                   "grew the front's hypervolume (reference point 0, in [0, 1]) by EPS or less, e.g. 8,0.002")
    p.add_argument("--confirm-top", type=int, help="after the search, confirm up to K Pareto-optimal configurations "
                   "(spread over the front) on test images (default 3)")
    p.add_argument("--confirm-seeds", type=int, help="new fine-tuning seeds per confirmed configuration (default 2; "
                   "one for a configuration that fine-tunes nothing, epochs 0)")
    p.add_argument("--no-confirm", action="store_true", help="skip the confirm stage (the search's figures are "
                   "validation figures only)")
    p.add_argument("--enqueue", metavar="FILE", help="reference configurations (YAML/JSON list of the space's "
                   "parameters, each with an optional name) run first and always confirmed (study/enqueue.py)")
    p.add_argument("--pretrained", metavar="DIR", help="use DIR/classifier.pt (and DIR/purifier.pt if present) "
                   "instead of pre-training (study/pretrained.py)")
    p.add_argument("--study-name", help="study name (default <preset>-<date>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the study of --study-name")
    return p


# --- validation: everything is checked before anything is created ----------------------------------------

def resolve_settings(args: argparse.Namespace) -> StudySettings:
    from study.settings import load_preset, merge, read_file

    settings = load_preset(args.preset or "smoke")
    if args.config:
        settings = merge(settings, read_file(args.config), f"--config {args.config}")
    flags: dict[str, Any] = {k: getattr(args, k) for k in ("space", "sampler", "num_trials", "max_concurrent",
                                                            "cpus", "gpus", "max_failures", *SCHEDULING)
                             if getattr(args, k) is not None}
    config = {k: getattr(args, k) for k in ("dataset", "epochs", "seed") if getattr(args, k) is not None}
    if config:
        flags["config"] = config
    if args.no_confirm:
        flags["confirm"] = False
    if args.constraint:
        flags["constraints"] = list(args.constraint)
    settings = merge(settings, flags, "the command line")
    settings.validate()
    return settings


def load_data(cfg: Config, data_dir: str | None):
    from atop.data import DataError, load_split

    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise StudyError(f"--data-dir {data_dir!r} does not exist; pass the folder holding "
                         f"{cfg.dataset}_train.npz (e.g. --data-dir ../shared/data)")
    try:
        return load_split(cfg.dataset, "train", data_dir), load_split(cfg.dataset, "test", data_dir)
    except DataError as exc:
        raise StudyError(str(exc)) from None


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


def loopback_ray() -> None:
    """Before the first `import ray`: an embedded Ray listens on 127.0.0.1 only.

    Ray on Linux turns a node IP of 127.0.0.1 into the machine's external IP and binds its gRPC
    servers (GCS, raylet, workers) there or on all interfaces; with "cluster mode" off it keeps
    127.0.0.1 and binds loopback only. Read once, when ray is imported. See docs/RELIABILITY.md.
    """
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(cpus_per_trial: float, gpus_per_trial: float, verbose: bool = False) -> None:
    """Join the cluster of `ray job submit`, or start a local Ray; Ray's own INFO logs only if `verbose`."""
    loopback_ray()
    import logging

    import ray

    level = logging.INFO if verbose else logging.WARNING

    from trainables.faults import FAULT_ENV

    if os.environ.get("RAY_ADDRESS"):  # `ray job submit` sets it: join that cluster
        # A cluster's workers get the raylet's environment, not this driver's: the test-only fault
        # hook (trainables.faults.FAULT_ENV) must travel in a runtime env. A submitted job's own
        # runtime env already carries it (and Ray refuses a second one that sets the same variable).
        fault = os.environ.get(FAULT_ENV) if not submitted() else None
        context = ray.init(log_to_driver=True, logging_level=level,
                           runtime_env={"env_vars": {FAULT_ENV: fault}} if fault else None)
    else:  # embedded: a local Ray bound to 127.0.0.1, workers importing this checkout
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        context = ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=level,
                           runtime_env={"env_vars": {"PYTHONPATH": path}}, log_to_driver=True)
    if getattr(context, "dashboard_url", None):
        print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)
    total = ray.cluster_resources()
    if cpus_per_trial > total.get("CPU", 0) or gpus_per_trial > total.get("GPU", 0):
        ray.shutdown()
        raise StudyError(f"a trial asks for {cpus_per_trial:g} CPU and {gpus_per_trial:g} GPU but the Ray cluster "
                         f"has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU")


def join_ray(plan: StudyPlan) -> None:
    """`init_ray`, then on a cluster check the MLflow store from every node that can run a trial
    (`study.nodes`): the driver's own check says nothing about the other nodes."""
    s = plan.settings
    init_ray(s.cpus, s.gpus, plan.verbose)
    if not os.environ.get("RAY_ADDRESS"):  # embedded: this machine is the only node
        return
    from study.nodes import check_tracking_on_nodes

    root = plan.folder.parent  # a new study's default store will be inside it: nodes must see it
    if plan.mlflow_uri.startswith(("sqlite:", "file:")):
        root.mkdir(parents=True, exist_ok=True)
    n = check_tracking_on_nodes(plan.mlflow_uri, str(root), s.cpus, s.gpus)
    print(f"MLflow store reachable from all {n} Ray node(s) that can run a trial", flush=True)


# --- the study: resolve settings -> open the study -> data and weights -> search -> settle -> report --------

@dataclass(frozen=True)
class StudyPlan:
    """Everything a study run needs, checked by `prepare` before anything is created.

    Attributes:
        settings: the resolved study settings (preset, file, flags; or the saved ones on resume).
        name: the study name (Optuna study, MLflow experiment and folder name).
        folder: the driver's local study folder: spool/, files logged as artifacts, and on a local
            `--storage-path` everything else too (it is then `store`'s folder).
        store: `<storage-path>/<name>` (`study.storage`): study.json, confirm.json, Tune's experiments
            and checkpoints; optuna.db and mlflow.db by default (a local `--storage-path` only).
        pretrained_cache: the pre-training cache (`atop.pretrained_cache`), shared across studies.
        mlflow_uri: the tracking URI (checked when given or on resume).
        data_dir: the data folder as resolved (None: `$ATOP_DATA_DIR` or atop's default).
        cfg: the config every trial starts from (`StudySettings.base_config()`).
        pool: the train split less the validation images: all that pre-training and fine-tuning see.
        val: the validation images every search trial is scored on (`cfg.n_eval` of the train split,
            `atop.data.carve_validation`: the same for every trial, seed and later study).
        test: the whole test split; only the confirm stage scores on it.
        optuna_storage: the Optuna database URL as used (password included; never printed or saved).
        references: `--enqueue FILE`'s configurations, put at the head of the study (once).
        pretrained: `--pretrained DIR` (kept in study.json: a resumed study uses the same weights).
        resume: continue the study in `folder` instead of creating it.
    """

    settings: StudySettings
    name: str
    folder: Path
    store: Storage
    pretrained_cache: Path
    mlflow_uri: str
    data_dir: str | None
    cfg: Config
    pool: Split
    val: Split
    test: Split
    optuna_storage: str = ""
    references: tuple[Reference, ...] = ()
    pretrained: str | None = None
    resume: bool = False
    verbose: bool = False

    @property
    def optuna_url(self) -> str:
        return self.optuna_storage or f"sqlite:///{self.folder / 'optuna.db'}"

    @property
    def spool_dir(self) -> Path:
        return self.folder / "spool"

    @property
    def validation_record(self) -> dict[str, Any]:
        """What the study's metadata keeps about its validation images (enough to re-carve and check them)."""
        from atop.data import VALIDATION_SEED

        rows = self.val.indices.tolist()
        return {"from": "train", "images": len(rows), "seed": VALIDATION_SEED,
                "rows_sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest()}


@dataclass(frozen=True)
class OpenStudy:
    """The study's records once opened: the Optuna study and its MLflow experiment and parent run."""

    study: Any  # optuna.Study (optuna is imported after Ray's loopback setting)
    storage: Any  # its optuna.storages.RDBStorage
    experiment_id: str
    parent_id: str
    tags: dict[str, str]  # reproducibility tags every run of this driver gets
    lease: Lease  # this driver's hold on the study (study.lease), until `run` ends


def prepare(args: argparse.Namespace) -> StudyPlan:
    """Resolve and check all input (settings, name, folder, MLflow URI, data); creates nothing.

    The checks of the command line alone come first (`study.args.check_args`: no heavy import).
    """
    storage, store = check_args(args)
    from atop.data import DataError, carve_validation, resolve_data_dir
    from study.pretrained import check_pretrained
    from study.storage import default_cache

    name = study_name(args)
    folder = local_folder(store)
    pretrained = str(Path(args.pretrained).expanduser().resolve()) if args.pretrained else None
    optuna_given = args.optuna_storage or os.environ.get(optuna_storage.ENV)
    if args.resume:
        saved = _saved_study(name, store)
        settings, mlflow_uri, data_dir = _resumed_settings(args, name, saved)
        if pretrained and pretrained != saved.get("pretrained"):
            raise StudyError(f"--resume cannot change --pretrained of study {name!r} (it uses {saved.get('pretrained')})")
        pretrained = saved.get("pretrained")
        _check_same_space(name, settings.space, saved.get("space_fingerprint"))
        optuna_given = optuna_given or _saved_optuna_storage(name, saved)
    else:
        settings = resolve_settings(args)
        mlflow_uri = args.mlflow_uri or f"sqlite:///{folder / 'mlflow.db'}"
        data_dir = str(resolve_data_dir(args.data_dir)) if args.data_dir else None
        if args.data_dir:
            data_dir = str(Path(args.data_dir).expanduser().resolve())
    optuna_url = optuna_storage.resolve(optuna_given) if optuna_given else ""
    if optuna_url:
        optuna_storage.check(optuna_url)
    check_gpus(settings.gpus)  # a preset's or file's GPUs; --gpus was checked with the command line
    if args.resume and not args.mlflow_uri:  # a given --mlflow-uri was checked with the command line
        check_mlflow_uri(mlflow_uri)
    if not args.resume:
        _check_new_name(name, mlflow_uri if args.mlflow_uri else None, optuna_url or None)
    cfg = settings.base_config()
    train, test = load_data(cfg, data_dir or args.data_dir)
    try:
        holdout = carve_validation(train, cfg.n_eval)
    except DataError as exc:
        raise StudyError(f"n_eval (validation images): {exc}") from None
    n_test = settings.confirm_base().n_eval
    if settings.confirm and n_test > len(test):
        raise StudyError(f"confirm_config n_eval={n_test} test images but the test split has {len(test)}; "
                         f"accepted: 1..{len(test)}")
    references = _references(settings, cfg, args.enqueue)
    if pretrained:
        check_pretrained(pretrained, cfg, settings.pretrain_settings())
    cache = Path(args.pretrained_cache).expanduser().resolve() if args.pretrained_cache else default_cache(storage)
    return StudyPlan(settings=settings, name=name, folder=folder, store=store, pretrained_cache=cache,
                     mlflow_uri=mlflow_uri,
                     data_dir=data_dir, cfg=cfg, pool=holdout.pool, val=holdout.val, test=test,
                     optuna_storage=optuna_url, references=tuple(references), pretrained=pretrained,
                     resume=bool(args.resume), verbose=bool(args.verbose))


def _references(settings: StudySettings, cfg: Config, enqueue: str | None) -> list[Reference]:
    """The settings' `references`, then `--enqueue FILE`'s, checked against the space and `cfg`."""
    from search_spaces import SPACES
    from study.enqueue import check_references, read_enqueue

    space = SPACES[settings.space]
    refs = check_references(settings.references, space, cfg, "references") if settings.references else []
    if enqueue:
        refs += read_enqueue(enqueue, space, cfg)
    names = [r.name for r in refs]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise StudyError(f"--enqueue {enqueue}: reference name(s) {', '.join(twice)} are already the settings' "
                         "references; accepted: names not used there")
    if len(refs) > settings.num_trials:
        raise StudyError(f"--num-trials {settings.num_trials} is below the {len(refs)} reference configurations "
                         f"(settings and --enqueue); accepted: --num-trials >= {len(refs)}")
    return refs


def _saved_study(name: str, store: Storage) -> dict[str, Any]:
    """The study.json of a study to resume (`study.args.check_args` made sure it exists)."""
    return store.read_json(STUDY_FILE)


def _check_same_space(name: str, space: str, saved_fingerprint: str | None) -> None:
    """Refuse to resume a study whose search space changed since it started (mixed trials)."""
    from search_spaces import SPACES, fingerprint

    now = fingerprint(SPACES[space])
    if saved_fingerprint and saved_fingerprint != now:
        raise StudyError(f"--resume: space {space!r} changed since study {name!r} started (fingerprint "
                         f"{saved_fingerprint}, now {now}); resume with the code it started with, or start a "
                         "new study")


def _saved_optuna_storage(name: str, saved: dict[str, Any]) -> str | None:
    url = saved.get("optuna_storage")
    if url and "***" in url:
        raise StudyError(f"--resume: study {name!r} keeps its trials in {url}; pass --optuna-storage (or "
                         f"${optuna_storage.ENV}) with the password")
    return url


def _check_new_name(name: str, mlflow_uri: str | None, optuna_url: str | None) -> None:
    """A new study must not land in an existing MLflow experiment or Optuna study of the same name."""
    if mlflow_uri and mlflow_log.client(mlflow_uri).get_experiment_by_name(name) is not None:
        raise StudyError(f"--study-name {name!r}: MLflow at {mlflow_uri} already has an experiment {name!r}; "
                         "pass --resume to continue it, or another --study-name")
    if optuna_url:
        import optuna

        if name in optuna.study.get_all_study_names(storage=optuna_url):
            raise StudyError(f"--study-name {name!r}: {optuna_storage.public(optuna_url)} already holds an Optuna "
                             f"study {name!r}; pass --resume to continue it, or another --study-name")


def _resumed_settings(args: argparse.Namespace, name: str, saved: dict[str, Any]) -> tuple[StudySettings, str, str | None]:
    """(settings, MLflow URI, data dir) of a study to resume: saved ones, some flags over them."""
    from study.settings import StudySettings, merge

    settings = StudySettings(**saved["settings"])
    explicit = resolve_settings(args) if (args.preset or args.config) else None
    for key in SHAPING:
        if explicit is not None and getattr(explicit, key) != getattr(settings, key):
            raise StudyError(f"--resume cannot change {key!r} of study {name!r}; drop --preset/--config")
    override: dict[str, Any] = {k: getattr(args, k) for k in ("num_trials", "max_concurrent", "cpus", "gpus",
                                                              "max_failures", *SCHEDULING) if getattr(args, k) is not None}
    if args.no_confirm:
        override["confirm"] = False
    for flag in ("space", "sampler", "dataset", "epochs", "seed", "constraint"):
        if getattr(args, flag) is not None:
            raise StudyError(f"--resume cannot change --{flag} of study {name!r}")
    settings = merge(settings, override, "the command line")
    settings.validate()
    return settings, args.mlflow_uri or saved["mlflow_uri"], args.data_dir or saved.get("data_dir")


def run(plan: StudyPlan) -> int:
    """Run (or resume) the study of `plan` to its `num_trials` finished trials; returns the exit code."""
    from study.resume import finished_count

    started = time.time()
    leave_job_working_dir()
    quiet_http(max_retries=2, timeout_s=30)
    # a study checkpoints every trial every epoch by design; Tune's sync warning is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not plan.resume:  # a cluster too small for one trial, or a node that cannot log, fails before the study exists
        join_ray(plan)
    opened = open_study(plan)
    try:
        finished = finished_count(opened.study)
        remaining = plan.settings.num_trials - finished
        s = plan.settings
        print(f"study {plan.name}: {finished} finished, {max(remaining, 0)} to run "
              f"({s.space} space, {s.sampler} sampler, {s.max_concurrent} at once)", flush=True)
        for line in where_to_watch(plan, opened):
            print(line, flush=True)
        ctx, stopped = None, None
        if remaining > 0:  # a resume with nothing left to run starts no Ray
            if plan.resume:
                join_ray(plan)
            ctx = shared_context(plan, opened)
            stopped = search(plan, opened, ctx, remaining, started)
        confirmed, confirmed_now = None, False
        if s.confirm:
            confirmed, confirmed_now = confirm(plan, opened, ctx)
        settle(plan)
        report(plan, opened, time.time() - started, confirmed, ran=remaining > 0 or confirmed_now, stopped=stopped)
    finally:
        opened.lease.release()  # (ending the process would too)
    return 0


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
    try:
        plan.store.write_json(STUDY_FILE, {
            "settings": settings.to_dict(), "mlflow_uri": uri, "data_dir": plan.data_dir,
            "validation": plan.validation_record, "pretrained": plan.pretrained,
            "space_fingerprint": fingerprint(SPACES[settings.space]),
            "optuna_storage": optuna_storage.public(plan.optuna_url)})
        storage = optuna.storages.RDBStorage(plan.optuna_url)
        optuna.logging.set_verbosity(optuna.logging.INFO if plan.verbose else optuna.logging.WARNING)
        n_existing = len(optuna.load_study(study_name=name, storage=storage).trials) if plan.resume else 0
        study = optuna.create_study(study_name=name, storage=storage, directions=[optuna.study.StudyDirection[d.upper()] for d in DIRECTIONS],
                                    load_if_exists=True, sampler=make_sampler(
                                        settings.sampler, plan.cfg.seed, settings.population_size, n_existing))
        study.set_metric_names(list(OBJECTIVES))
        local_store = not uri.startswith(("http:", "https:", "databricks"))
        experiment_id = mlflow_log.ensure_experiment(
            uri, name, artifact_location=(folder / "mlartifacts").as_uri() if local_store else None)
        tags = run_tags()
        parent_id = mlflow_log.ensure_parent_run(uri, experiment_id, name, {
            "preset": settings.to_dict(), "space": settings.space, "sampler": settings.sampler,
            "num_trials": settings.num_trials, "study_folder": plan.store.where(),
            "validation": json.dumps(plan.validation_record)},
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


def shared_context(plan: StudyPlan, opened: OpenStudy) -> StudyContext:
    """Data and weights every trial shares: the data subsets and the pre-trained models (made once)."""
    from atop.data import subset
    from study.pretrained import pretrain_once
    from trainables.atop_trainable import StudyContext

    settings, cfg = plan.settings, plan.cfg
    pretrain_settings = settings.pretrain_settings()
    clf_path, pur_path = pretrain_once(
        cfg, pretrain_settings, subset(plan.pool, pretrain_settings.n_train, seed=cfg.seed),
        plan.pretrained_cache, cpus=min(settings.cpus * settings.max_concurrent, _ray_cpus()),
        gpus=settings.gpus, pretrained=plan.pretrained)
    return StudyContext(
        train=subset(plan.pool, cfg.n_train, seed=cfg.seed), eval_data=plan.val,
        classifier_ckpt=clf_path.read_bytes(), purifier_ckpt=pur_path.read_bytes(), mlflow_uri=plan.mlflow_uri,
        spool_dir=str(plan.spool_dir), cpus_per_trial=settings.cpus, gpus_per_trial=settings.gpus,
        tags={**opened.tags, STUDY_TAG: plan.name, PRETRAINED_TAG: f"{clf_path.name},{pur_path.name}"},
        store=plan.store)


def search(plan: StudyPlan, opened: OpenStudy, ctx: StudyContext, n_trials: int, started: float) -> str | None:
    """Run `n_trials` more trials with Ray Tune, asked from and told to the Optuna study; returns why
    `--time-budget` (counted from `started`) or `--stop-on-plateau` ended it early, if either did."""
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
                               stop=settings.search_stop(started))
    trainable = tune.with_resources(tune.with_parameters(train_atop, ctx=ctx),
                                    {"cpu": settings.cpus, "gpu": settings.gpus})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent),
                                    scheduler=scheduler,
                                    num_samples=-1,  # the searcher says when it is done
                                    reuse_actors=True,  # warm workers: see trainables.atop_trainable
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", **plan.store.tune_location(), verbose=1,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    tuner.fit()
    return searcher.stopped


def confirm(plan: StudyPlan, opened: OpenStudy, ctx: StudyContext | None) -> tuple[list[Any], bool]:
    """Fine-tune the front's configurations again on new seeds and score them on test (`study.confirm`).

    Returns:
        (every confirmed configuration's outcome, whether any confirm trial ran now).
    """
    from ray import tune

    from atop.data import subset
    from search_spaces import SPACES
    from study.confirm import Ended, Fit, progress_callback, run_confirm
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
        tuner = tune.Tuner(
            trainable, param_space={"job": tune.grid_search(jobs)},
            tune_config=tune.TuneConfig(max_concurrent_trials=s.max_concurrent, reuse_actors=True,
                                        trial_name_creator=_confirm_name, trial_dirname_creator=_confirm_name),
            run_config=tune.RunConfig(
                name=f"confirm-{time.strftime('%Y%m%d-%H%M%S')}", **plan.store.tune_location(), verbose=1,
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[progress_callback(len(jobs), ended, log=lambda line: print(line, flush=True))]))
        tuner.fit()

    return run_confirm(study=opened.study, space=SPACES[s.space], base=plan.cfg, overrides=s.confirm_config,
                       top=s.confirm_top, seeds=s.confirm_seeds, folder=plan.folder, store=plan.store,
                       uri=plan.mlflow_uri, experiment_id=opened.experiment_id, parent_id=opened.parent_id,
                       start=start, note=level_note(base))


def settle(plan: StudyPlan) -> None:
    """Send the MLflow calls trials spooled during an outage; say where any still unsent are kept."""
    _say_unsent(plan, mlflow_log.flush_spools(plan.spool_dir, plan.mlflow_uri))


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
    return f"confirm-{int(job['number']):04d}-seed{int(job['seed'])}-{trial.trial_id}"


def _trial_name(trial: Any) -> str:
    """Short trial folder names (Tune's default spells out the whole config)."""
    return f"trial-{int(trial.config.get(TRIAL_NUMBER, -1)):04d}-{trial.trial_id}"


def _ray_cpus() -> float:
    """CPUs of the largest alive node: one task (pre-training) must fit on one node."""
    import ray

    per_node = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(per_node, default=0.0) or ray.cluster_resources().get("CPU", 1.0)


def main(argv: list[str] | None = None) -> int:
    """The command: check every input, then run the study; bad input is one `error: ...` line, exit 2."""
    asks_help = any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv))
    args = build_parser(listing=asks_help).parse_args(argv)
    return one_line_errors(lambda: run(prepare(args)), (StudyError,))


if __name__ == "__main__":
    sys.exit(main())
