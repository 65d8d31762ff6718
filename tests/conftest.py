"""Shared fixtures: a real Ray head and a real MLflow server on 127.0.0.1, each started here and
stopped here by PID (never `ray stop`, which kills every Ray process on the machine).

Both are session-scoped and started only by tests that ask for them (the slow integration tests).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def data_dir() -> Path:
    """Real CIFAR-10 as .npz: $ATOP_DATA_DIR, else ../shared/data beside the repository."""
    return Path(os.environ.get("ATOP_DATA_DIR") or REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    path = data_dir()
    if not (path / "cifar10_test.npz").is_file():
        if os.environ.get("CI"):  # CI has ../shared beside the clone: missing data is a failure there
            pytest.fail(f"real CIFAR-10 .npz files not found in {path} (set ATOP_DATA_DIR)")
        pytest.skip(f"real CIFAR-10 .npz files not found in {path} (set ATOP_DATA_DIR)")
    return path


@pytest.fixture(scope="session", autouse=True)
def pretrained_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pre-training cache for the whole run (`atop.pretrained_cache`), outside the user's home:
    runs with equal pre-training settings share it, as a user's would; subprocesses inherit it."""
    path = tmp_path_factory.mktemp("pretrained-cache")
    os.environ["ATOP_CACHE_DIR"] = str(path)
    return path


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true",
                     help="also run tests marked slow (real Ray head, MLflow server, faults); CI does")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow to run it (the README test command and CI do)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(**extra: str) -> dict[str, str]:
    """The environment for services: the venv's bin first on PATH (Ray jobs run its `python`), without
    what an in-process `study.cluster.loopback_ray` of an earlier test set for an embedded Ray (with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 a second `ray start --address` node refuses to join)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s; log:\n{log.read_text()[-3000:]}")


def stop_by_pid(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process we started and its process group, then SIGKILL what is left, by PID."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)  # the group we created with start_new_session=True
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=grace_s if sig == signal.SIGTERM else 10)
        except subprocess.TimeoutExpired:
            continue
        _, alive = psutil.wait_procs(family, timeout=grace_s if sig == signal.SIGTERM else 5)
        if not alive:
            return
        for p in alive:  # children that left our process group (Ray's daemons): by PID
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
    psutil.wait_procs(family, timeout=10)


@dataclass
class RayHead:
    address: str  # the job-submission (dashboard) address, http://127.0.0.1:PORT
    gcs_address: str
    proc: subprocess.Popen


def start_ray_head(folder: Path, host: str = "127.0.0.1", num_cpus: int = 2, **env: str) -> RayHead:
    """A real Ray head (`ray start --head --block`) in its own session, its Ray temp dir in `folder`.

    Args:
        host: the node's address (an address of this machine other nodes reach); its dashboard,
            where jobs are submitted, stays on 127.0.0.1.
        env: added to the head's environment (which the driver of a submitted job inherits).
    """
    port, dash = free_port(), free_port()
    log = folder / "ray-head.log"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address", host, "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", str(num_cpus),
           "--include-dashboard", "true", "--block",
           # every fixed default port set free: other engineers' Ray heads share this machine
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--temp-dir", str(folder / "r")]
    with open(log, "w") as out:
        # RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` SIGKILLs a job this long after its SIGTERM (default 3 s,
        # too short for a study to settle: study/interrupt.py); docs/CLUSTER.md starts heads the same way
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
                                env=service_env(RAY_AUTH_MODE="disabled", RAY_JOB_STOP_WAIT_TIME_S="60", **env))
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", proc, 120, log)
    except BaseException:
        stop_by_pid(proc)
        raise
    return RayHead(f"http://127.0.0.1:{dash}", f"{host}:{port}", proc)


def alive_nodes(dashboard: str) -> list[dict]:
    """The alive nodes of the cluster whose dashboard is at `dashboard` (state API rows: `node_id`,
    `node_ip`, `is_head_node`, ...); [] while the dashboard does not answer."""
    import json

    try:
        with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?limit=100", timeout=5) as r:
            data = json.loads(r.read())
    except OSError:
        return []
    return [n for n in data["data"]["result"]["result"] if n.get("state") == "ALIVE"]


def start_ray_node(head: RayHead, folder: Path, *, num_cpus: int = 1, resources: str | None = None,
                   host: str = "127.0.0.1", temp_dir: Path | None = None, prefix: tuple[str, ...] = (),
                   **env: str) -> subprocess.Popen:
    """A second Ray node (`ray start --address --block`) in its own session; its log in `folder`.

    Args:
        host: the node's address. temp_dir: its own Ray temp dir (default Ray's, /tmp/ray).
        prefix: the command that runs `ray start` (e.g. in another network namespace); it must exec
            it, so that the returned process is the node's `ray start`.
        env: added to the node's environment (its trials inherit it).
    """
    cmd = [*prefix, str(VENV_BIN / "ray"), "start", "--address", head.gcs_address, "--node-ip-address", host,
           "--num-cpus", str(num_cpus), "--block",
           "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
           *(["--resources", resources] if resources else []), *(["--temp-dir", str(temp_dir)] if temp_dir else [])]
    with open(folder / "ray-node.log", "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
                                env=service_env(RAY_AUTH_MODE="disabled", **env))


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> Iterator[RayHead]:
    head = start_ray_head(tmp_path_factory.mktemp("ray"))
    try:
        yield head
    finally:
        stop_by_pid(head.proc)


@dataclass
class MlflowServer:
    uri: str
    proc: subprocess.Popen


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    tmp, port = tmp_path_factory.mktemp("mlflow"), free_port()
    proc = start_mlflow_server(tmp, port)
    try:
        yield MlflowServer(f"http://127.0.0.1:{port}", proc)
    finally:
        stop_by_pid(proc)


# --- helpers of the reliability tests: real processes, found and stopped by session and PID ------------

STUDY_PY = REPO / "study" / "run.py"
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def session_procs(sid: int) -> list:
    """Every live process of session `sid` (a Popen with start_new_session=True leads its own)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return found


