"""End to end: a study searches on validation images only and confirms its front on test images.

Real Ray (embedded, 127.0.0.1), real Optuna and MLflow (sqlite), real CIFAR-10 images; the tiny
preset, so about 2-4 minutes on a shared 2-core CPU.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _image_hashes(x: np.ndarray) -> set[str]:
    return {hashlib.sha1(img.tobytes()).hexdigest() for img in x}


def test_search_scores_on_validation_and_confirm_on_test(cifar_dir, tmp_path):
    import optuna
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    from atop.data import carve_validation, load_split
    from tracking.contract import (
        CONFIRM_OF_RUN_TAG,
        CONFIRM_OF_TAG,
        EVAL_SPLIT_TAG,
        OBJECTIVES,
        PARENT_TAG,
        ROLE_TAG,
        STAGE_TAG,
        TRIAL_TAG,
        Role,
    )

    name, storage = "confirmed", tmp_path / "studies"
    settings = tmp_path / "confirm.yaml"
    settings.write_text("confirm: true\nconfirm_top: 2\nconfirm_seeds: 2\n"
                        "confirm_config: {eval_level: screen, n_eval: 16}\n")
    cmd = [sys.executable, "study/run.py", "--preset", "tiny", "--config", str(settings), "--num-trials", "3",
           "--data-dir", str(cifar_dir), "--storage-path", str(storage), "--study-name", name]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Confirmed on test (2 seeds per config, 16 test images" in done.stdout, done.stdout[-3000:]
    assert "8 validation images (train split)" in done.stdout
    # the confirm stage says as each of its trials starts and ends (never silent for a whole trial)
    assert "confirm: trial " in done.stdout and " started (1 of " in done.stdout, done.stdout[-3000:]
    assert " ended after " in done.stdout and " done: test clean_acc " in done.stdout
    # at default verbosity a user sees none of Optuna's, Ray's or MLflow's own INFO logs and warnings
    # (issue 15: these are the ones a study printed); --verbose brings the INFO logs back
    noise = ("ExperimentalWarning", "Token authentication is enabled", "Creating initial MLflow database tables",
             "Checkpoint successfully created at")
    assert not [n for n in noise if n in done.stdout + done.stderr], done.stdout[-3000:] + done.stderr[-3000:]
    # output that is no terminal gets no colour codes in Ray's prefixes of the workers' lines, and the
    # pre-training task's lines arrive in the order it said them (Ray forwards stdout and stderr apart)
    assert "\x1b[" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert (done.stderr.index("pretrain classifier epoch 1/1:")
            < done.stderr.index("pretrain purifier: 1 epoch(s)")), done.stderr[-3000:]

    folder = storage / name
    record = json.loads((folder / "study.json").read_text())["validation"]
    train = load_split("cifar10", "train", cifar_dir)
    test = load_split("cifar10", "test", cifar_dir)
    val = carve_validation(train, 8).val
    assert record["from"] == "train" and record["images"] == 8
    assert record["rows_sha256"] == hashlib.sha256(json.dumps(val.indices.tolist()).encode()).hexdigest()
    test_images = _image_hashes(test.x.numpy())

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_role: dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get(ROLE_TAG), []).append(r)

    # every search trial scored exactly the recorded validation rows of the train split: no test image
    trials = by_role[Role.TRIAL.value]
    assert len(trials) == 3
    for run in trials:
        assert run.data.tags[EVAL_SPLIT_TAG] == "val" and run.data.tags[STAGE_TAG] == "search"
        path = client.download_artifacts(run.info.run_id, "per_example.parquet", str(tmp_path / run.info.run_id))
        rows = np.array(pq.read_table(path).column("index").to_pylist())
        assert sorted(rows.tolist()) == sorted(val.indices.tolist())
        assert not _image_hashes(train.x[rows].numpy()) & test_images

    # the front's configurations, each confirmed by two seed runs on the first 16 test images
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")
    front = {t.number for t in study.best_trials}
    confirms = by_role[Role.CONFIRM.value]
    assert 1 <= len(confirms) <= 2 and {int(r.data.tags[CONFIRM_OF_TAG]) for r in confirms} <= front
    trial_ids = {r.data.tags[TRIAL_TAG]: r.info.run_id for r in trials}
    seeds = by_role[Role.CONFIRM_SEED.value]
    assert len(seeds) == 2 * len(confirms)
    for run in confirms:
        tags, m = run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED" and tags[STAGE_TAG] == "confirm" and tags[EVAL_SPLIT_TAG] == "test"
        assert tags[CONFIRM_OF_RUN_TAG] == trial_ids[tags[CONFIRM_OF_TAG]]
        assert m["test/n_seeds"] == 2 and m["test/n_images"] == 16
        for o in OBJECTIVES:
            assert m[f"test/{o}_lo"] <= m[f"test/{o}"] <= m[f"test/{o}_hi"] and m[f"test/{o}_sd"] >= 0
            trial = study.trials[int(tags[CONFIRM_OF_TAG])]
            assert m[f"val/{o}"] == pytest.approx(trial.values[OBJECTIVES.index(o)])
            assert m[f"gap/{o}"] == pytest.approx(m[f"val/{o}"] - m[f"test/{o}"])
        children = [s for s in seeds if s.data.tags[PARENT_TAG] == run.info.run_id]
        assert len(children) == 2 and {s.data.tags["seed"] for s in children} == {"1", "2"}
        for s in children:
            assert s.info.status == "FINISHED" and s.data.tags[EVAL_SPLIT_TAG] == "test"
            assert "test/clean_acc" in s.data.metrics and "clean_acc" not in s.data.metrics
            # test images are scored once, after the last epoch (tiny: 2); every epoch reports its losses
            history = {k: [m.step for m in client.get_metric_history(s.info.run_id, k)]
                       for k in ("test/clean_acc", "test/loss/total")}
            assert history == {"test/clean_acc": [2], "test/loss/total": [1, 2]}, history
            path = client.download_artifacts(s.info.run_id, "per_example.parquet", str(tmp_path / s.info.run_id))
            assert pq.read_table(path).column("index").to_pylist() == list(range(16))
    assert (folder / "confirm.json").is_file() and (folder / "confirm.txt").is_file()

    # resuming a finished study confirms nothing twice
    again = subprocess.run([*cmd[:2], "--study-name", name, "--resume", "--storage-path", str(storage),
                            "--data-dir", str(cifar_dir)], cwd=REPO, capture_output=True, text=True, timeout=600,
                           check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"({len(confirms)} already confirmed)" in again.stdout
    after = client.search_runs([exp.experiment_id], max_results=1000)
    assert len(after) == len(runs)
