"""The driver's pieces without a cluster: ask/tell searcher, resume settling, settings, Pareto table."""
from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

from search_spaces import SPACES
from study.errors import StudyError
from study.lease import Lease
from study.resume import finished_count, settle_interrupted
from study.searcher import AskTellSearcher
from study.settings import (
    SAMPLERS,
    StudySettings,
    load_preset,
    make_sampler,
    merge,
    presets,
)
from study.tables import pareto_table
from tracking import mlflow_log
from tracking.contract import (
    ATTR_REFERENCE,
    DIRECTIONS,
    INTERRUPTED_TAG,
    OBJECTIVES,
    ROLE_TAG,
    RUN_ID,
    TRIAL_LABEL,
    TRIAL_NUMBER,
    Role,
)
from trainables.atop_trainable import split_config

OBJ = dict(zip(OBJECTIVES, (0.8, 0.3, 0.2)))


def _searcher(n_trials=3, space="paper", epochs=2):
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed=0))
    settled, made = [], []
    base = StudySettings(space=space, config={"epochs": epochs}).base_config()

    def new_run(number):
        made.append(number)
        return f"run{number}"

    s = AskTellSearcher(study, SPACES[space], base, n_trials, new_run, lambda n, st, sm: settled.append((n, st)))
    return study, s, settled, made


def test_searcher_asks_tells_complete_pruned_fail_and_finishes():
    study, s, settled, made = _searcher(n_trials=4)
    configs = [s.suggest(f"t{i}") for i in range(4)]
    assert s.suggest("t4") == "FINISHED"
    assert [c[TRIAL_NUMBER] for c in configs] == [0, 1, 2, 3] and made == [0, 1, 2, 3]
    assert configs[0][RUN_ID] == "run0" and configs[0]["train_attack"] == "fgsm"
    s.on_trial_complete("t0", result={**OBJ, "epoch": 2, "compute_s": 3.0, "images_per_s": 50.0})
    s.on_trial_complete("t1", result={**OBJ, "epoch": 1})  # stopped by a scheduler before its last epoch
    s.on_trial_complete("t2", error=True)
    s.on_trial_complete("t3", result={"atop_failed": 1, "atop_error": "FloatingPointError: loss became NaN"})
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.FAIL]
    assert study.trials[0].values == [0.8, 0.3, 0.2] and study.trials[0].user_attrs["compute_s"] == 3.0
    assert "NaN" in study.trials[3].user_attrs["error"]
    assert [n for n, _ in settled] == [0, 1, 2, 3]


def test_a_search_trial_is_named_by_its_reference_and_the_values_its_space_suggested():
    study, s, _, _ = _searcher(n_trials=8)
    study.enqueue_trial({"rt": "rt2", "lambda_ce": 0.0912345}, user_attrs={ATTR_REFERENCE: "paper-default"})
    configs = [s.suggest(f"t{i}") for i in range(8)]
    assert configs[0][TRIAL_LABEL] == "trial 0 (paper-default: lambda_ce=0.09123, rt=rt2)"
    for c in configs[1:]:  # num_masks is a config field of every trial, but only RT3's searched it
        shown = "num_masks=" in c[TRIAL_LABEL]
        assert c[TRIAL_LABEL].startswith(f"trial {c[TRIAL_NUMBER]} (lambda_ce=") and shown == (c["rt"] == "rt3")
    assert split_config(configs[0])[0].lambda_ce == pytest.approx(0.0912345)  # the label is no config field


def test_searcher_uses_the_last_reported_result_when_complete_has_none():
    study, s, _, _ = _searcher(n_trials=1)
    s.suggest("a")
    s.on_trial_result("a", {**OBJ, "epoch": 2})
    s.on_trial_complete("a")
    assert study.trials[0].state is TrialState.COMPLETE


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_drives_a_three_objective_study(name):
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=make_sampler(name, 0, 2, 0))
    for i in range(4):
        trial = study.ask()
        params = SPACES["tiny"].suggest(trial)
        study.tell(trial, [params["lambda_ce"], 1 - params["lambda_ce"], 0.1 * i])
    assert len(study.best_trials) >= 1
    assert "Pareto-optimal trials" in pareto_table(study)


def test_an_unknown_sampler_is_one_line_listing_the_accepted_sorted():
    with pytest.raises(StudyError, match=r"^--sampler 'cmaes' is unknown; accepted: gp, nsga2, random, tpe$"):
        make_sampler("cmaes", 0, 2, 0)


