"""Where a study's Optuna trials live: `--optuna-storage URL`, or sqlite in the study folder.

On one machine the default (`sqlite:///<study folder>/optuna.db`) is enough. On a cluster, give an
RDB server every driver can reach, e.g. `postgresql://user@db:5432/optuna` (PostgreSQL through
psycopg 3, which the project installs; `postgresql://` is read as `postgresql+psycopg://` when
psycopg2 is absent). The URL is checked (a connection within `CONNECT_TIMEOUT_S`) before anything
is created; what the study keeps of it (study.json, the parent run's params) has its password hidden,
so a resume names the URL again (or reads it from `$ATOP_OPTUNA_STORAGE`) when it had one.
"""
from __future__ import annotations

import importlib.util

from study.errors import StudyError  # light: the command line's checks use this module
from tracking.uri import sqlite_file_problem

CONNECT_TIMEOUT_S = 10
#: environment variable read when `--optuna-storage` is not given (keeps a password off the command line)
ENV = "ATOP_OPTUNA_STORAGE"
SCHEMES = ("sqlite", "postgresql", "mysql")


def resolve(url: str) -> str:
    """`url` with the driver this project installs filled in (psycopg 3 for PostgreSQL).

    Raises:
        StudyError: not a URL of an RDB Optuna supports (one line, the accepted schemes).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StudyError(f"--optuna-storage {public(url)!r} is not a database URL; accepted: "
                         f"{', '.join(s + '://...' for s in SCHEMES)}") from None
    if parsed.get_backend_name() not in SCHEMES:
        raise StudyError(f"--optuna-storage {public(url)!r} has scheme {parsed.drivername!r}; accepted: "
                         f"{', '.join(SCHEMES)}")
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg2") is None:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def public(url: str) -> str:
    """`url` with its password hidden (what may be printed, logged or saved)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1] if "@" in url else url


def check(url: str) -> None:
    """A one-line `StudyError` unless the database at `url` accepts a connection now."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if database and (problem := sqlite_file_problem(database, "Optuna", "studies", may_be_new=True)):
        raise StudyError(f"--optuna-storage {public(url)!r}: {database!r} {problem}")
    args = {"connect_timeout": CONNECT_TIMEOUT_S} if parsed.get_backend_name() != "sqlite" else {}
    engine = create_engine(url, connect_args=args)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any driver error means: not usable
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise StudyError(f"--optuna-storage {public(url)!r} is unreachable ({reason}); start the database "
                         "or fix the URL") from None
    finally:
        engine.dispose()
