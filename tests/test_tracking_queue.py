"""Tracking never stalls training (`tracking.mlflow_log`): calls return at once, land once, in order.

Each test but the hung-server one starts a real `mlflow server` on 127.0.0.1 (sqlite store and
artifacts in the test's folder), stops it by PID (SIGTERM of its process group) and starts it again
on the same port and store; those are in the slow tier (`--run-slow`), as real services are.
Nothing of MLflow is mocked. Every wait is bounded.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import free_port, start_mlflow_server, stop_by_pid
from tracking.contract import OPTUNA_STATE_TAG, PARENT_TAG, ROLE_TAG, SPACE_TAG, STUDY_TAG, Role
from tracking.mlflow_log import (
    RunLogger,
    TrialRunKey,
    find_trial_run,
    flush_spools,
    open_trial_run,
    upload,
)

#: what "returns at once" means here: far below a second, on a loaded 2-core machine
AT_ONCE_S = 0.2


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A real MLflow server: `.uri`, `.stop()`, `.start()` (same port, same store)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused try fails at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    class Server:
        def __init__(self):
            self.store, self.port = tmp_path / "mlflow", free_port()
            self.store.mkdir()
            self.uri = f"http://127.0.0.1:{self.port}"
            self.proc = None
            self.start()

        def start(self):
            self.proc = start_mlflow_server(self.store, self.port)

        def stop(self):
            stop_by_pid(self.proc)

    s = Server()
    try:
        yield s
    finally:
        s.stop()


def _timed(call, *args, **kwargs) -> float:
    started = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - started


def _spool_ops(path) -> list[str]:
    return [json.loads(line)["op"] for line in path.read_text().splitlines()]


@pytest.mark.slow  # a real MLflow server (~7 s to start)
def test_calls_return_at_once_while_the_server_is_down_and_land_once_in_order(server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    exp = client.create_experiment("queue")
    run_id = client.create_run(exp).info.run_id
    spool = tmp_path / "spool" / "trial-0000.jsonl"
    log = RunLogger(server.uri, run_id, spool)
    log.log_params({"lr": 1e-4})
    log.log_metrics({"clean_acc": 0.1}, step=1)
    assert log.flush(60) and not spool.exists()

    server.stop()
    artifact = tmp_path / "grid.txt"
    artifact.write_text("an artifact\n")
    took = [_timed(log.log_metrics, {"clean_acc": step / 10, "loss/l1": 1 / step}, step=step) for step in range(2, 12)]
    took += [_timed(log.set_tags, {"device": "cpu"}), _timed(log.log_artifact, artifact),
             _timed(log.set_status, "FINISHED")]
    assert max(took) < AT_ONCE_S, took
    # every call is in the spool file the moment it returns (a process killed now loses none)
    assert _spool_ops(spool) == ["metrics"] * 10 + ["tags", "artifact", "status"]
    started = time.monotonic()
    assert not log.flush(60)  # one failed try ends the wait: the server is down, nothing to wait for
    assert time.monotonic() - started < 15 and log.pending == 13 and log.last_error, log.last_error
    print(f"\n13 calls while the server was down: slowest returned in {max(took) * 1000:.1f} ms")

    server.start()
    assert log.flush(60), log.last_error
    assert not spool.exists() and not log.skipped
    history = client.get_metric_history(run_id, "clean_acc")
    assert [(m.step, m.value) for m in history] == [(s, s / 10) for s in range(1, 12)]  # once each, in order
    assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
    assert len(client.get_metric_history(run_id, "loss/l1")) == 10
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["device"] == "cpu"
    assert [a.path for a in client.list_artifacts(run_id)] == ["grid.txt"]


@pytest.mark.slow  # a real MLflow server (~7 s to start)
def test_the_driver_opens_a_trial_run_without_waiting_and_the_trial_logs_under_its_key(server, tmp_path):
    """The server is down when the driver asks for trial 3: both the driver's and the trial's
    calls return at once; once it is back the run is made once and gets every call."""
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    exp = client.create_experiment("keyed")
    parent = client.create_run(exp, tags={ROLE_TAG: Role.STUDY.value}).info.run_id
    key = TrialRunKey(exp, parent, 3)
    assert TrialRunKey.parse(key.ref) == key and TrialRunKey.parse(parent) is None
    spool = tmp_path / "spool"

    server.stop()
    started = time.perf_counter()
    driver = open_trial_run(server.uri, key, spool / "driver-0003.jsonl", "paper", {STUDY_TAG: "keyed"})
    trial = RunLogger(server.uri, key.ref, spool / "trial-0003.jsonl")
    trial.set_status("RUNNING")
    for epoch in (1, 2):
        trial.log_metrics({"clean_acc": epoch / 4}, step=epoch)
    trial.set_status("FINISHED")
    driver.set_tags({OPTUNA_STATE_TAG: "COMPLETE"})
    driver.set_status("FINISHED")
    took = time.perf_counter() - started
    assert took < 5 * AT_ONCE_S and driver.run_id is None, took

    server.start()
    assert driver.flush(60) and trial.flush(60), (driver.last_error, trial.last_error)
    run_id = find_trial_run(server.uri, key)
    assert run_id and driver.run_id == trial.run_id == run_id
    runs = client.search_runs([exp], "tags.`optuna.trial_number` = '3'")
    assert [r.info.run_id for r in runs] == [run_id]  # one run for the trial
    run = client.get_run(run_id)
    assert run.data.tags[PARENT_TAG] == parent and run.data.tags[SPACE_TAG] == "paper"
    assert run.data.tags[OPTUNA_STATE_TAG] == "COMPLETE" and run.data.tags[STUDY_TAG] == "keyed"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "clean_acc")] == [(1, 0.25), (2, 0.5)]
    # whichever queue ran first, the driver's later FINISHED is the run's final word
    assert run.info.status == "FINISHED" and all("stale" in line for line in trial.skipped), trial.skipped

    # a create replayed again (its first answer lost) finds the run and makes no second one
    again = open_trial_run(server.uri, key, spool / "driver-0003-again.jsonl", "paper", {})
    assert again.flush(60) and again.run_id == run_id
    assert len(client.search_runs([exp], "tags.`optuna.trial_number` = '3'")) == 1


def test_calls_return_at_once_while_the_server_hangs_and_flush_is_bounded(tmp_path, monkeypatch):
    """A server that accepts connections and never answers (hung, or a lost network): each try of
    the thread waits for MLflow's HTTP timeout, the calls still return at once, and `flush` and
    `close` return after their own timeout saying what is left. (main's synchronous logger took
    2 x the HTTP timeout per call here.)"""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel completes the handshakes; nobody ever reads or answers
        spool = tmp_path / "spool" / "trial-0000.jsonl"
        log = RunLogger(f"http://127.0.0.1:{hung.getsockname()[1]}", "0" * 32, spool)
        took = [_timed(log.log_metrics, {"clean_acc": 0.1}, step=step) for step in range(1, 6)]
        took.append(_timed(log.set_status, "FINISHED"))
        assert max(took) < AT_ONCE_S, took
        started = time.monotonic()
        assert not log.flush(timeout_s=2)
        left = log.close(timeout_s=1)  # the thread is inside a try: close does not wait for it
        waited = time.monotonic() - started
        assert left == 6 and _spool_ops(spool) == ["metrics"] * 5 + ["status"]
        assert 2 <= waited < 8, waited


@pytest.mark.slow  # a real MLflow server (~7 s to start)
def test_replay_applies_status_changes_in_time_order(server, tmp_path):
    """A trial's spool (RUNNING, metrics, FINISHED) replayed after the driver ended the run FAILED:
    the metrics land, both older status changes are skipped as stale, the run stays FAILED."""
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    exp = client.create_experiment("order")
    run_id = client.create_run(exp).info.run_id
    spool = tmp_path / "spool" / "trial-0000.jsonl"
    nobody = f"http://127.0.0.1:{free_port()}"
    trial = RunLogger(nobody, run_id, spool)
    trial.set_status("RUNNING")
    trial.log_metrics({"clean_acc": 0.5}, step=1)
    trial.set_status("FINISHED")
    assert trial.close(30) == 3
    time.sleep(0.01)  # the driver's verdict is strictly later (ms clock)
    driver = RunLogger(server.uri, run_id, tmp_path / "spool" / "driver-0000.jsonl")
    driver.set_status("FAILED")
    assert driver.flush(60)
    assert flush_spools(tmp_path / "spool", server.uri) == 0 and not spool.exists()
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(run_id, "clean_acc")] == [0.5]
    skipped = [json.loads(line) for line in spool.with_name(spool.name + ".skipped").read_text().splitlines()]
    assert [(op["op"], op["status"]) for op in skipped] == [("status", "RUNNING"), ("status", "FINISHED")]
    assert all(op["skipped"].startswith("stale") for op in skipped)

    # a later final status does apply: time order, not "first one wins"
    late = RunLogger(server.uri, run_id, tmp_path / "spool" / "late.jsonl")
    late.set_status("KILLED")
    assert late.flush(60) and client.get_run(run_id).info.status == "KILLED"


@pytest.mark.slow  # a real MLflow server (~7 s to start)
def test_a_call_that_can_never_succeed_is_skipped_and_reported_not_blocking_the_rest(server, tmp_path):
    """Refused calls (a changed param, a deleted run, an artifact file that is gone) are skipped,
    listed by `python -m tracking upload` and in SPOOL.skipped; the calls behind them land."""
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    exp = client.create_experiment("refused")
    run_id, deleted = (client.create_run(exp).info.run_id for _ in range(2))
    client.log_param(run_id, "lr", "0.001")
    client.delete_run(deleted)
    spool = tmp_path / "spool" / "trial-0000.jsonl"
    nobody = f"http://127.0.0.1:{free_port()}"
    log, gone = RunLogger(nobody, run_id, spool), RunLogger(nobody, deleted, spool)
    log.log_params({"lr": 0.1})  # MLflow refuses to change a logged param (400)
    gone.log_metrics({"clean_acc": 0.3}, step=1)  # the run was deleted (400)
    log.log_artifact(tmp_path / "never-written.png")
    log.log_metrics({"clean_acc": 0.7}, step=1)
    log.set_tags({"device": "cpu"})
    log.set_status("FINISHED")
    assert log.close(30) == 6

    done = subprocess.run([sys.executable, "-m", "tracking", "upload", str(spool), "--mlflow-uri", server.uri],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all spooled calls sent; 3 skipped for good" in done.stdout, done.stdout
    assert not spool.exists()
    reasons = [json.loads(line)["skipped"] for line in
               spool.with_name(spool.name + ".skipped").read_text().splitlines()]
    assert len(reasons) == 3 and "INVALID_PARAMETER_VALUE" in reasons[0] and "never-written.png" in reasons[2]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.001"} and run.data.tags["device"] == "cpu"
    assert [m.value for m in client.get_metric_history(run_id, "clean_acc")] == [0.7]
    assert upload(spool, server.uri) == 0  # nothing left: a second replay sends nothing


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["stopped", "hung"])
def test_epochs_do_not_stretch_during_a_60_s_outage(server, tmp_path, outage):
    """A training loop (epochs of fixed length) that logs every epoch: for 60 s in the middle the
    server is stopped (SIGTERM: connections refused) or hung (SIGSTOP: connections accepted, never
    answered); no epoch takes longer, and every epoch's metrics land once afterwards."""
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    run_id = client.create_run(client.create_experiment("stretch")).info.run_id
    log = RunLogger(server.uri, run_id, tmp_path / "spool" / "trial-0000.jsonl")
    epoch_s, times = 1.0, {"up": [], "down": []}

    def epoch(state: str) -> None:
        started = time.perf_counter()
        time.sleep(epoch_s)  # the epoch's training, of fixed length: any stretch is tracking's
        step = len(times["up"]) + len(times["down"]) + 1
        log.log_metrics({"clean_acc": step / 1000, "compute_s": step * epoch_s}, step=step)
        log.set_tags({"last_epoch": step})
        times[state].append(time.perf_counter() - started)

    for _ in range(5):
        epoch("up")
    if outage == "stopped":
        server.stop()
    else:
        os.killpg(server.proc.pid, signal.SIGSTOP)  # the process group we started
    down_at = time.monotonic()
    try:
        while time.monotonic() - down_at < 60:
            epoch("down")
    finally:
        if outage == "stopped":
            server.start()
        else:
            os.killpg(server.proc.pid, signal.SIGCONT)
    for _ in range(5):
        epoch("up")
    assert log.flush(60), log.last_error
    epochs = len(times["up"]) + len(times["down"])
    worst = {k: max(v) - epoch_s for k, v in times.items()}
    print(f"\n{epochs} epochs of {epoch_s:.1f} s, {len(times['down'])} during a 60 s outage ({outage}): worst stretch "
          f"{worst['up'] * 1000:.1f} ms with the server up, {worst['down'] * 1000:.1f} ms with it down")
    assert len(times["down"]) >= 50 and worst["down"] < AT_ONCE_S, worst
    assert [m.step for m in client.get_metric_history(run_id, "clean_acc")] == list(range(1, epochs + 1))
