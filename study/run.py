"""Run an AToP hyperparameter study: Optuna proposes, Ray Tune runs the trials, MLflow records.

On this machine (Ray started in-process, MLflow in the study folder):

    python study/run.py --preset smoke --data-dir ../shared/data

On a cluster (the same command, submitted; `--working-dir .` uploads the repository):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python study/run.py --preset paper-cifar10 --mlflow-uri http://MLFLOW:5000 --storage-path /shared/studies

Resume a study (after a crash, a stop, or to extend it; SIGTERM or Ctrl+C stops a study cleanly and prints this
command: study/interrupt.py):

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
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: import this checkout's packages (atop, study, ...)
    sys.path.insert(0, str(ROOT))

# Only light modules here: bad input is refused (study.args, then `prepare`) before torch, Optuna,
# MLflow or Ray are imported; each function imports the heavy modules it needs (tests/test_refusal.py).
from atop.cli import OneLineParser, naming_the_file, one_line_errors
from atop.config import Config
from study import optuna_storage
from study.args import STUDY_FILE, check_args, check_gpus, check_mlflow_uri, study_name
from study.cluster import join_ray, loopback_ray
from study.errors import StudyError
from study.phases import (
    confirm,
    open_study,
    report,
    search,
    settle,
    settle_stopped,
    shared_context,
    where_to_watch,
)
from study.plan import OpenStudy, StudyPlan
from study.storage import Storage, default_cache, leave_job_working_dir, local_folder
from tracking import mlflow_log
from tracking.mlflow_log import quiet_http, quiet_logs

if TYPE_CHECKING:
    from study.enqueue import Reference
    from study.interrupt import StopRequest
    from study.settings import StudySettings

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
    p.add_argument("--sampler", help=f"Optuna sampler (default tpe){names['sampler']}")
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
    p.add_argument("--verbose", action="store_true", help="show Ray's, Optuna's and MLflow's own INFO logs")
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
                   "(spread over the front) on test images (default 3); with --resume, also confirms a study "
                   "that ran with --no-confirm")
    p.add_argument("--confirm-seeds", type=int, help="new fine-tuning seeds per confirmed configuration (default 2; "
                   "one for a configuration that fine-tunes nothing, epochs 0)")
    p.add_argument("--no-confirm", action="store_true", help="skip the confirm stage (the search's figures are "
                   "validation figures only)")
    p.add_argument("--enqueue", metavar="FILE", help="reference configurations (YAML/JSON list of the space's "
                   "parameters, each with an optional name) run first and always confirmed (study/enqueue.py)")
    p.add_argument("--pretrained", metavar="DIR", help="use DIR/classifier.pt (and DIR/purifier.pt if present) "
                   "instead of pre-training (study/pretrained.py)")
    p.add_argument("--warm-start", metavar="STUDY", help="a new study starts with the COMPLETE trials of STUDY (same "
                   "--storage-path, same space) for its sampler only: no runs, not counted, never on the front "
                   "(study/warmstart.py)")
    p.add_argument("--study-name", help="study name (default <preset>-<date>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the study of --study-name")
    return p


# --- validation: everything is checked before anything is created ----------------------------------------

def resolve_settings(args: argparse.Namespace) -> StudySettings:
    from study.settings import load_preset, merge, read_file

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

    def build(with_file: bool, full: bool) -> StudySettings:
        settings = load_preset(args.preset or "smoke")
        if with_file and args.config:
            settings = merge(settings, read_file(args.config), f"--config {args.config}")
        settings = merge(settings, flags, "the command line")
        settings.validate(full=full)
        return settings

    # twice: the light checks first, so that telling whether a bad value came from the file (a second
    # build without it) imports no Optuna when a light check failed
    naming_the_file(lambda with_file: build(with_file, full=False), "--config", args.config, StudyError)
    return naming_the_file(lambda with_file: build(with_file, full=True), "--config", args.config, StudyError)


def load_data(cfg: Config, data_dir: str | None):
    from atop.data import DataError, load_split

    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise StudyError(f"--data-dir {data_dir!r} does not exist; pass the folder holding "
                         f"{cfg.dataset}_train.npz (e.g. --data-dir ../shared/data)")
    try:
        return load_split(cfg.dataset, "train", data_dir), load_split(cfg.dataset, "test", data_dir)
    except DataError as exc:
        raise StudyError(str(exc)) from None


def prepare(args: argparse.Namespace) -> StudyPlan:
    """Resolve and check all input (settings, name, folder, MLflow URI, data); creates nothing.

    The checks of the command line alone come first (`study.args.check_args`: no heavy import).
    """
    storage, store = check_args(args)
    name = study_name(args)
    folder = local_folder(store)
    pretrained = str(Path(args.pretrained).expanduser().resolve()) if args.pretrained else None
    optuna_given = args.optuna_storage or os.environ.get(optuna_storage.ENV)
    saved: dict[str, Any] = {}
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
        data_dir = str(Path(args.data_dir).expanduser().resolve()) if args.data_dir else None
    optuna_url = optuna_storage.resolve(optuna_given) if optuna_given else ""
    if optuna_url:
        optuna_storage.check(optuna_url)
    check_gpus(settings.gpus)  # a preset's or file's GPUs; --gpus was checked with the command line
    if args.resume and not args.mlflow_uri:  # a given --mlflow-uri was checked with the command line
        check_mlflow_uri(mlflow_uri)
    if not args.resume:
        _check_new_name(name, mlflow_uri if args.mlflow_uri else None, optuna_url or None)
    cfg = settings.base_config()
    references = _references(settings, cfg, args.enqueue)
    warm = None
    if args.warm_start:  # a resumed study refused it above (its trials were copied when it was created)
        from search_spaces import SPACES, fingerprint
        from study.warmstart import source

        warm = source(storage, args.warm_start, name, fingerprint(SPACES[settings.space]),
                      optuna_url or f"sqlite:///{folder / 'optuna.db'}", settings.to_dict())
    # the checks that need torch last (checkpoints and data are torch tensors); the data's, the slowest, at the end
    from study.pretrained import (
        check_classifier_checkpoint,
        check_pretrained,
        recorded_weights,
        weights_named_by_trials,
    )

    # a file that is no torch file is refused before torch is imported
    pretrain = settings.pretrain_settings()
    if pretrained:
        check_pretrained(pretrained, cfg, pretrain)
    elif pretrain.classifier_checkpoint:
        check_classifier_checkpoint(pretrain.classifier_checkpoint, cfg)
    from atop.data import DataError, carve_validation

    cache = Path(args.pretrained_cache).expanduser().resolve() if args.pretrained_cache else default_cache(storage)
    # a resumed study's trials keep the weights they started with: they must still be there
    weights = None
    if args.resume and saved.get("weights"):
        weights = recorded_weights(cache, saved["weights"])
    elif args.resume:  # a study from before study.json recorded them: its trial runs name them
        weights = weights_named_by_trials(cache, mlflow_log.pretrained_of_trials(mlflow_uri, name))
    train, test = load_data(cfg, data_dir or args.data_dir)
    try:
        holdout = carve_validation(train, cfg.n_eval)
    except DataError as exc:
        raise StudyError(f"n_eval (validation images): {exc}") from None
    n_test = settings.confirm_base().n_eval
    if settings.confirm and n_test > len(test):
        raise StudyError(f"confirm_config n_eval={n_test} test images but the test split has {len(test)}; "
                         f"accepted: 1..{len(test)}")
    return StudyPlan(settings=settings, name=name, folder=folder, store=store, pretrained_cache=cache,
                     mlflow_uri=mlflow_uri,
                     data_dir=data_dir, cfg=cfg, pool=holdout.pool, val=holdout.val, test=test,
                     optuna_storage=optuna_url, references=tuple(references), pretrained=pretrained,
                     resume=bool(args.resume), verbose=bool(args.verbose), warm_start=warm, weights=weights,
                     storage_path=args.storage_path if storage.remote else storage.where(),
                     cache_given=bool(args.pretrained_cache))


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
    """The study.json of a study to resume (`study.args.check_args` made sure it exists), or a
    one-line `StudyError` naming it when it is not one this project wrote."""
    import dataclasses

    from study.settings import StudySettings

    where = f"--resume: {store.where(STUDY_FILE)!r}"
    expected = f"expected the {STUDY_FILE} that study {name!r} was started with"
    try:
        saved = store.read_json(STUDY_FILE)
    except (OSError, ValueError) as exc:  # a folder, not UTF-8, not JSON
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise StudyError(f"{where} cannot be read as JSON ({reason}); {expected}") from None
    settings = saved.get("settings") if isinstance(saved, dict) else None
    if not isinstance(settings, dict) or not isinstance(saved.get("mlflow_uri"), str):
        raise StudyError(f"{where} holds no study's settings and MLflow URI; {expected}")
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(StudySettings)})
    if unknown:
        raise StudyError(f"{where} has unknown setting(s) {', '.join(map(repr, unknown))}; {expected}")
    return saved


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
    if args.confirm_top is not None or args.confirm_seeds is not None:
        override["confirm"] = True  # a study searched with --no-confirm is confirmed later this way
    if args.no_confirm:
        override["confirm"] = False
    for flag in ("space", "sampler", "dataset", "epochs", "seed", "constraint", "warm_start"):
        if getattr(args, flag) is not None:
            raise StudyError(f"--resume cannot change --{flag.replace('_', '-')} of study {name!r}")
    settings = merge(settings, override, "the command line")
    settings.validate()
    return settings, args.mlflow_uri or saved["mlflow_uri"], args.data_dir or saved.get("data_dir")


def run(plan: StudyPlan) -> int:
    """Run (or resume) the study of `plan` to its `num_trials` finished trials; returns the exit code:
    0, or 128 + the signal's number when a SIGTERM (143) or Ctrl+C (130) stopped it (settled, resumable:
    `study.interrupt`)."""
    loopback_ray()  # before the first `import ray` (study.interrupt's, below): an embedded Ray binds 127.0.0.1 only
    from study.interrupt import StopRequest, catch_stop_signals

    started = time.time()
    leave_job_working_dir()
    quiet_http(max_retries=2, timeout_s=30)
    # a study checkpoints every trial every epoch by design; Tune's sync warning is noise here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    interrupt = StopRequest()
    with catch_stop_signals(interrupt):
        if not plan.resume:  # a cluster too small for one trial, or a node that cannot log, fails before the study exists
            join_ray(plan)
        if interrupt.reason:
            print(f"{interrupt.reason}: stopped before study {plan.name} was created; nothing was written", flush=True)
            return interrupt.exit_status
        opened = open_study(plan)
        try:
            return _run_open(plan, opened, started, interrupt)
        finally:
            opened.lease.release()  # (ending the process would too)


def _run_open(plan: StudyPlan, opened: OpenStudy, started: float, interrupt: StopRequest) -> int:
    """`run`'s work once the study is open: search, confirm, report; each phase is skipped once `interrupt`
    is set, and the study settled (`study.phases.settle_stopped`)."""
    from study.pretrained import PretrainingStopped
    from study.resume import finished_count

    finished = finished_count(opened.study)
    remaining = plan.settings.num_trials - finished
    s = plan.settings
    print(f"study {plan.name}: {finished} finished, {max(remaining, 0)} to run "
          f"({s.space} space, {s.sampler} sampler, {s.max_concurrent} at once)", flush=True)
    for line in where_to_watch(plan, opened):
        print(line, flush=True)
    ctx, stopped = None, None
    if remaining > 0 and not interrupt.reason:  # a resume with nothing left to run starts no Ray
        if plan.resume:
            join_ray(plan)
        try:
            ctx = shared_context(plan, opened, stop=interrupt.stop_all)
        except PretrainingStopped:
            print(f"{interrupt.reason}: pre-training stopped; --resume goes on after its last finished epoch "
                  f"(kept in {plan.pretrained_cache})", flush=True)
        else:
            stopped = search(plan, opened, ctx, remaining, started, interrupt)
    if interrupt.reason:
        return settle_stopped(plan, opened, interrupt)
    confirmed, confirmed_now = None, False
    if s.confirm:
        confirmed, confirmed_now = confirm(plan, opened, ctx, interrupt)
        if interrupt.reason:
            return settle_stopped(plan, opened, interrupt)
    settle(plan)
    report(plan, opened, time.time() - started, confirmed, ran=remaining > 0 or confirmed_now, stopped=stopped)
    if interrupt.reason:  # it came while the finished study was settled and reported: nothing to stop
        print(f"{interrupt.reason}: it came after the study had finished; nothing was stopped", flush=True)
        return interrupt.exit_status
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: check every input, then run the study; bad input is one `error: ...` line, exit 2."""
    asks_help = any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv))
    args = build_parser(listing=asks_help).parse_args(argv)
    quiet_logs(args.verbose)
    try:
        return one_line_errors(lambda: run(prepare(args)), (StudyError,))
    except KeyboardInterrupt:  # Ctrl+C while the input is checked (`run` catches it from Ray's start on)
        print("stopped (SIGINT, Ctrl+C) while checking the input; nothing was created", file=sys.stderr)
        return 128 + signal.SIGINT  # as `study.interrupt.StopRequest.exit_status` (which imports Ray)


if __name__ == "__main__":
    sys.exit(main())
