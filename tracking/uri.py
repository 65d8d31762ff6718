"""The one check of an MLflow tracking URI, before anything is created or read (pure: urllib and
the standard library's sqlite3 only).

The study driver writes to a store that may not exist yet; `analysis` reads one that must exist.
Both fail fast here with one line instead of waiting on MLflow's retries or silently creating an
empty store.
"""
from __future__ import annotations

import os
import sqlite3
import urllib.error
import urllib.request


class TrackingURIError(ValueError):
    """An unusable tracking URI; the message is one line naming it and what is accepted."""


def store_path(uri: str) -> str:
    """The local path of a file store's URI: the database of `sqlite:///PATH`, the folder of
    `file:PATH` (a plain path is its own)."""
    if uri.startswith("sqlite:"):
        return uri.split(":///", 1)[-1]
    return uri.removeprefix("file://").removeprefix("file:")


def sqlite_file_problem(path: str, owner: str, table: str, *, may_be_new: bool) -> str | None:
    """Why the file at `path` cannot be `owner`'s SQLite database, or None when it can.

    Opened read-only and checked (`PRAGMA quick_check`, then `table`), so random bytes, another
    format, a folder, a truncated database or another program's database are refused before MLflow
    or Optuna would fail on them with a traceback (or write their tables into them).

    Args:
        path: the database file.
        owner: who the database is for, as the message names it ("MLflow", "Optuna").
        table: a table every database of `owner` has.
        may_be_new: True for a writer: a missing or empty file is a new database.
    """
    expected = f"expected an {owner} SQLite database"
    if os.path.isdir(path):
        return f"is a folder; {expected}"
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None if may_be_new else f"does not exist or is empty; {expected}"
    try:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                return f"is not an SQLite database (another format); {expected}"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            verdict = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            ours = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        finally:
            db.close()
    except (OSError, sqlite3.Error) as exc:
        return f"is not a readable SQLite database ({' '.join(str(exc).split())[:200]}); {expected}"
    if verdict != "ok":  # quick_check reports on several lines
        return f"is a damaged SQLite database ({' '.join(verdict.split())[:200]}); {expected}"
    return None if ours else f"has no table {table!r}: another program's database; {expected}"


def check_tracking_uri(uri: str, *, existing_store: bool, timeout_s: float = 5.0) -> None:
    """Raise `TrackingURIError` unless `uri` can work.

    Args:
        uri: `http(s)://` (its `/health` must answer 200 within `timeout_s`), `sqlite:///PATH`,
            `file:PATH`, `databricks`, or (readers only) a plain folder path.
        existing_store: True for a reader: the sqlite file or store folder must exist. False for a
            writer: the sqlite path must be absolute (a Tune trial's working directory is its own
            folder) and its folder must exist; the database itself may be new.
        timeout_s: how long an HTTP server may take to answer, in seconds.
    """
    scheme = uri.split(":", 1)[0].lower() if "://" in uri or uri.startswith("file:") else ""
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                status = response.status
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingURIError(f"--mlflow-uri {uri!r} is unreachable ({reason}); start the MLflow server "
                                   "or pass another URI") from None
        if status != 200:
            raise TrackingURIError(f"--mlflow-uri {uri!r} answered HTTP {status} on /health")
    elif scheme == "sqlite":
        path = store_path(uri)
        if existing_store:
            if not os.path.isfile(path):
                raise TrackingURIError(f"--mlflow-uri {uri!r}: no MLflow database at {path!r}")
        elif not path.startswith("/"):
            raise TrackingURIError(f"--mlflow-uri {uri!r} is relative; accepted: an absolute sqlite:////abs/path.db "
                                   "(a trial's working directory is its own folder)")
        elif not os.path.isdir(os.path.dirname(path)):
            raise TrackingURIError(f"--mlflow-uri {uri!r}: folder {os.path.dirname(path)!r} does not exist")
        if problem := sqlite_file_problem(path, "MLflow", "experiments", may_be_new=not existing_store):
            raise TrackingURIError(f"--mlflow-uri {uri!r}: {path!r} {problem}")
    elif scheme == "databricks" or (scheme == "file" and not existing_store):
        pass
    elif scheme == "file" or (scheme == "" and existing_store):
        path = store_path(uri)
        if not os.path.isdir(path):
            raise TrackingURIError(f"--mlflow-uri {uri!r}: no MLflow store directory at {path!r}")
    else:
        raise TrackingURIError(f"--mlflow-uri {uri!r} has an unsupported scheme; accepted: http(s)://, "
                               "sqlite:////, file:///")
