"""A node's MLflow sender (`tracking.spool_sender`) sends a trial's calls, and the trial imports no MLflow.

Real Ray (in this process, loopback only), a real MLflow sqlite store, real worker processes: the
"trial" is a Ray task that logs through `node_logger` and reports what its process imported.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    from study.cluster import loopback_ray

    loopback_ray()  # before the first `import ray`: bind loopback only
    import ray

    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # `_trial` runs in workers
    try:
        yield ray
    finally:
        ray.shutdown()


def _store(tmp_path: Path) -> tuple[str, str]:
    """(a sqlite tracking URI, a run in it)."""
    from tracking import mlflow_log

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow_log.client(uri)
    return uri, c.create_run(c.create_experiment("sender")).info.run_id


def _trial(uri: str, run_id: str, spool: str, epochs: range, kill_sender_after: int | None = None) -> dict:
    """What a trial does with its logger, in a Ray worker: params, a metric per epoch, FINISHED."""
    import ray

    from tracking.spool_sender import node_logger, sender_name

    log = node_logger(uri, run_id, spool)
    log.log_params({"lr": 0.1})
    for epoch in epochs:
        log.log_metrics({"acc": epoch / 10}, step=epoch)
        if epoch == kill_sender_after:
            ray.kill(ray.get_actor(sender_name(ray.get_runtime_context().get_node_id())))
    log.set_status("FINISHED")
    left = log.close(timeout_s=30)
    return {"left": left, "mlflow_imported": "mlflow" in sys.modules, "remote": type(log._queue).__name__}


def _logged(uri: str, run_id: str) -> tuple[list[tuple[int, float]], str, dict]:
    from tracking import mlflow_log

    c = mlflow_log.client(uri)
    history = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "acc"))
    run = c.get_run(run_id)
    return history, run.info.status, run.data.params


def test_a_trial_logs_through_its_nodes_sender_without_importing_mlflow(ray_session, tmp_path):
    from tracking import spool_sender

    ray = ray_session
    uri, run_id = _store(tmp_path)
    spool = tmp_path / "spool" / "trial-0000.jsonl"
    assert spool_sender.start_senders() == 1 and spool_sender.start_senders() == 1  # one per node, once
    try:
        out = ray.get(ray.remote(num_cpus=0)(_trial).remote(uri, run_id, str(spool), range(1, 6)))
        sender_pid = ray.get(ray.get_actor(spool_sender.sender_name(ray.get_runtime_context().get_node_id()))
                             .pid.remote())
    finally:
        assert spool_sender.stop_senders() == 0
    assert out == {"left": 0, "mlflow_imported": False, "remote": "_NodeQueue"}
    history, status, params = _logged(uri, run_id)
    assert history == [(e, e / 10) for e in range(1, 6)] and status == "FINISHED" and params == {"lr": "0.1"}
    assert not spool.exists()  # everything sent: the spool is gone
    assert _ends_within(sender_pid, 60)  # ray.kill ends the sender's process soon after, not at once


def _ends_within(pid: int, seconds: float) -> bool:
    import time

    import psutil

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def test_without_a_sender_the_trial_sends_its_calls_itself(ray_session, tmp_path):
    ray = ray_session
    uri, run_id = _store(tmp_path)
    out = ray.get(ray.remote(num_cpus=0)(_trial).remote(uri, run_id, str(tmp_path / "t.jsonl"), range(1, 4)))
    assert out == {"left": 0, "mlflow_imported": True, "remote": "SpoolQueue"}
    assert _logged(uri, run_id)[:2] == ([(e, e / 10) for e in range(1, 4)], "FINISHED")


def test_a_sender_that_dies_mid_trial_loses_no_call(ray_session, tmp_path):
    from tracking import spool_sender

    ray = ray_session
    uri, run_id = _store(tmp_path)
    spool_sender.start_senders()
    try:
        out = ray.get(ray.remote(num_cpus=0)(_trial).remote(uri, run_id, str(tmp_path / "t.jsonl"), range(1, 9),
                                                             kill_sender_after=4))
    finally:
        spool_sender.stop_senders()  # the killed one is skipped
    assert out["left"] == 0 and out["mlflow_imported"]  # it went on by itself
    history, status, _ = _logged(uri, run_id)
    assert history == [(e, e / 10) for e in range(1, 9)] and status == "FINISHED"