def test_the_pareto_table_says_when_its_figures_are_screening_figures():
    study = optuna.create_study(directions=list(DIRECTIONS))
    study.add_trial(optuna.trial.create_trial(values=[0.5, 0.2, 0.1]))
    note = "screen level: PGD-10, EOT 2, 1 draw; not final"
    assert pareto_table(study, note=note).splitlines()[-1] == f"figures at {note}"
    assert "figures at" not in pareto_table(study)


def test_resume_settles_interrupted_trials_and_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="s", storage=storage, directions=list(DIRECTIONS))
    exp = mlflow_log.ensure_experiment(uri, "s", (tmp_path / "art").as_uri())
    parent = mlflow_log.ensure_parent_run(uri, exp, "s", {"space": "paper"}, {})
    done = study.ask({"lambda_ce": optuna.distributions.FloatDistribution(0.05, 0.1)})
    study.tell(done, [0.5, 0.2, 0.1])
    run_done = mlflow_log.create_trial_run(uri, exp, parent, done.number, "paper", {})  # driver died before settling
    killed = study.ask({"lambda_ce": optuna.distributions.FloatDistribution(0.05, 0.1)})
    run_killed = mlflow_log.create_trial_run(uri, exp, parent, killed.number, "paper", {})
    assert finished_count(study) == 1
    assert settle_interrupted(study, storage, uri, exp, parent, log=lambda m: None) == 1
    assert study.trials[killed.number].state is TrialState.FAIL
    waiting = study.trials[-1]
    assert waiting.state is TrialState.WAITING and waiting.system_attrs["fixed_params"] == killed.params
    assert finished_count(study) == 1
    c = mlflow_log.client(uri)
    assert c.get_run(run_done).info.status == "FINISHED"
    assert c.get_run(run_killed).info.status == "KILLED"
    assert c.get_run(run_killed).data.tags[INTERRUPTED_TAG] == "true"
    assert mlflow_log.ensure_parent_run(uri, exp, "s", {}, {}) == parent  # resume reuses the parent run
    runs = mlflow_log.trial_runs(uri, exp, parent)
    assert sorted(runs) == [0, 1] and runs[0].data.tags[ROLE_TAG] == Role.TRIAL.value


def test_presets_are_valid_and_smoke_is_small():
    assert {"smoke", "tiny", "paper-cifar10", "paper-cifar100"} <= set(presets())
    for name in presets():
        load_preset(name).validate()
    smoke = load_preset("smoke")
    smoke_cfg = smoke.base_config()
    assert smoke.num_trials >= 4 and smoke_cfg.epochs == 2 and smoke_cfg.dataset == "cifar10"
    assert smoke_cfg.n_train == 512  # the study's own override of atop's smoke scale
    paper = load_preset("paper-cifar100")
    paper_cfg = paper.base_config()
    assert (paper_cfg.dataset, paper_cfg.classifier, paper_cfg.purifier, paper.gpus) == ("cifar100", "wrn28_10", "gated", 1)


def test_merge_rejects_unknown_keys():
    with pytest.raises(StudyError, match="'nope'"):
        merge(StudySettings(), {"nope": 1}, "x")
    with pytest.raises(StudyError, match="unknown pretrain"):
        StudySettings(pretrain={"epochs": 3}).validate()


def _plan(tmp_path, uri):
    import torch

    from atop.data import Split
    from study.plan import StudyPlan
    from study.storage import parse

    settings = StudySettings(space="tiny", config={"epochs": 1})
    split = Split(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    return StudyPlan(settings=settings, name="s", folder=tmp_path / "s", store=parse(str(tmp_path)).at("s"),
                     pretrained_cache=tmp_path / ".pretrained-cache",
                     mlflow_uri=uri, data_dir=None,
                     cfg=settings.base_config(), pool=split, val=split, test=split)


def _finished_study():
    study = optuna.create_study(directions=list(DIRECTIONS))
    study.add_trial(optuna.trial.create_trial(values=[0.5, 0.2, 0.1]))
    return study


def test_report_logs_the_table_and_counts_to_the_parent_run(tmp_path, capsys):
    from study.phases import report
    from study.plan import OpenStudy

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = mlflow_log.ensure_experiment(uri, "s", (tmp_path / "art").as_uri())
    parent = mlflow_log.ensure_parent_run(uri, exp, "s", {}, {})
    plan = _plan(tmp_path, uri)
    report(plan, OpenStudy(_finished_study(), None, exp, parent, {}, Lease(lambda: None)), wall_s=12.0, confirmed=None)
    run = mlflow_log.client(uri).get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"trials_complete": 1, "trials_pruned": 0, "trials_fail": 0, "driver_wall_s": 12.0}
    assert [a.path for a in mlflow_log.client(uri).list_artifacts(parent)] == ["pareto.txt"]
    out = capsys.readouterr().out
    assert "figures at screen level: PGD-10, EOT 2, 1 draw; not final" in out and "unreachable" not in out
    assert not list((plan.spool_dir).glob("*.jsonl"))


