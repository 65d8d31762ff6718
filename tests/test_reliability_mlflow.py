"""MLflow outage: the tracking server stopped mid-study and restarted; training goes on, nothing lost.

A real `mlflow server` (127.0.0.1, sqlite store in the test folder) is stopped by PID (SIGTERM of
its process group) once the first epoch metrics of the study's trials reached it, kept down for
about 30 s, and restarted on the same port and store. Meanwhile the trials keep training: their
MLflow calls go to `spool/trial-NNNN.jsonl` (`tracking.mlflow_log.RunLogger`) and the driver waits to
create the next trial's run. Afterwards every per-epoch metric of every trial is on the server
exactly once, every run FINISHED with its artifacts, and no spool file is left.
"""
from __future__ import annotations

import json
import time

import pytest

from tests.conftest import (
    LOOPBACK,
    free_port,
    listening,
    session_procs,
    start_mlflow_server,
    start_study,
    stop_by_pid,
    stop_study,
    wait_for,
)
from tracking.contract import COMPUTE_S, ERROR_TAG, OBJECTIVES, TRIAL_TAG, Role, role_filter

METRICS = (*OBJECTIVES, "loss/l1", COMPUTE_S)
NUM_TRIALS = 3


def _spooled(spool) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in spool.glob("*.jsonl"):
        try:
            ops = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):  # being replaced right now
            continue
        for op in ops:
            counts[op["op"]] = counts.get(op["op"], 0) + 1
    return counts


@pytest.mark.slow
def test_mlflow_server_outage(cifar_dir, tmp_path):
    from mlflow import MlflowClient

    store, port = tmp_path / "mlflow", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(store, port)
    addresses = listening({p.pid for p in session_procs(server.pid)})
    assert addresses and all(ip in LOOPBACK for ip, *_ in addresses), addresses
    storage, name = tmp_path / "studies", "outage"
    spool = storage / name / "spool"
    args = ["--preset", "tiny", "--num-trials", str(NUM_TRIALS), "--max-concurrent", "2", "--cpus", "0.5",
            "--data-dir", str(cifar_dir), "--storage-path", str(storage), "--study-name", name, "--mlflow-uri", uri]
    # trial 0 pauses 8 s after epoch 1, so that its epoch 2 and its end fall into the outage
    study = start_study(args, tmp_path / "driver.log", ATOP_FAULT_INJECT="sleep@trial=0,epoch=1,seconds=8")
    client = MlflowClient(uri)
    seen: dict[str, int] = {}
    try:
        def first_epoch_logged():
            exp = client.get_experiment_by_name(name)
            if exp is None:
                return False
            runs = client.search_runs([exp.experiment_id], role_filter(Role.TRIAL))
            return any("clean_acc" in r.data.metrics for r in runs)

        wait_for(first_epoch_logged, 900, "a trial's epoch-1 metrics on the server", every_s=1, proc=study)
        stop_by_pid(server)  # the outage
        down_at = time.monotonic()
        while time.monotonic() - down_at < 30:
            for op, n in _spooled(spool).items():
                seen[op] = max(seen.get(op, 0), n)
            time.sleep(0.5)
        assert study.poll() is None, "the driver must survive the outage"
        server = start_mlflow_server(store, port)  # same port, same store
        study.wait(timeout=900)
        assert study.returncode == 0, (tmp_path / "driver.log").read_text()[-5000:]
    finally:
        stop_study(study)
        if server.poll() is not None:  # the test failed during the outage
            server = start_mlflow_server(store, port)

    try:
        assert seen.get("metrics", 0) >= 1, f"nothing was spooled during the outage: {seen}"
        assert not list(spool.glob("*.jsonl")), "spool files left unsent"
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], role_filter(Role.TRIAL))
        numbers = sorted(int(r.data.tags[TRIAL_TAG]) for r in runs)
        assert numbers == list(range(NUM_TRIALS)), numbers
        lost = duplicated = 0
        for run in runs:
            assert run.info.status == "FINISHED", (run.info.run_name, run.info.status, run.data.tags.get(ERROR_TAG))
            for m in METRICS:
                steps = [h.step for h in client.get_metric_history(run.info.run_id, m)]
                lost += len({1, 2} - set(steps))
                duplicated += len(steps) - len(set(steps))
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"defense.pt", "images.png", "per_example.parquet"} <= artifacts, artifacts
        assert (lost, duplicated) == (0, 0)
        print(f"\nMLflow outage of ~30 s: calls spooled meanwhile {seen}; after restart: {len(runs)} runs FINISHED, "
              f"{len(runs) * len(METRICS) * 2} metric points checked, {lost} lost, {duplicated} duplicated")
    finally:
        stop_by_pid(server)


def test_spooled_calls_reach_the_store_with_the_upload_command(tmp_path, monkeypatch):
    """A RunLogger whose server is down spools every call; the documented command sends them once."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from tracking.mlflow_log import RunLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("spool", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(exp).info.run_id
    spool = tmp_path / "spool" / "trial-0000.jsonl"
    log = RunLogger(f"http://127.0.0.1:{free_port()}", run_id, spool)  # nobody listens there
    log.log_params({"lr": 1e-4})
    for epoch in (1, 2):
        log.log_metrics({"clean_acc": epoch / 10, "loss/l1": 1 / epoch}, step=epoch)
    log.set_status("FINISHED")
    # close: one more try, then this process stops retrying and leaves the calls to the upload
    assert log.close() == 4 and len(spool.read_text().splitlines()) == 4
    for _ in range(2):  # the second upload finds nothing left: nothing is sent twice
        done = subprocess.run([sys.executable, "-m", "tracking", "upload", str(spool), "--mlflow-uri", uri],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0 and "all spooled calls sent" in done.stdout, done.stderr
        if not spool.exists():
            break
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.0001"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "clean_acc")] == [(1, 0.1), (2, 0.2)]
    assert not spool.exists()
