"""A real study with `--scheduler mo-asha` (Ray in-process, MLflow sqlite): stopped trials are PRUNED
in Optuna, tagged `atop.stopped=true` and FINISHED in MLflow, and kept off both Pareto fronts.

About 1-3 minutes on a shared 2-core CPU (tiny preset, 6 trials x 3 epochs, real CIFAR-10 images).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_mo_asha_study_prunes_tags_and_keeps_stopped_trials_off_the_front(cifar_dir, tmp_path):
    import optuna
    from mlflow import MlflowClient

    from analysis.compute import Objective, analyse
    from analysis.load import load_study
    from tracking.contract import OBJECTIVES, ROLE_TAG, STOPPED_TAG, TRIAL_TAG, Role

    name, storage = "sched", tmp_path / "studies"
    cmd = [sys.executable, "study/run.py", "--preset", "tiny", "--num-trials", "6", "--epochs", "3",
           "--scheduler", "mo-asha", "--grace-period", "1", "--reduction-factor", "2",
           "--data-dir", str(cifar_dir), "--storage-path", str(storage), "--study-name", name]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    folder = storage / name
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")
    states = {t.number: t.state.name for t in study.trials}
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert pruned, states
    assert complete and len(pruned) + len(complete) == 6, states
    assert all(t.user_attrs["stopped_at_epoch"] < 3 and t.values is None for t in pruned)
    assert {t.number for t in study.best_trials} <= {t.number for t in complete}
    assert f"{len(pruned)} pruned" in done.stdout

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = {r.data.tags[TRIAL_TAG]: r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get(ROLE_TAG) == Role.TRIAL.value}
    assert len(runs) == 6
    for t in study.trials:
        run = runs[str(t.number)]
        assert run.info.status == "FINISHED", (t.number, run.info.status)  # never left RUNNING
        assert run.data.tags.get("optuna.state") == t.state.name
        assert "atop.error" not in run.data.tags, run.data.tags["atop.error"]
        if t.state.name == "PRUNED":
            assert run.data.tags.get(STOPPED_TAG) == "true"
            epochs = [m.step for m in client.get_metric_history(run.info.run_id, "clean_acc")]
            assert max(epochs) == t.user_attrs["stopped_at_epoch"]
        else:
            assert STOPPED_TAG not in run.data.tags

    info = analyse(load_study(uri, name).table, [Objective(o) for o in OBJECTIVES])
    assert set(info.trial_numbers.tolist()) == {t.number for t in complete}
    assert info.excluded.get("stopped early") == len(pruned)
