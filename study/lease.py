"""One driver per study: a lease the driver holds while it runs, released when it ends, however it ends.

Two drivers on one study (a `--resume` while the first still runs, say a `ray job submit` that was
thought dead) would each settle the other's running trials as interrupted and run trials twice. The
lease lives where the study's trials live, its Optuna database, so every driver of the study meets
it from any node, and it is released by the operating system or the database server when the holder
ends, SIGKILL included (nothing to expire, nothing to clean up by hand):

- sqlite (one machine, the default): an exclusive `flock` on `<database file>.<study>.lease`;
- PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`) on a connection held open;
- MySQL: a named lock (`GET_LOCK`) on a connection held open.

The holder writes who it is (host, PID, start time, Ray job) where the next driver can read it:
into the lease file, or as the lock connection's application name (PostgreSQL). A server that drops
the lock connection (a restart, an idle-connection timeout) drops the lease with it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from study.errors import StudyError
from study.storage import job_submission_id

#: suffix of the lease file beside an sqlite database
LEASE_SUFFIX = ".lease"


class Lease:
    """A held lease; `release()` (or the end of the process) gives it up; releasing twice is harmless."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    # Tune pickles the searcher, whose callbacks see the driver's open study and so this lease:
    # a copy holds nothing (the lock stays with this process's descriptor or connection).
    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._release = None


def take(optuna_url: str, study: str) -> Lease:
    """The lease of `study`, whose Optuna trials are at `optuna_url` (password included).

    Raises:
        StudyError: another live driver holds it (one line naming that driver, what to do).
    """
    from sqlalchemy.engine import make_url

    url = make_url(optuna_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise StudyError(f"--optuna-storage {optuna_url!r}: an in-memory sqlite database cannot hold a study; "
                             "accepted: sqlite:///ABSOLUTE/PATH.db or a database server")
        db = Path(url.database)
        return _file_lease(db.with_name(f"{db.name}.{study}{LEASE_SUFFIX}"), study)  # names are NAME_RE-safe
    if backend in ("postgresql", "mysql"):
        return _server_lease(optuna_url, backend, study)
    raise StudyError(f"--optuna-storage: no driver lease for {backend!r}; accepted: sqlite, postgresql, mysql")


def holder() -> dict[str, Any]:
    """Who this driver is, as the lease records it."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "ray_job": job_submission_id()}


def describe(who: dict[str, Any]) -> str:
    text = f"host {who.get('host', '?')}, PID {who.get('pid', '?')}, since {who.get('since', '?')}"
    return text + (f", Ray job {who['ray_job']}" if who.get("ray_job") else "")


def refusal(study: str, who: str) -> StudyError:
    return StudyError(f"study {study!r} is being run by another driver ({who}); wait for it to end, or stop it "
                      "(`ray job stop JOB`, or kill its PID) and --resume again")


def _file_lease(path: Path, study: str) -> Lease:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            who = describe(json.loads(os.pread(fd, 4096, 0) or b"{}"))
        except ValueError:  # the holder is between truncating and writing
            who = "its record is being written"
        os.close(fd)
        raise refusal(study, who) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder()).encode(), 0)
    return Lease(lambda: os.close(fd))  # closing the descriptor (or dying) releases the flock


def _server_lease(optuna_url: str, backend: str, study: str) -> Lease:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from study.optuna_storage import CONNECT_TIMEOUT_S

    me = holder()
    name = f"atop-driver {me['host']} {me['pid']}"[:63]  # PostgreSQL keeps 63 bytes of an application name
    args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S}
    if backend == "postgresql":
        args["application_name"] = name
    engine = create_engine(optuna_url, poolclass=NullPool, connect_args=args,
                           isolation_level="AUTOCOMMIT")  # idle between statements, never "idle in transaction"
    conn = engine.connect()

    def release() -> None:
        with contextlib.suppress(Exception):  # a connection already gone has released the lock
            conn.close()
        engine.dispose()

    try:
        key = _lock_key(study)
        if backend == "postgresql":
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            who = None if got else _postgres_holder(conn, key)
        else:
            lock = f"atop-study-{key:016x}"  # MySQL lock names are at most 64 characters
            got = conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": lock}).scalar() == 1
            who = None if got else f"MySQL connection {conn.execute(text('SELECT IS_USED_LOCK(:n)'), {'n': lock}).scalar()}"
    except BaseException:
        release()
        raise
    if not got:
        release()
        raise refusal(study, who or "unknown")
    return Lease(release)


def _lock_key(study: str) -> int:
    """A positive 63-bit key for `study` (advisory locks are per database: the study name suffices)."""
    return int.from_bytes(hashlib.sha256(f"atop-study\0{study}".encode()).digest()[:8], "big") >> 1


def _postgres_holder(conn: Any, key: int) -> str:
    """The application name and start of the session holding advisory lock `key`."""
    from sqlalchemy import text

    row = conn.execute(text(
        "SELECT a.application_name, a.client_addr, a.backend_start FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.classid = :hi AND l.objid = :lo AND l.objsubid = 1"), {"hi": key >> 32, "lo": key & 0xFFFFFFFF}).first()
    if row is None:
        return "unknown"
    app, addr, start = row
    return f"{app or 'no application name'} from {addr or 'a local socket'}, connected {start:%Y-%m-%d %H:%M:%S}"
