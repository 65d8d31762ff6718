"""A Ray worker node lost mid-trial: the trial is retried elsewhere from its checkpoint.

A real Ray head (conftest `ray_head`, 2 CPUs) and a second node on this machine (`ray start
--address`, 1 CPU, resource `worker_node`) in its own session. The study driver joins the cluster
(`RAY_ADDRESS`) and runs 3 trials of 1 CPU at once, so one of them runs on the second node; every
trial pauses 25 s after epoch 1 (test-only `ATOP_FAULT_INJECT` sleep, once per trial). While they
pause with an epoch-1 checkpoint in the study folder (which every node reads), every process of the
second node is SIGKILLed by PID. Tune retries the lost trial on the head from that checkpoint
(`FailureConfig`); the study completes, each trial with one MLflow run and each epoch logged once.
A study whose MLflow server one node cannot reach is refused before it exists (study.nodes).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    LOOPBACK,
    STUDY_PY,
    alive_nodes,
    free_port,
    kill_session,
    listening,
    service_env,
    session_procs,
    start_ray_node,
    start_study,
    stop_by_pid,
    stop_study,
    wait_for,
)
from tracking.contract import RESTORED_TAG, TRIAL_TAG, Role, role_filter

pytestmark = pytest.mark.slow
NUM_TRIALS = 3


def _runs_a_trial(proc) -> bool:
    try:
        return "ImplicitFunc" in " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - exited meanwhile
        return False


def _start_node(ray_head, tmp_path, **env: str) -> subprocess.Popen:
    """A second Ray node on this machine (1 CPU, resource `worker_node`) in its own session."""
    return start_ray_node(ray_head, tmp_path, resources='{"worker_node": 1}', **env)


def test_worker_node_killed_mid_trial(ray_head, cifar_dir, tmp_path):
    import optuna
    from mlflow import MlflowClient

    node = _start_node(ray_head, tmp_path)
    storage, name = tmp_path / "studies", "nodelost"
    folder = storage / name
    study = None
    try:
        wait_for(lambda: len(alive_nodes(ray_head.address)) >= 2, 120, "the second Ray node to join", proc=node)
        hold = f"sleep@trial=*,epoch=1,seconds=45,once={tmp_path / 'held-{trial}'}"
        study = start_study(["--preset", "tiny", "--num-trials", str(NUM_TRIALS), "--max-concurrent", str(NUM_TRIALS),
                             "--cpus", "1", "--max-failures", "1", "--data-dir", str(cifar_dir),
                             "--storage-path", str(storage), "--study-name", name],
                            tmp_path / "driver.log", RAY_ADDRESS=ray_head.gcs_address, RAY_AUTH_MODE="disabled",
                            ATOP_FAULT_INJECT=hold)

        def held_on_node():
            held = list(folder.glob("tune-*/trial-*/checkpoint_000000"))
            on_node = [p for p in session_procs(node.pid) if _runs_a_trial(p)]
            return on_node if len(held) >= NUM_TRIALS and on_node else None

        victims = wait_for(held_on_node, 900, "all trials paused after epoch 1, one on the second node",
                           every_s=1, proc=study)
        pids = {p.pid for p in session_procs(ray_head.proc.pid) + session_procs(node.pid)}
        addresses = listening(pids)
        # a multi-node Ray cannot keep to loopback (docs/RELIABILITY.md); what we set, the dashboard, does
        dash_port = int(ray_head.address.rsplit(":", 1)[1])
        dashboard = [ip for ip, port, _ in addresses if port == dash_port]
        assert dashboard and all(ip in LOOPBACK for ip in dashboard), dashboard
        killed = kill_session(node.pid)  # the node lost: every process of its session, by PID
        lost_at = time.monotonic()
        node.wait(timeout=60)
        study.wait(timeout=900)
        assert study.returncode == 0, (tmp_path / "driver.log").read_text()[-5000:]
        wall = time.monotonic() - lost_at
    finally:
        if study is not None:
            stop_study(study)
        stop_by_pid(node)
        kill_session(node.pid)

    opt = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")
    assert [t.state.name for t in opt.trials] == ["COMPLETE"] * NUM_TRIALS
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], role_filter(Role.TRIAL))
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in runs) == list(range(NUM_TRIALS))
    assert all(r.info.status == "FINISHED" for r in runs)
    restored = [r for r in runs if r.data.tags.get(RESTORED_TAG) == "1"]
    assert len(restored) == len(victims) == 1, [r.data.tags.get(RESTORED_TAG) for r in runs]
    for run in runs:
        assert [h.step for h in client.get_metric_history(run.info.run_id, "clean_acc")] == [1, 2]
    # the retry read the checkpoint from the study folder (shared storage), not from the lost node
    log = (tmp_path / "driver.log").read_text()
    assert f"from checkpoint: Checkpoint(filesystem=local, path={folder}/" in log
    print(f"\nnode lost: {killed} processes of the second node killed, 1 trial on it; retried from its epoch-1 "
          f"checkpoint in the study folder; study done {wall:.0f} s later: {NUM_TRIALS} COMPLETE, "
          f"{len(runs)} runs, 0 lost, 0 duplicated")


def test_a_node_that_cannot_reach_mlflow_is_refused_before_the_study_exists(ray_head, mlflow_server, cifar_dir,
                                                                             tmp_path):
    """The driver reaches the MLflow server; the second node's HTTP goes through a proxy where nothing
    listens (as a misconfigured node's would). The study is refused in one line naming that node
    only, before any study folder or MLflow experiment exists."""
    from mlflow import MlflowClient

    dead_proxy = f"http://127.0.0.1:{free_port()}"
    node = _start_node(ray_head, tmp_path, http_proxy=dead_proxy, HTTP_PROXY=dead_proxy, no_proxy="", NO_PROXY="",
                       no_grpc_proxy="*")  # Ray's own gRPC between nodes must not take the proxy
    storage, name = tmp_path / "studies", "unreachable"
    try:
        wait_for(lambda: len(alive_nodes(ray_head.address)) >= 2, 120, "the second Ray node to join", proc=node)
        done = subprocess.run([sys.executable, str(STUDY_PY), "--preset", "tiny", "--data-dir", str(cifar_dir),
                               "--storage-path", str(storage), "--study-name", name, "--mlflow-uri", mlflow_server.uri],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False,
                              env=service_env(RAY_ADDRESS=ray_head.gcs_address, RAY_AUTH_MODE="disabled"))
    finally:
        stop_by_pid(node)
        kill_session(node.pid)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stdout[-2000:] + done.stderr[-4000:]
    assert "from the Ray nodes that would run trials" in errors[0] and "unreachable" in errors[0], errors
    named = re.findall(r"node [0-9a-f]{8} \(", errors[0])
    assert len(named) == 1, errors  # the head reaches the server: only the proxied node is named
    assert not (storage / name).exists()
    assert MlflowClient(mlflow_server.uri).get_experiment_by_name(name) is None
