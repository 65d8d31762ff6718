"""`--warm-start` (study/warmstart.py): an earlier study's COMPLETE trials reach the new study's
sampler (NSGA-II's first generation included) and nothing else. Real Optuna (sqlite), a real study
folder; the driver end to end in the slow test."""
from __future__ import annotations

import json

import optuna
import pytest

from search_spaces import SPACES, fingerprint
from study.confirm import targets
from study.constraints import parse
from study.errors import StudyError
from study.resume import counts, finished_count
from study.settings import make_sampler
from study.stopping import Plateau
from study.storage import parse as parse_storage
from study.tables import pareto_table
from study.warmstart import NSGA2_GENERATION, copy_trials, own, own_front, source
from tracking.contract import ATTR_WARM_START, DIRECTIONS

TINY = SPACES["tiny"]


def _first_study(tmp_path, points, space=TINY):
    """A finished study `first` in the storage `tmp_path/studies`, as the driver leaves it."""
    root = parse_storage(str(tmp_path / "studies"))
    folder = tmp_path / "studies" / "first"
    folder.mkdir(parents=True)
    url = f"sqlite:///{folder / 'optuna.db'}"
    study = optuna.create_study(study_name="first", storage=url, directions=list(DIRECTIONS),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for values in points:
        trial = study.ask()
        space.suggest(trial)
        study.tell(trial, list(values))
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # not copied
    (folder / "study.json").write_text(json.dumps({
        "settings": {"space": space.name, "config": {"epochs": 2}}, "space_fingerprint": fingerprint(space),
        "optuna_storage": url}))
    return root, url


def _new_study(tmp_path, sampler=None):
    return optuna.create_study(study_name="second", storage=f"sqlite:///{tmp_path / 'second.db'}",
                               directions=list(DIRECTIONS), sampler=sampler)


def test_a_compatible_study_is_found_and_what_differs_is_named(tmp_path):
    root, url = _first_study(tmp_path, [(0.5, 0.2, 0.2)])
    warm = source(root, "first", "second", fingerprint(TINY), f"sqlite:///{tmp_path / 'second.db'}",
                  {"space": "tiny", "config": {"epochs": 3}})
    assert (warm.study, warm.url, warm.differs) == ("first", url, ("config",))  # 2 epochs there, 3 here
    assert "measured with other config than this study's" in warm.note(1)


@pytest.mark.parametrize("other, fingerprint_of, needle", [
    ("nosuch", TINY, "no study of that name"),
    ("second", TINY, "is not another study's name"),
    ("../first", TINY, "is not another study's name"),
    ("first", SPACES["paper"], "searched another space ('tiny'"),
])
def test_an_incompatible_warm_start_is_one_line(tmp_path, other, fingerprint_of, needle):
    root, _ = _first_study(tmp_path, [(0.5, 0.2, 0.2)])
    with pytest.raises(StudyError) as err:
        source(root, other, "second", fingerprint(fingerprint_of), "sqlite:////x.db", {})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_copied_trials_guide_the_sampler_but_count_nowhere(tmp_path):
    # the first study found a point that dominates everything the second one will find
    _, url = _first_study(tmp_path, [(0.9, 0.9, 0.9), (0.1, 0.1, 0.1), (0.2, 0.3, 0.1), (0.3, 0.1, 0.2)])
    study = _new_study(tmp_path, make_sampler("nsga2", seed=0, population_size=4, n_existing=0))
    assert copy_trials(study, "first", url, parse(["clean_acc>=0.15"])) == 4  # COMPLETE ones only
    copied = study.trials
    assert [t.user_attrs[ATTR_WARM_START] for t in copied] == ["first#0", "first#1", "first#2", "first#3"]
    assert all(t.system_attrs[NSGA2_GENERATION] == 0 for t in copied)
    assert [list(t.constraints.values()) for t in copied][1] == [pytest.approx(0.05)]  # judged by our bounds

    # NSGA-II takes the copies as its first generation: the next trial is bred from them (generation 1)
    trial = study.ask()
    TINY.suggest(trial)
    study.tell(trial, [0.5, 0.4, 0.3])
    assert study.trials[-1].system_attrs[NSGA2_GENERATION] == 1

    own_trials = own(study.trials)
    assert [t.number for t in own_trials] == [4] and finished_count(study) == 1 and counts(study)["complete"] == 1
    assert [t.number for t in own_front(study)] == [4]  # first#0 dominates it, but is not this study's
    assert [t.number for t in targets(study, 3)] == [4]
    table = pareto_table(study)
    assert "\n4 " in table and "first#" not in table and "0.900" not in table
    assert Plateau(1, 0.0).reached(study) is None  # its own first trial grew its own front from 0


def test_without_copies_the_own_front_is_optunas(tmp_path):
    study = _new_study(tmp_path)
    for values in [(0.5, 0.5, 0.5), (0.5, 0.5, 0.5), (0.9, 0.1, 0.1), (0.4, 0.4, 0.4)]:
        t = study.ask()
        TINY.suggest(t)
        study.tell(t, list(values))
    assert [t.number for t in own_front(study)] == sorted(t.number for t in study.best_trials) == [0, 1, 2]


@pytest.mark.slow
def test_a_study_warm_started_from_another_runs_its_own_trials_only(cifar_dir, tmp_path):
    """The driver end to end (tiny preset, Ray in-process, MLflow sqlite): the second study copies
    the first's trials, runs and counts its own, and says so."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from tests.conftest import REPO
    from tracking.contract import ROLE_TAG, Role

    storage = tmp_path / "studies"
    common = [sys.executable, "study/run.py", "--preset", "tiny", "--num-trials", "2", "--epochs", "1",
              "--data-dir", str(cifar_dir), "--storage-path", str(storage)]
    first = subprocess.run([*common, "--study-name", "first"], cwd=REPO, capture_output=True, text=True,
                           timeout=900, check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run([*common, "--study-name", "second", "--warm-start", "first"], cwd=REPO,
                            capture_output=True, text=True, timeout=900, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "warm start: 2 COMPLETE trial(s) of study 'first' copied for the sampler only" in second.stdout
    assert "trials: 2 complete, 0 pruned, 0 failed" in second.stdout
    study = optuna.load_study(study_name="second", storage=f"sqlite:///{storage / 'second' / 'optuna.db'}")
    assert [ATTR_WARM_START in t.user_attrs for t in study.trials] == [True, True, False, False]
    assert json.loads((storage / "second" / "study.json").read_text())["warm_start"] == "first"
    client = MlflowClient(f"sqlite:///{storage / 'second' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("second")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(ROLE_TAG) == Role.TRIAL.value]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == [2, 3]  # its own trials only
    again = subprocess.run([*common[:2], "--study-name", "second", "--resume", "--storage-path", str(storage),
                            "--warm-start", "first"], cwd=REPO, capture_output=True, text=True, timeout=300,
                           check=False)
    assert again.returncode == 2 and "--resume cannot change --warm_start" not in again.stderr
    assert "--resume cannot change --warm-start of study 'second'" in again.stderr
