"""`--time-budget` and `--stop-on-plateau` (study/stopping.py): the searcher stops asking new
trials, real Optuna studies, trials told as Tune would tell them."""
from __future__ import annotations

import time

import optuna
import pytest
from ray.tune.search import Searcher

from atop.config import Config
from search_spaces import SPACES
from study.constraints import parse
from study.errors import StudyError
from study.searcher import AskTellSearcher
from study.settings import StudySettings
from study.stopping import Plateau, SearchStop, front_hypervolume
from tracking.contract import DIRECTIONS, OBJECTIVES


def _searcher(study: optuna.Study, stop: SearchStop | None, n_trials: int = 20, **kw) -> AskTellSearcher:
    return AskTellSearcher(study, SPACES["tiny"], Config(epochs=1), n_trials, lambda n: None, lambda *a: None,
                           stop=stop, log=lambda line: None, **kw)


def _finish(searcher: AskTellSearcher, trial_id: str, values: tuple[float, ...] | None) -> None:
    """One trial as Tune runs it: suggested, then told its last result (None: it raised)."""
    assert isinstance(searcher.suggest(trial_id), dict)
    result = None if values is None else {**dict(zip(OBJECTIVES, values)), "epoch": 1}
    searcher.on_trial_complete(trial_id, result=result, error=values is None)


def test_plateau_parses_k_and_eps_and_refuses_the_rest_in_one_line():
    assert Plateau.parse("8,0.002") == Plateau(8, 0.002)
    assert Plateau.parse("1,0") == Plateau(1, 0.0)
    for bad in ("0,x", "0,0.1", "3", "3,-1", "a,0.1", "2,inf", "2,nan", ""):
        with pytest.raises(StudyError) as err:
            Plateau.parse(bad)
        assert repr(bad) in str(err.value) and "K,EPS" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("settings", [{"time_budget_h": -1}, {"time_budget_h": 0}, {"time_budget_h": float("inf")},
                                      {"time_budget_h": True}, {"stop_on_plateau": "0,x"}])
def test_bad_stops_in_settings_are_refused(settings):
    with pytest.raises(StudyError):
        StudySettings(space="tiny", **settings).validate()


def test_the_search_stops_once_k_finished_trials_stop_growing_the_front():
    study = optuna.create_study(directions=list(DIRECTIONS))
    searcher = _searcher(study, SearchStop(plateau=Plateau(2, 0.001)))
    growing = [(0.2, 0.2, 0.2), (0.3, 0.3, 0.3), (0.4, 0.1, 0.1), (0.5, 0.5, 0.5)]  # each adds volume
    for i, values in enumerate(growing):
        _finish(searcher, f"t{i}", values)
        assert searcher.stopped is None, i
    _finish(searcher, "t4", (0.1, 0.1, 0.1))  # dominated: adds nothing, but the window still holds t3
    assert searcher.stopped is None
    _finish(searcher, "t5", None)  # a failed trial adds nothing either: two in a row
    assert "last 2 finished trials grew the front's hypervolume by 0" in searcher.stopped
    assert searcher.suggest("t6") == Searcher.FINISHED
    assert len(study.trials) == 6  # nothing more was asked


def test_a_trial_that_grows_the_front_by_more_than_eps_keeps_the_search_going():
    study = optuna.create_study(directions=list(DIRECTIONS))
    searcher = _searcher(study, SearchStop(plateau=Plateau(1, 0.01)))
    _finish(searcher, "t0", (0.5, 0.5, 0.5))
    _finish(searcher, "t1", (0.51, 0.5, 0.5))  # +0.0025: inside eps
    assert searcher.stopped is not None
    study2 = optuna.create_study(directions=list(DIRECTIONS))
    searcher2 = _searcher(study2, SearchStop(plateau=Plateau(1, 0.01)))
    _finish(searcher2, "t0", (0.5, 0.5, 0.5))
    _finish(searcher2, "t1", (0.6, 0.5, 0.5))  # +0.025
    assert searcher2.stopped is None


