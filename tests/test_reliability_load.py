"""Load: 100 tiny trials at concurrency 4 (in-process Ray, half a CPU each), every one recorded.

    python study/run.py --preset tiny --num-trials 100 --max-concurrent 4 --cpus 0.5

The study must end with 100 COMPLETE trials in Optuna, 100 FINISHED child runs in MLflow (one per
trial, each with its two epochs of objectives), and `python -m analysis` must read it. The wall
time is printed (`-s`): on the CI machine (2 cores, nothing else running) it is the number quoted
in docs/RELIABILITY.md.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, STUDY_PY
from tracking.contract import OBJECTIVES, TRIAL_TAG, Role, role_filter

pytestmark = pytest.mark.slow
NUM_TRIALS = 100


def test_hundred_tiny_trials_at_concurrency_four(cifar_dir, tmp_path):
    import optuna
    from mlflow import MlflowClient

    storage, name = tmp_path / "studies", "load"
    folder = storage / name
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(STUDY_PY), "--preset", "tiny", "--num-trials", str(NUM_TRIALS), "--max-concurrent", "4",
         "--cpus", "0.5", "--data-dir", str(cifar_dir), "--storage-path", str(storage), "--study-name", name],
        capture_output=True, text=True, timeout=2400, cwd=tmp_path, check=False)
    wall_s = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * NUM_TRIALS, {s: states.count(s) for s in set(states)}
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], role_filter(Role.TRIAL), max_results=1000)
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in runs) == list(range(NUM_TRIALS))
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(set(OBJECTIVES) <= set(r.data.metrics) for r in runs)

    out = tmp_path / "analysis"
    analysed = subprocess.run([sys.executable, "-m", "analysis", "--mlflow-uri", uri, "--experiment", name,
                               "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    table = pq.read_table(out / "runs.parquet")
    assert table.num_rows == NUM_TRIALS + 1  # the trials and the study's parent run
    assert pq.read_table(out / "pareto.parquet").num_rows >= 1 and (out / "report.md").is_file()
    print(f"\nload: {NUM_TRIALS} tiny trials at concurrency 4 in {wall_s:.0f} s "
          f"({wall_s / NUM_TRIALS:.1f} s per trial of wall time); analysis read {table.num_rows} runs")
