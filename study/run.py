"""Run an AToP hyperparameter study: Optuna proposes, Ray Tune runs the trials, MLflow records.

On this machine (Ray started in-process, MLflow in the study folder):

    python study/run.py --preset smoke --data-dir ../shared/data

On a cluster (the same command, submitted; `--working-dir .` uploads the repository):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python study/run.py --preset paper-cifar10 --mlflow-uri http://MLFLOW:5000 --storage-path /shared/studies

Resume a study (after a crash or to extend it):

    python study/run.py --study-name NAME --resume [--num-trials N]

The study folder `<storage-path>/<study-name>/` holds optuna.db (the source of truth), mlflow.db
(default tracking store), pretrained/, spool/ and the Ray Tune results. Bad input prints one line
`error: ...` to stderr and exits 2 before anything is created. See docs/STUDY.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: import this checkout's packages (atop, study, ...)
    sys.path.insert(0, str(ROOT))

from atop.config import Config
from atop.data import DataError, load_split, resolve_data_dir, subset
from study.settings import (
    NAME_RE,
    OBJECTIVES,
    SAMPLERS,
    StudyError,
    StudySettings,
    load_preset,
    merge,
    presets,
    read_file,
)
from trainables.atop_trainable import FAULT_ENV, TRIAL_NUMBER

EXIT_BAD_INPUT = 2
#: flags that shape the study itself; on --resume they must match what the study was started with
SHAPING = ("space", "sampler", "population_size", "config", "pretrain")
#: early-stopping flags; a resumed study may change them
SCHEDULING = ("scheduler", "grace_period", "reduction_factor")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message; we print one line
        raise StudyError(message)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python study/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help=f"settings preset (default smoke): {', '.join(presets())}")
    p.add_argument("--config", help="settings file (YAML or JSON) merged over the preset")
    p.add_argument("--dataset", help="data set (config key `dataset`)")
    p.add_argument("--data-dir", help="folder with <dataset>_<split>.npz (default $ATOP_DATA_DIR)")
    p.add_argument("--space", help="search space: paper, wide, tiny")
    p.add_argument("--sampler", help=f"Optuna sampler: {', '.join(SAMPLERS)} (default nsga2)")
    p.add_argument("--num-trials", type=int, help="finished trials the study should have")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--cpus", type=float, help="CPUs per trial (fractions allowed)")
    p.add_argument("--gpus", type=float, help="GPUs per trial (fractions allowed)")
    p.add_argument("--max-failures", type=int, help="retries of a failing trial from its checkpoint")
    p.add_argument("--scheduler", help="early stopping: none (default) or mo-asha (stop dominated trials at rungs)")
    p.add_argument("--grace-period", type=int, help="mo-asha: first rung, in epochs (default 1)")
    p.add_argument("--reduction-factor", type=int, help="mo-asha: about 1 in N trials passes each rung (default 3)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs per trial (config key `epochs`)")
    p.add_argument("--seed", type=int, help="seed of the sampler and of every trial (config key `seed`)")
    p.add_argument("--mlflow-uri", help="tracking URI (default sqlite:////<study folder>/mlflow.db)")
    p.add_argument("--storage-path", default="studies", help="parent folder of study folders (default ./studies)")
    p.add_argument("--study-name", help="study name (default <preset>-<date>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the study of --study-name")
    return p


# --- validation: everything is checked before anything is created ----------------------------------------

def resolve_settings(args: argparse.Namespace) -> StudySettings:
    settings = load_preset(args.preset or "smoke")
    if args.config:
        settings = merge(settings, read_file(args.config), f"--config {args.config}")
    flags: dict[str, Any] = {k: getattr(args, k) for k in ("space", "sampler", "num_trials", "max_concurrent",
                                                            "cpus", "gpus", "max_failures", *SCHEDULING)
                             if getattr(args, k) is not None}
    config = {k: getattr(args, k) for k in ("dataset", "epochs", "seed") if getattr(args, k) is not None}
    if config:
        flags["config"] = config
    settings = merge(settings, flags, "the command line")
    settings.validate()
    return settings


def check_mlflow_uri(uri: str) -> None:
    """A one-line `StudyError` unless the tracking URI is usable (http: /health answers in 5 s)."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status != 200:
                    raise StudyError(f"--mlflow-uri {uri} answered HTTP {response.status} on /health")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StudyError(f"--mlflow-uri {uri} is unreachable ({reason}); start the server or pass another URI")
    elif scheme == "sqlite":
        path = uri.split(":///", 1)[-1]
        if not path.startswith("/"):
            raise StudyError(f"--mlflow-uri {uri} is relative; accepted: an absolute sqlite:////abs/path.db "
                             "(a trial's working directory is its own folder)")
        if not Path(path).parent.is_dir():
            raise StudyError(f"--mlflow-uri {uri}: folder {str(Path(path).parent)!r} does not exist")
    elif scheme in ("file", "databricks"):
        pass
    else:
        raise StudyError(f"--mlflow-uri {uri!r} has an unsupported scheme; accepted: http(s)://, sqlite:////, file:///")


