"""Real services for the cluster tests: PostgreSQL and an S3-compatible object store.

Not a test module. Each service binds to 127.0.0.1 on a free port, keeps its files under the
test's own folder, and is stopped by its own PID (never by name: other processes on this machine
are not ours).

- `postgres(folder)`: Debian's PostgreSQL server binaries (`initdb`, `postgres`; `.ci/run`
  installs the postgresql package where they are missing), run as the `postgres` user when the
  tests run as root (the server refuses root). Yields an SQLAlchemy URL for psycopg 3.
- `s3(folder)`: moto's server mode (`python -m moto.server`), the S3-compatible server Ray's own
  storage tests use. Yields the endpoint URL; `s3_env(endpoint)` is the environment that makes
  pyarrow (and so Ray Tune and our storage code) talk to it.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HOST = "127.0.0.1"
#: credentials moto accepts (any); pyarrow needs some to sign requests
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 60.0, host: str = HOST) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
    """Stop one process we started, by its PID: `sig`, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


def postgres_bin() -> Path:
    """The folder of Debian's PostgreSQL server binaries (the newest version installed)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin "
                           "(apt-get install postgresql, as .ci/run does)")
    return Path(found[-1]).parent


@contextlib.contextmanager
def postgres(folder: Path, database: str = "atop") -> Iterator[str]:
    """A fresh PostgreSQL server in `folder`; yields `postgresql+psycopg://atop@127.0.0.1:PORT/DB`."""
    bin_dir, port = postgres_bin(), free_port()
    user = "postgres" if os.geteuid() == 0 else None  # the server will not run as root
    # its own folder in /tmp: pytest's folders are root-only (0700), so the postgres user could not enter them
    home = Path(tempfile.mkdtemp(prefix="atop-test-pg-"))
    data = home / "pgdata"
    if user:
        os.chown(home, *_ids(user))
    log = open(Path(folder) / "postgres.log", "wb")  # noqa: SIM115  (closed below)
    subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "atop", "--auth=trust", "-E", "UTF8"],
                   check=True, user=user, stdout=log, stderr=subprocess.STDOUT)
    proc = subprocess.Popen([str(bin_dir / "postgres"), "-D", str(data), "-h", HOST, "-p", str(port),
                             "-k", str(data)], user=user, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, "postgres")
        _wait_ready(bin_dir, port)
        subprocess.run([str(bin_dir / "createdb"), "-h", HOST, "-p", str(port), "-U", "atop", database],
                       check=True, stdout=log, stderr=subprocess.STDOUT)
        yield f"postgresql+psycopg://atop@{HOST}:{port}/{database}"
    finally:
        stop(proc, signal.SIGINT)  # SIGINT: PostgreSQL's "fast" shutdown
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def create_database(url: str, name: str) -> str:
    """Create database `name` on the server of `url` (a `postgres()` URL); returns its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(url, isolation_level="AUTOCOMMIT")  # CREATE DATABASE refuses a transaction
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _wait_ready(bin_dir: Path, port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while subprocess.run([str(bin_dir / "pg_isready"), "-h", HOST, "-p", str(port)],
                         check=False, capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"postgres on port {port} not ready within {timeout_s:.0f} s")
        time.sleep(0.2)


def _ids(user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


@contextlib.contextmanager
def s3(folder: Path, host: str = HOST) -> Iterator[str]:
    """moto's S3-compatible server on `host` (an address of this machine); yields its endpoint
    `http://HOST:PORT` (in memory: no files)."""
    port = free_port()
    log = open(Path(folder) / "moto.log", "wb")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **S3_KEYS})
    try:
        wait_for_port(port, proc, "moto server", host=host)
        yield f"http://{host}:{port}"
    finally:
        stop(proc)
        log.close()


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment for a process that should use the S3 server at `endpoint` (pyarrow reads it)."""
    return {**S3_KEYS, "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}


def s3_fs(endpoint: str, **options):
    """A `pyarrow.fs.S3FileSystem` on the S3 server at `endpoint`, with the test credentials."""
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=endpoint, access_key=S3_KEYS["AWS_ACCESS_KEY_ID"],
                             secret_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"], region=S3_KEYS["AWS_DEFAULT_REGION"],
                             **options)


def make_bucket(endpoint: str, bucket: str) -> None:
    s3_fs(endpoint, allow_bucket_creation=True).create_dir(bucket)


def s3_keys(endpoint: str, prefix: str) -> list[str]:
    """Every object's key below `prefix` (`BUCKET/PATH`), relative to it, sorted."""
    import pyarrow.fs as pafs

    found = s3_fs(endpoint).get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path.removeprefix(prefix.rstrip("/") + "/") for i in found if i.type == pafs.FileType.File)
