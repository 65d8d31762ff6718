"""A cluster in one machine: docs/CLUSTER.md's recipe, end to end, on two Ray nodes.

Real services, each started here and stopped by PID: PostgreSQL (one server, databases `mlflow`
and `optuna`), moto's S3 server (buckets `atop-studies` and `atop-mlflow`), `mlflow server` on that
PostgreSQL with its artifacts proxied to S3, a Ray head (1 CPU) and a second Ray node (1 CPU). The
second node runs in its own network namespace, joined to this one by a veth pair, and sees an
empty tmpfs over the test's folder (its own mount namespace): it reaches the head, MLflow and S3 only over the
veth, and cannot read the test's folders (the head's Ray temp dir, the driver's home, the
pre-training cache). Where namespaces cannot be made (not root, no `ip`), the second node is a plain
`ray start --address` with its own temp dir on 127.0.0.1, and the test says so.

The study is submitted as the recipe does (`ray job submit --working-dir .`, `--storage-path
s3://...?endpoint_override=...`, the Optuna URL in the job's environment): 2 trials of the `tiny`
preset at once, one on each node (every trial's MLflow run is tagged with its Ray node); then a
fresh driver (`--resume --num-trials 4`) finishes the study. Checked: study.json, both Tune
experiments and every trial's checkpoints in the study bucket, every trial's artifacts in the MLflow
bucket, nothing of the study in the repository or the job's working dirs, and Optuna (PostgreSQL)
and MLflow (the server) agreeing on 4 trials, each COMPLETE/FINISHED and counted once.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from study.optuna_storage import ENV as OPTUNA_ENV
from tests.conftest import (
    REPO,
    VENV_BIN,
    alive_nodes,
    free_port,
    kill_session,
    service_env,
    start_mlflow_server,
    start_ray_head,
    start_ray_node,
    stop_by_pid,
    wait_for,
)
from tests.services import S3_KEYS, create_database, make_bucket, postgres, s3, s3_keys
from tracking.contract import NODE_TAG, OPTUNA_STATE_TAG, TRIAL_TAG, Role, role_filter

pytestmark = pytest.mark.slow
NAME, FIRST, TOTAL = "twonode", 2, 4
JOB_TIMEOUT_S = 900
#: names a study leaves in a folder it writes to (its folder, its stores, Tune's experiments)
STUDY_FILES = (NAME, "study.json", "optuna.db", "mlflow.db", "mlruns", "spool")


@dataclass(frozen=True)
class Link:
    """How the second node is reached: the head side's address, the node's, and what runs it."""

    host: str  # this namespace's address on the link: the head and the services listen there
    node: str  # the second node's address
    prefix: tuple[str, ...]  # the command that execs the node's `ray start` (in its namespaces)
    isolated: bool  # its own network namespace, the test's folder hidden (else: 127.0.0.1 and its own Ray temp dir)


def _free_subnet() -> str:
    """The first three octets of a 10.213.N.0/30 no interface of this machine uses."""
    used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    start = os.getpid() % 250
    for n in (*range(start, 250), *range(start)):
        if f" 10.213.{n}." not in used:
            return f"10.213.{n}"
    raise RuntimeError("no free 10.213.N.0/30 subnet")


@contextlib.contextmanager
def node_link(hidden: Path) -> Iterator[Link]:
    """A network namespace joined to this one by a veth pair (deleted after), whose node sees an empty
    folder at `hidden` (the test's own files), or loopback where namespaces cannot be made."""
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("unshare")):
        yield Link("127.0.0.1", "127.0.0.1", (), isolated=False)
        return
    ns, pid = f"atop-{os.getpid()}", os.getpid()
    host_if, node_if, net = f"atop{pid}h", f"atop{pid}n", _free_subnet()
    host, node = f"{net}.1", f"{net}.2"
    steps = [["ip", "netns", "add", ns],
             ["ip", "link", "add", host_if, "type", "veth", "peer", "name", node_if, "netns", ns],
             ["ip", "addr", "add", f"{host}/30", "dev", host_if], ["ip", "link", "set", host_if, "up"],
             ["ip", "-n", ns, "addr", "add", f"{node}/30", "dev", node_if],
             ["ip", "-n", ns, "link", "set", node_if, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        print(f"\nno network namespace ({' '.join(exc.cmd)}: {exc.stderr.strip()}); the second node shares 127.0.0.1")
        yield Link("127.0.0.1", "127.0.0.1", (), isolated=False)
        return
    # each step execs the next, so the process the test starts is the node's `ray start` itself. Only
    # the test's folder is hidden, not all of /tmp: a CI checkout (its venv) and ../shared may live there
    hide = 'mount -t tmpfs -o mode=1777 tmpfs "$1" && shift && exec "$@"'
    prefix = ("ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "--",
              "sh", "-c", hide, "sh", str(hidden))
    try:
        yield Link(host, node, prefix, isolated=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)  # deletes the veth pair with it


def _submit(head_address: str, job_id: str, optuna_url: str, args: list[str]) -> str:
    """`ray job submit --no-wait` of `study/run.py ARGS` as docs/CLUSTER.md does; waits for the job
    to succeed and returns its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head_address, "--submission-id", job_id,
           "--no-wait", "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"env_vars": {OPTUNA_ENV: optuna_url}}), "--",
           "python", "study/run.py", *args]
    submitted = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                               env=service_env(RAY_AUTH_MODE="disabled"))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    jobs = JobSubmissionClient(head_address)
    ended = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    try:
        status = wait_for(lambda: (s := jobs.get_job_status(job_id)) in ended and s, JOB_TIMEOUT_S,
                          f"job {job_id} to end", every_s=2)
    except TimeoutError:
        jobs.stop_job(job_id)
        raise
    logs = jobs.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} {status}; last log lines:\n{logs[-5000:]}"
    return logs


def _study_files(root: Path, names: tuple[str, ...] = STUDY_FILES, prefixes: tuple[str, ...] = ("tune-",)) -> list[str]:
    """Paths below `root` named one of `names` or starting with one of `prefixes` (Tune's experiments)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv")]
        found += [os.path.join(folder, n) for n in dirs + files if n in names or n.startswith(prefixes)]
    return found


def _job_working_dirs(ray_temp: Path) -> list[Path]:
    """The unpacked `--working-dir` copies under a node's Ray temp dir (Ray may have deleted them)."""
    return sorted(ray_temp.glob("session_*/runtime_resources/working_dir_files"))


def test_a_study_on_two_nodes_keeps_its_state_in_the_buckets_and_resumes(cifar_dir):
    import optuna
    from mlflow import MlflowClient

    started = time.monotonic()
    # short, not pytest's tmp_path: Ray's sockets live below the head's temp dir (107 bytes at most)
    tmp = Path(tempfile.mkdtemp(prefix="atop-2n-"))
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(node_link(tmp))
        mlflow_db = stack.enter_context(postgres(tmp, "mlflow"))
        # the recipe's spelling: `postgresql://` (the study picks psycopg 3 itself)
        optuna_url = create_database(mlflow_db, "optuna").replace("postgresql+psycopg://", "postgresql://", 1)
        endpoint = stack.enter_context(s3(tmp, host=link.host))
        for bucket in ("atop-studies", "atop-mlflow"):
            make_bucket(endpoint, bucket)
        mlflow_uri = f"http://{link.host}:{(port := free_port())}"
        (tmp / "mlflow").mkdir()
        server = start_mlflow_server(tmp / "mlflow", port, host=link.host, backend_store_uri=mlflow_db,
                                     artifacts_destination="s3://atop-mlflow/artifacts",
                                     MLFLOW_S3_ENDPOINT_URL=endpoint, **S3_KEYS)
        stack.callback(stop_by_pid, server)
        # the S3 credentials only in `ray start`'s environment, each node its own home
        (tmp / "head").mkdir()
        head = start_ray_head(tmp / "head", host=link.host, num_cpus=1, HOME=str(tmp / "head" / "home"), **S3_KEYS)
        stack.callback(kill_session, head.proc.pid)
        stack.callback(stop_by_pid, head.proc)
        (tmp / "node").mkdir()
        # its own Ray temp dir, named: without --temp-dir a node takes the head's path
        node_temp = tmp / "node" / "r"  # isolated: inside its own empty tmpfs over `tmp`
        node = start_ray_node(head, tmp / "node", num_cpus=1, host=link.node, prefix=link.prefix,
                              temp_dir=node_temp, HOME=str(tmp / "node" / "home"), **S3_KEYS)
        stack.callback(kill_session, node.pid)
        stack.callback(stop_by_pid, node)
        # the node's files as the node sees them (the test's folder hidden): through its root in /proc
        node_view = Path(f"/proc/{node.pid}/root") if link.isolated else Path("/")
        nodes = wait_for(lambda: len(n := alive_nodes(head.address)) == 2 and n, 180, "the second Ray node to join",
                         proc=node)
        head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
        node_id = next(n["node_id"] for n in nodes if not n["is_head_node"])
        if link.isolated:
            assert {n["node_ip"] for n in nodes} == {link.host, link.node}
            assert not (node_view / str(tmp / "head").lstrip("/")).exists()  # the head's files: out of its sight
            assert (node_view / str(node_temp).lstrip("/")).is_dir()

        storage = f"s3://atop-studies/studies?endpoint_override={endpoint.removeprefix('http://')}&scheme=http"
        stamp = int(time.time())
        first = _submit(head.address, f"atop-2n-{stamp}-a", optuna_url,
                        ["--preset", "tiny", "--study-name", NAME, "--data-dir", str(cifar_dir),
                         "--storage-path", storage, "--mlflow-uri", mlflow_uri, "--num-trials", str(FIRST),
                         "--max-concurrent", "2", "--cpus", "1"])
        assert f"study folder: s3://atop-studies/studies/{NAME}" in first, first[-3000:]
        client = MlflowClient(mlflow_uri)
        exp = client.get_experiment_by_name(NAME)
        where = {r.data.tags[TRIAL_TAG]: r.data.tags[NODE_TAG].split()
                 for r in client.search_runs([exp.experiment_id], role_filter(Role.TRIAL))}
        # 1 CPU a node, 1 a trial, 2 at once: one trial on each node
        assert sorted(nid for nid, _ in where.values()) == sorted([head_id, node_id]), (where, nodes)
        if link.isolated:
            assert sorted(ip for _, ip in where.values()) == sorted([link.host, link.node]), where

        # a fresh driver: only the name, the storage path and the Optuna URL (in the job's environment)
        again = _submit(head.address, f"atop-2n-{stamp}-b", optuna_url,
                        ["--study-name", NAME, "--resume", "--num-trials", str(TOTAL), "--storage-path", storage])
        assert f"study {NAME}: {FIRST} finished, {TOTAL - FIRST} to run" in again, again[-3000:]

        study_keys = s3_keys(endpoint, f"atop-studies/studies/{NAME}")
        mlflow_keys = s3_keys(endpoint, "atop-mlflow/artifacts")
        # the repository: only this study's name (a developer's checkout may hold studies of its own)
        left_behind = [*_study_files(REPO, (NAME,), ()),
                       *(p for d in _job_working_dirs(tmp / "head" / "r") for p in _study_files(d)),
                       *(p for d in _job_working_dirs(node_view / str(node_temp).lstrip("/"))
                         for p in _study_files(d))]
        runs = client.search_runs([exp.experiment_id], role_filter(Role.TRIAL))
        trials = optuna.load_study(study_name=NAME, storage=optuna_url.replace("postgresql://",
                                                                               "postgresql+psycopg://", 1)).trials
    wall = time.monotonic() - started

    # study.json, one Tune experiment per driver with its state, every trial's checkpoints: in the bucket
    assert "study.json" in study_keys, study_keys
    experiments = {k.split("/")[0] for k in study_keys if "/experiment_state-" in k}
    assert len(experiments) == 2 and all(e.startswith("tune-") for e in experiments), study_keys
    checkpointed = {k.split("/")[1] for k in study_keys if "/checkpoint_" in k}
    assert len(checkpointed) == TOTAL, study_keys
    assert not left_behind, left_behind  # nothing of the study in the repository or the job's working dirs
    # Optuna and MLflow agree: 4 trials, each finished once, each with its artifacts in the MLflow bucket
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(TOTAL)]
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in runs) == list(range(TOTAL)), \
        [(r.data.tags.get(TRIAL_TAG), r.info.status) for r in runs]
    assert all(r.info.status == "FINISHED" and r.data.tags[OPTUNA_STATE_TAG] == "COMPLETE" for r in runs)
    for run in runs:
        saved = {k.rsplit("/", 1)[1] for k in mlflow_keys if f"/{run.info.run_id}/artifacts/" in k}
        assert {"defense.pt", "images.png", "per_example.parquet"} <= saved, (run.info.run_id, mlflow_keys)
    ran_on = {r.data.tags[NODE_TAG].split()[0] for r in runs}
    assert ran_on == {head_id, node_id}
    kind = ("its own network namespace, the test's folder hidden" if link.isolated
            else "127.0.0.1 with its own Ray temp dir (no network namespace here)")
    shutil.rmtree(tmp, ignore_errors=True)  # kept when the test fails: its services' logs are there
    print(f"\ntwo nodes (second node: {kind}): {TOTAL} trials, {len(study_keys)} objects in the study bucket, "
          f"{len(mlflow_keys)} in the MLflow bucket; test wall time {wall:.0f} s")