def test_report_with_mlflow_down_at_the_end_spools_instead_of_raising(tmp_path, capsys, monkeypatch):
    from study.phases import report
    from study.plan import OpenStudy
    from tests.conftest import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    plan = _plan(tmp_path, uri)
    report(plan, OpenStudy(_finished_study(), None, "1", "parent0", {}, Lease(lambda: None)), wall_s=1.0, confirmed=None)
    out = capsys.readouterr().out
    assert "MLflow unreachable: 3 call(s) kept in" in out and "python -m tracking upload" in out
    ops = (plan.spool_dir / "driver-study.jsonl").read_text().splitlines()
    assert [json.loads(op)["op"] for op in ops] == ["artifact", "metrics", "status"]
    assert all(json.loads(op)["run_id"] == "parent0" for op in ops)


def test_the_searcher_pickles_after_ray_replaces_print(monkeypatch):
    # Tune pickles the searcher with its experiment; Ray's tqdm support replaces builtins.print once a
    # worker's output reaches the driver, and a searcher holding the original print then failed to pickle
    import builtins

    from ray import cloudpickle

    study = optuna.create_study(directions=["maximize"] * 3)
    searcher = AskTellSearcher(study, SPACES["tiny"], StudySettings(space="tiny").base_config(), 2,
                               lambda n: None, lambda *a: None)
    monkeypatch.setattr(builtins, "print", lambda *a, **k: None)
    assert cloudpickle.loads(cloudpickle.dumps(searcher)).n_trials == 2


def test_an_interrupted_trial_is_rerun_from_its_newest_complete_checkpoint(tmp_path):
    """Search trials' checkpoints in `tune-*` folders, confirm trials' in `confirm-*` ones (study/layout.py)."""
    from study.resume import latest_checkpoint
    from study.storage import parse
    from tracking.contract import CHECKPOINT_FILES

    store = parse(str(tmp_path / "study"), job=False)
    trial = tmp_path / "study" / "tune-20261130-120000" / "trial-0003-ab12"
    for name, files in (("checkpoint_000000", CHECKPOINT_FILES), ("checkpoint_000001", CHECKPOINT_FILES[:1])):
        (trial / name).mkdir(parents=True)
        for f in files:
            (trial / name / f).write_bytes(b"x")
    (tmp_path / "study" / "tune-20261130-120000" / "trial-0013-cd34" / "checkpoint_000004").mkdir(parents=True)
    # a confirm trial stopped twice: at its third checkpoint, then, resumed, at its second
    for confirm in (tmp_path / "study" / "confirm-20261201-120000" / "confirm-0003-seed2-ef56" / "checkpoint_000002",
                    tmp_path / "study" / "confirm-20261201-130000" / "confirm-0003-seed2-gh78" / "checkpoint_000001"):
        confirm.mkdir(parents=True)
        for f in CHECKPOINT_FILES:
            (confirm / f).write_bytes(b"x")
    # checkpoint_000001 lacks a file (a driver killed while Tune copied it): the one before counts
    assert latest_checkpoint(store, 3) == "tune-20261130-120000/trial-0003-ab12/checkpoint_000000"
    assert latest_checkpoint(store, 13) is None  # a folder without the files is no checkpoint
    assert latest_checkpoint(store, 4) is None
    # a confirm trial's, by its search trial's number and its seed; never taken for the search trial's
    # the newest experiment's (Tune numbers a trial's checkpoints from 0 in each)
    assert latest_checkpoint(store, 3, seed=2) == "confirm-20261201-130000/confirm-0003-seed2-gh78/checkpoint_000001"
    assert latest_checkpoint(store, 3, seed=1) is None
    assert latest_checkpoint(parse(str(tmp_path / "nothing"), job=False), 3) is None


def test_the_default_study_name_is_chosen_once(monkeypatch):
    """The folder (named in `check_args`) and the Optuna study and MLflow experiment (named in
    `prepare`) share one default name even when the clock ticks between the two."""
    import itertools

    from study import args as study_args
    from study.run import build_parser

    ticks = itertools.count()
    monkeypatch.setattr(study_args.time, "strftime", lambda fmt: f"20261130-1629{next(ticks):02d}")
    args = build_parser(listing=False).parse_args(["--preset", "tiny"])
    first = study_args.study_name(args)
    assert first == "tiny-20261130-162900" == study_args.study_name(args) == args.study_name