def load_data(cfg: Config, data_dir: str | None):
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


def make_sampler(name: str, seed: int, population_size: int, n_existing: int):
    import optuna

    seed = seed + n_existing  # a resumed random stream must not repeat the draws already made
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


def make_scheduler(settings: StudySettings, epochs: int):
    """The Tune scheduler of `--scheduler`: None (run every trial to its last epoch) or MO-ASHA."""
    if settings.scheduler == "mo-asha":
        from study.scheduler import MOASHAScheduler

        return MOASHAScheduler(max_t=epochs, grace_period=settings.grace_period,
                               reduction_factor=settings.reduction_factor)
    return None


def loopback_ray() -> None:
    """Before the first `import ray`: an embedded Ray listens on 127.0.0.1 only.

    Ray on Linux turns a node IP of 127.0.0.1 into the machine's external IP and binds its gRPC
    servers (GCS, raylet, workers) there or on all interfaces; with "cluster mode" off it keeps
    127.0.0.1 and binds loopback only. Read once, when ray is imported. See docs/RELIABILITY.md.
    """
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(cpus_per_trial: float, gpus_per_trial: float) -> None:
    loopback_ray()
    import ray

    if os.environ.get("RAY_ADDRESS"):  # `ray job submit` sets it: join that cluster
        # A cluster's workers get the raylet's environment, not this driver's: the test-only fault
        # hook (trainables.atop_trainable.FAULT_ENV) must travel in the job's runtime env.
        fault = os.environ.get(FAULT_ENV)
        ray.init(log_to_driver=True, **({"runtime_env": {"env_vars": {FAULT_ENV: fault}}} if fault else {}))
    else:  # embedded: a local Ray bound to 127.0.0.1, workers importing this checkout
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"PYTHONPATH": path}}, log_to_driver=True)
    total = ray.cluster_resources()
    if cpus_per_trial > total.get("CPU", 0) or gpus_per_trial > total.get("GPU", 0):
        ray.shutdown()
        raise StudyError(f"a trial asks for {cpus_per_trial:g} CPU and {gpus_per_trial:g} GPU but the Ray cluster "
                         f"has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU")


# --- the study --------------------------------------------------------------------------------------------

