"""End to end: the reproduce space's named arms run as references through search and confirm.

Real Ray (embedded, 127.0.0.1), real Optuna and MLflow (sqlite), real CIFAR-10 images at the tiny
preset's scale (its accuracies mean nothing): three of the seven arms, one confirm seed, so that each
arm's configuration (the classifier alone included) reaches the trainable, the confirm runs and the
results table (`python -m analysis --table`). About 2-4 minutes on a shared 2-core CPU.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

ARMS = ("classifier-alone", "rt2-no-ft", "rt2-atop-pgd-eot")


def test_reproduce_arms_are_searched_confirmed_and_tabled(cifar_dir, tmp_path):
    from mlflow import MlflowClient

    from tracking.contract import REFERENCE_TAG, ROLE_TAG, Role

    name, storage = "arms", tmp_path / "studies"
    settings = tmp_path / "arms.yaml"
    settings.write_text("space: reproduce\nsampler: random\nconfirm: true\nconfirm_seeds: 1\n"
                        "confirm_config: {eval_level: screen, n_eval: 16}\nreferences:\n"
                        + "".join(f"  - {{name: {arm}, arm: {arm}}}\n" for arm in ARMS))
    cmd = [sys.executable, "study/run.py", "--preset", "tiny", "--config", str(settings), "--num-trials", "3",
           "--data-dir", str(cifar_dir), "--storage-path", str(storage), "--study-name", name]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the driver's lines name each reference and count epochs by the arm's own config: an arm that
    # fine-tunes for none is not "stopped early" at epoch 0 of the preset's 2
    for number, arm in enumerate(ARMS):
        assert f"search: trial {number} ({arm}: arm={arm}) started" in done.stdout, done.stdout[-3000:]
    assert "search: trial 1 epoch 0/0 in " in done.stdout and "stopped early" not in done.stdout, done.stdout[-3000:]
    assert "search: trial 2 epoch 2/2 in " in done.stdout

    uri = f"sqlite:///{storage / name / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)
    confirms = {r.data.tags[REFERENCE_TAG]: r for r in runs if r.data.tags.get(ROLE_TAG) == Role.CONFIRM.value}
    assert set(confirms) == set(ARMS)
    # each arm ran as its configuration, not as the study's base config
    params = {arm: confirms[arm].data.params for arm in ARMS}
    assert (params["classifier-alone"]["defense"], params["classifier-alone"]["epochs"]) == ("classifier", "0")
    assert (params["rt2-no-ft"]["defense"], params["rt2-no-ft"]["epochs"]) == ("full", "0")
    pgd = params["rt2-atop-pgd-eot"]
    assert (pgd["train_attack"], pgd["train_grad_path"], pgd["epochs"]) == ("pgd", "defense", "2")
    for run in confirms.values():
        assert 0.0 <= run.data.metrics["test/clean_acc"] <= 1.0 and "test/clean_acc_lo" in run.data.metrics

    table = subprocess.run([sys.executable, "-m", "analysis", "--mlflow-uri", uri, "--experiment", name, "--table"],
                           cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert table.returncode == 0, table.stderr[-2000:]
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert sorted(row.split(" | ")[0].strip("| ") for row in rows) == sorted(ARMS)
    assert any("defense=classifier" in row for row in rows)

    claims = subprocess.run([sys.executable, "-m", "analysis", "--mlflow-uri", uri, "--experiment", name, "--claims"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert claims.returncode == 0, claims.stderr[-2000:]
    # the three arms give (a) atop-pgd-eot vs no-ft and (b) rt2-no-ft vs the classifier alone; the rest is missing
    assert "rt2-atop-pgd-eot - rt2-no-ft" in claims.stdout and "rt2-no-ft - classifier-alone" in claims.stdout
    assert "rt2-ft-lambda0" in claims.stdout  # named as missing, not silently skipped
