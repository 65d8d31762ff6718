"""End to end: `ray job submit` of the smoke study to a real Ray head, logging to a real MLflow server.

Both services run on 127.0.0.1 and are stopped by PID (see conftest.py). The smoke study trains on
real CIFAR-10 images (../shared/data or $ATOP_DATA_DIR): a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import math
import subprocess
import time

import pytest

from tests.conftest import REPO, VENV_BIN, service_env
from tracking.contract import (
    EVAL_LEVEL_TAG,
    EVAL_SPLIT_TAG,
    EVALUATION_TAG,
    OBJECTIVES,
    PARENT_TAG,
    ROLE_TAG,
    SPACE_TAG,
    TRIAL_TAG,
    Role,
)

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 1800


def test_ray_job_submit_smoke_study(ray_head, mlflow_server, cifar_dir, tmp_path):
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    name, job_id = "itest-smoke", f"atop-itest-{int(time.time())}"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.address, "--working-dir", str(REPO),
           "--submission-id", job_id, "--no-wait", "--",
           "python", "study/run.py", "--preset", "smoke", "--data-dir", str(cifar_dir),
           "--mlflow-uri", mlflow_server.uri, "--storage-path", str(tmp_path / "studies"), "--study-name", name]
    env = service_env(RAY_AUTH_MODE="disabled")
    submitted = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr

    jobs = JobSubmissionClient(ray_head.address)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = jobs.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.monotonic() < deadline:
        time.sleep(5)
        status = jobs.get_job_status(job_id)
    logs = jobs.get_job_logs(job_id)
    if status != JobStatus.SUCCEEDED:
        jobs.stop_job(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {status}; last log lines:\n{logs[-5000:]}"
    assert "Pareto-optimal trials" in logs and mlflow_server.uri in logs
    assert f"follow with `ray job logs -f {job_id}`" in logs and "MLflow experiment: http" in logs
    assert "figures at screen level: PGD-10, EOT 2, 1 draw; not final; 64 validation images" in logs
    # the smoke preset's confirm stage: its best configuration, 2 new seeds, 64 test images, said to be screening
    assert "Confirmed on test (2 seeds per config, 64 test images" in logs
    assert "test figures at screen level: PGD-10, EOT 2, 1 draw; not final" in logs

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(name)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == Role.STUDY.value]
    assert len(parents) == 1 and parents[0].info.run_name == name
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parents[0].info.run_id
                and r.data.tags.get(ROLE_TAG) == Role.TRIAL.value]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) >= 4, [(r.info.run_name, r.info.status) for r in children]
    numbers = [r.data.tags[TRIAL_TAG] for r in children]
    assert len(numbers) == len(set(numbers)), "one MLflow child run per Optuna trial"
    for run in finished:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags[ROLE_TAG] == Role.TRIAL.value and tags[SPACE_TAG] == "paper"
        assert tags[EVAL_LEVEL_TAG] == "screen" and tags[EVAL_SPLIT_TAG] == "val"
        assert tags[EVALUATION_TAG].startswith("screening (PGD-") and " val images; eps linf " in tags[EVALUATION_TAG]
        assert tags["git_sha"] and tags["seed"] == "0" and tags["device"] and tags["torch"]
        assert params["rt"] in ("rt1", "rt2", "rt3") and "lambda_ce" in params and "train_attack" in params
        for m in OBJECTIVES:
            assert 0.0 <= metrics[m] <= 1.0 and math.isfinite(metrics[m])
            assert [h.step for h in client.get_metric_history(run.info.run_id, m)] == [1, 2]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"defense.pt", "images.png", "per_example.parquet"} <= artifacts, artifacts
    confirms = [r for r in runs if r.data.tags.get(ROLE_TAG) == Role.CONFIRM.value]
    assert len(confirms) == 1 and confirms[0].info.status == "FINISHED"
    assert confirms[0].data.metrics["test/n_seeds"] == 2