def kill_session(sid: int, sig: int = signal.SIGKILL) -> int:
    """Send `sig` to every process of session `sid` (ours), by PID; returns how many were alive."""
    procs = session_procs(sid)
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # it exited meanwhile
            p.send_signal(sig)
    return len(procs)


def listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state held by `pids`."""
    import psutil

    found = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(c.laddr.ip, c.laddr.port, pid) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def wait_for(condition, timeout_s: float, what: str, every_s: float = 1.0, proc: subprocess.Popen | None = None):
    """Poll `condition()` until it returns something truthy; fail after `timeout_s` or if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode} first")
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s} s")


def start_study(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """`python study/run.py ARGS` in its own session (so the test can kill exactly its processes)."""
    out = open(log, "a")  # noqa: SIM115 - closed with the process by the caller's stop
    return subprocess.Popen([sys.executable, str(STUDY_PY), *args], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=log.parent, env=service_env(**env))


def stop_study(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of a study driver's session (its Ray included), by PID."""
    if proc.poll() is None:
        proc.kill()
    kill_session(proc.pid)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def start_mlflow_server(folder: Path, port: int, host: str = "127.0.0.1", backend_store_uri: str | None = None,
                        artifacts_destination: str | None = None, **env: str) -> subprocess.Popen:
    """A real `mlflow server` on host:port (restartable on the same store); its log in `folder`.

    Default stores: sqlite `folder/mlflow.db` and artifacts in `folder/artifacts`. `env` is added to
    the server's environment (an S3 endpoint and its credentials for `s3://` artifacts).
    """
    log = folder / "mlflow-server.log"
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", artifacts_destination or str(folder / "artifacts")]
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
                                env=service_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **env))
    try:
        wait_http(f"http://{host}:{port}/health", proc, 120, log)
    except BaseException:
        stop_by_pid(proc)
        raise
    return proc