def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Validate all input; returns what `run` needs. Creates nothing."""
    if args.resume and not args.study_name:
        raise StudyError("--resume needs --study-name NAME (the study to continue)")
    storage_path = Path(args.storage_path).expanduser().resolve()
    name = args.study_name or f"{args.preset or 'smoke'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not NAME_RE.match(name):
        raise StudyError(f"--study-name {name!r} is invalid; accepted: letters, digits, '.', '_', '-' (max 100)")
    folder = storage_path / name
    saved_file = folder / "study.json"
    if args.resume:
        if not saved_file.is_file():
            raise StudyError(f"--resume: no study {name!r} in {storage_path} ({saved_file} is missing)")
        saved = json.loads(saved_file.read_text())
        settings = StudySettings(**saved["settings"])
        explicit = resolve_settings(args) if (args.preset or args.config) else None
        for key in SHAPING:
            if explicit is not None and getattr(explicit, key) != getattr(settings, key):
                raise StudyError(f"--resume cannot change {key!r} of study {name!r}; drop --preset/--config")
        override = {k: getattr(args, k) for k in ("num_trials", "max_concurrent", "cpus", "gpus", "max_failures",
                                                  *SCHEDULING) if getattr(args, k) is not None}
        for flag in ("space", "sampler", "dataset", "epochs", "seed"):
            if getattr(args, flag) is not None:
                raise StudyError(f"--resume cannot change --{flag} of study {name!r}")
        settings = merge(settings, override, "the command line")
        settings.validate()
        mlflow_uri = args.mlflow_uri or saved["mlflow_uri"]
        data_dir = args.data_dir or saved.get("data_dir")
    else:
        if folder.exists():
            raise StudyError(f"study folder {str(folder)!r} exists; pass --resume to continue it or another --study-name")
        settings = resolve_settings(args)
        mlflow_uri = args.mlflow_uri or f"sqlite:///{folder / 'mlflow.db'}"
        data_dir = str(resolve_data_dir(args.data_dir)) if args.data_dir else None
        if args.data_dir:
            data_dir = str(Path(args.data_dir).expanduser().resolve())
    if args.mlflow_uri or args.resume:
        check_mlflow_uri(mlflow_uri)
    cfg = settings.base_config()
    train, test = load_data(cfg, data_dir or args.data_dir)
    return {"settings": settings, "name": name, "folder": folder, "mlflow_uri": mlflow_uri, "data_dir": data_dir,
            "cfg": cfg, "train": train, "test": test}


def run(p: dict[str, Any], resume: bool) -> int:
    loopback_ray()
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from search_spaces import SPACES
    from study.pretrained import pretrain_once
    from study.resume import counts, finished_count, settle_interrupted
    from study.searcher import AskTellSearcher
    from trainables import tracking
    from trainables.atop_trainable import StudyContext, train_atop

    started = time.time()
    settings: StudySettings = p["settings"]
    cfg: Config = p["cfg"]
    folder: Path = p["folder"]
    name, uri = p["name"], p["mlflow_uri"]
    tracking.quiet_http(max_retries=2, timeout_s=30)
    # a study checkpoints every trial every epoch by design; Tune's sync warning is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not resume:  # a resume with nothing left to run starts no Ray (see `remaining` below)
        init_ray(settings.cpus, settings.gpus)

    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        (folder / "study.json").write_text(json.dumps(
            {"settings": settings.to_dict(), "mlflow_uri": uri, "data_dir": p["data_dir"]}, indent=2))
        storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        n_existing = 0
        if resume:
            n_existing = len(optuna.load_study(study_name=name, storage=storage).trials)
        study = optuna.create_study(study_name=name, storage=storage, directions=["maximize"] * len(OBJECTIVES),
                                    load_if_exists=True, sampler=make_sampler(
                                        settings.sampler, cfg.seed, settings.population_size, n_existing))
        study.set_metric_names(list(OBJECTIVES))
        local_store = not uri.startswith(("http:", "https:", "databricks"))
        experiment_id = tracking.ensure_experiment(
            uri, name, artifact_location=(folder / "mlartifacts").as_uri() if local_store else None)
        tags = run_tags()
        parent_id = tracking.ensure_parent_run(uri, experiment_id, name, {
            "preset": settings.to_dict(), "space": settings.space, "sampler": settings.sampler,
            "num_trials": settings.num_trials, "study_folder": str(folder)}, {**tags, "atop.space": settings.space})
    except Exception:
        if created and not resume:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if resume:
        settle_interrupted(study, storage, uri, experiment_id, parent_id)
    remaining = settings.num_trials - finished_count(study)
    print(f"study {name}: {finished_count(study)} finished, {max(remaining, 0)} to run "
          f"({settings.space} space, {settings.sampler} sampler, {settings.max_concurrent} at once)", flush=True)

    if remaining > 0:
        if resume:
            init_ray(settings.cpus, settings.gpus)
        pretrain_cfg = cfg
        pretrain_settings = settings.pretrain_settings()
        pre_train = subset(p["train"], pretrain_settings.n_train, seed=cfg.seed)
        clf_path, pur_path = pretrain_once(
            pretrain_cfg, pretrain_settings, pre_train, folder / "pretrained",
            cpus=min(settings.cpus * settings.max_concurrent, _ray_cpus()), gpus=settings.gpus)
        ctx = StudyContext(
            train=subset(p["train"], cfg.n_train, seed=cfg.seed), test=subset(p["test"], cfg.n_eval),
            classifier_ckpt=clf_path.read_bytes(), purifier_ckpt=pur_path.read_bytes(), mlflow_uri=uri,
            spool_dir=str(folder / "spool"), cpus_per_trial=settings.cpus, gpus_per_trial=settings.gpus,
            tags={**tags, "atop.study": name, "atop.pretrained": f"{clf_path.name},{pur_path.name}"})
        space = SPACES[settings.space]

        def new_run(number: int) -> str | None:
            return tracking.create_trial_run(uri, experiment_id, parent_id, number, space.name, tags)

        def settle(number: int, state: Any, summary: dict[str, Any]) -> None:
            run_id = study.trials[number].user_attrs.get("mlflow_run_id")
            if not run_id:
                return
            log = tracking.RunLogger(uri, run_id, folder / "spool" / f"driver-{number:04d}.jsonl")
            extra = {"optuna.state": state.name}
            if summary.get("failed"):
                extra[tracking.ERROR_TAG] = tracking.failure_message(uri, run_id, summary["error"])
            if state.name == "PRUNED":
                extra[tracking.STOPPED_TAG] = "true"
            log.set_tags(extra)
            log.set_status("FAILED" if state.name == "FAIL" else "FINISHED")

        searcher = AskTellSearcher(study, space, cfg, remaining, new_run, settle)
        trainable = tune.with_resources(tune.with_parameters(train_atop, ctx=ctx),
                                        {"cpu": settings.cpus, "gpu": settings.gpus})
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent),
                                        scheduler=make_scheduler(settings, cfg.epochs),
                                        num_samples=remaining, reuse_actors=False,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(folder), verbose=1,
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        tuner.fit()

    unsent = tracking.flush_spools(folder / "spool", uri)  # calls spooled by trials during an MLflow outage
    if unsent:
        print(f"MLflow unreachable: {unsent} call(s) kept in {folder / 'spool'}; send them later with "
              f"python -m trainables.tracking upload {folder / 'spool'}/*.jsonl --mlflow-uri {uri}", flush=True)
    wall_s = time.time() - started
    table = pareto_table(study)
    print(table, flush=True)
    c = counts(study)
    client = tracking.client(uri)
    client.log_text(parent_id, table + "\n", "pareto.txt")
    for key in ("complete", "pruned", "fail"):
        client.log_metric(parent_id, f"trials_{key}", c[key])
    client.log_metric(parent_id, "driver_wall_s", wall_s)
    client.set_terminated(parent_id, "FINISHED")
    print(f"\ntrials: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed; driver wall time {wall_s:.0f} s")
    print(f"MLflow: {uri}  experiment {name!r}  parent run {parent_id}")
    print(f"study folder: {folder}  (Optuna: sqlite:///{folder / 'optuna.db'})")
    if uri.startswith("sqlite:"):
        print(f"browse: mlflow ui --backend-store-uri {uri}")
    print(f"analyse: python -m analysis --mlflow-uri {uri} --experiment {name} --out {folder / 'analysis'}")
    return 0


def _trial_name(trial: Any) -> str:
    """Short trial folder names (Tune's default spells out the whole config)."""
    return f"trial-{int(trial.config.get(TRIAL_NUMBER, -1)):04d}-{trial.trial_id}"


def _ray_cpus() -> float:
    """CPUs of the largest alive node: one task (pre-training) must fit on one node."""
    import ray

    per_node = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(per_node, default=0.0) or ray.cluster_resources().get("CPU", 1.0)


def pareto_table(study) -> str:
    """The Pareto-optimal COMPLETE trials as a text table (objectives, then searched params)."""
    best = sorted(study.best_trials, key=lambda t: t.number)
    if not best:
        return "Pareto-optimal trials: none (no trial completed)"
    params = sorted({k for t in best for k in t.params})
    head = ["trial", *OBJECTIVES, *params, "mlflow_run_id"]
    rows = [[str(t.number), *(f"{v:.3f}" for v in t.values), *(_fmt(t.params.get(k, "-")) for k in params),
             t.user_attrs.get("mlflow_run_id", "-")] for t in best]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["Pareto-optimal trials (all objectives maximised):",
             "  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        prepared = prepare(args)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return run(prepared, args.resume)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