def test_an_infeasible_trial_adds_nothing_to_the_front():
    study = optuna.create_study(directions=list(DIRECTIONS))
    searcher = _searcher(study, SearchStop(plateau=Plateau(1, 0.0)), constraints=parse(["clean_acc>=0.5"]))
    _finish(searcher, "t0", (0.6, 0.1, 0.1))
    _finish(searcher, "t1", (0.4, 0.9, 0.9))  # would dominate a large volume, but breaks the constraint
    assert front_hypervolume(study.trials) == pytest.approx(0.6 * 0.1 * 0.1)
    assert searcher.stopped is not None


def test_running_trials_end_and_are_told_after_the_stop():
    study = optuna.create_study(directions=list(DIRECTIONS))
    searcher = _searcher(study, SearchStop(plateau=Plateau(1, 0.0)))
    _finish(searcher, "t0", (0.5, 0.5, 0.5))
    assert isinstance(searcher.suggest("t1"), dict) and isinstance(searcher.suggest("t2"), dict)  # two at once
    searcher.on_trial_complete("t1", result={**dict(zip(OBJECTIVES, (0.4, 0.4, 0.4))), "epoch": 1})
    assert searcher.stopped is not None and searcher.suggest("t3") == Searcher.FINISHED
    searcher.on_trial_complete("t2", result={**dict(zip(OBJECTIVES, (0.6, 0.6, 0.6))), "epoch": 1})
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3  # the running one was told, not dropped


def test_a_resumed_study_already_on_its_plateau_asks_nothing():
    study = optuna.create_study(directions=list(DIRECTIONS))
    first = _searcher(study, None)
    for i, values in enumerate([(0.5, 0.5, 0.5), (0.1, 0.1, 0.1), (0.2, 0.2, 0.2)]):
        _finish(first, f"t{i}", values)
    resumed = _searcher(study, SearchStop(plateau=Plateau(2, 0.0)))
    assert resumed.stopped is not None and resumed.suggest("t9") == Searcher.FINISHED
    assert _searcher(study, SearchStop(plateau=Plateau(3, 0.0))).stopped is None  # t0 grew it, inside 3


def test_a_spent_time_budget_starts_no_trial_and_an_unspent_one_does():
    stop = SearchStop.of(0.5, None, started=1000.0)
    assert stop is not None and stop.expired(now=1000.0 + 1799) is None
    assert "time budget of 0.5 h is spent" in stop.expired(now=1000.0 + 1800)
    assert SearchStop.of(None, None, started=0.0) is None
    study = optuna.create_study(directions=list(DIRECTIONS))
    spent = _searcher(study, SearchStop.of(0.001, None, started=0.0))  # 1970 + 3.6 s: long spent
    assert spent.suggest("t0") == Searcher.FINISHED and not study.trials
    assert "--time-budget" in spent.stopped
    fresh = _searcher(study, SearchStop.of(1.0, "3,0", started=time.time()))
    assert isinstance(fresh.suggest("t1"), dict)


@pytest.mark.slow
def test_a_real_study_on_its_plateau_stops_asking_and_says_why(cifar_dir, tmp_path):
    """The driver end to end (Ray in-process, MLflow sqlite, tiny preset): a plateau of one trial
    with EPS 1 holds as soon as one trial has finished (no front grows by more than 1)."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from tests.conftest import REPO
    from tracking.contract import ROLE_TAG, SEARCH_STOPPED_TAG, Role

    name, storage = "plateau", tmp_path / "studies"
    cmd = [sys.executable, "study/run.py", "--preset", "tiny", "--num-trials", "5", "--max-concurrent", "1",
           "--epochs", "1", "--stop-on-plateau", "1,1", "--no-confirm", "--data-dir", str(cifar_dir),
           "--storage-path", str(storage), "--study-name", name]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]  # one at a time: nothing else was asked
    assert "the search stopped before --num-trials 5: the last 1 finished trials" in done.stdout
    client = MlflowClient(f"sqlite:///{storage / name / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(ROLE_TAG) == Role.STUDY.value]
    assert len(parent) == 1 and "--stop-on-plateau" in parent[0].data.tags[SEARCH_STOPPED_TAG]
