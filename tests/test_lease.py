"""One driver per study (study.lease): a second driver is refused while the first lives, and the lease
is free again the moment the first is killed (SIGKILL: nothing of it runs to let go).

The holder is a real second process that takes the lease and sleeps; the study driver itself meeting
the lease is in tests/test_reliability_driver.py (a `--resume` while the driver runs).
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from study.errors import StudyError
from study.lease import LEASE_SUFFIX, take
from tests.conftest import REPO, wait_for

HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from study.lease import take
lease = take({url!r}, {study!r})
print("held", flush=True)
time.sleep(600)
"""


def hold_in_child(url: str, study: str) -> subprocess.Popen:
    """A process that holds the lease of `study` until killed; returns once it holds it."""
    child = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO), url=url, study=study)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip() == "held", child.stderr.read() if child.stderr else line
    return child


def refused(url: str, study: str) -> str | None:
    """The refusal's message, or None (then the lease was taken, and is given back at once)."""
    try:
        take(url, study).release()
    except StudyError as exc:
        return str(exc)
    return None


def check_held_then_freed_by_sigkill(url: str, study: str, names_holder: str) -> None:
    child = hold_in_child(url, study)
    try:
        message = refused(url, study)
        assert message is not None, "a second driver took the lease of a live one"
        assert "\n" not in message and f"study {study!r} is being run by another driver" in message
        assert names_holder.format(pid=child.pid) in message, message
        assert refused(url, "another-study") is None  # the lease is per study
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    wait_for(lambda: refused(url, study) is None, 30, "the lease of the killed holder to be free", every_s=0.2)


def test_sqlite_lease_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    db = tmp_path / "optuna.db"
    check_held_then_freed_by_sigkill(f"sqlite:///{db}", "s1", "PID {pid}")
    assert (tmp_path / f"optuna.db.s1{LEASE_SUFFIX}").is_file()  # beside the database: where every driver looks


def test_in_memory_sqlite_is_refused_in_one_line() -> None:
    with pytest.raises(StudyError, match="in-memory sqlite"):
        take("sqlite://", "s")


@pytest.mark.slow
def test_postgres_lease_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    from tests.services import postgres

    with postgres(tmp_path) as url:
        check_held_then_freed_by_sigkill(url, "s1", f"atop-driver {socket.gethostname()} {{pid}}")


def test_a_pickled_copy_of_a_lease_holds_nothing(tmp_path: Path) -> None:
    import pickle

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    held = take(url, "s1")
    copy = pickle.loads(pickle.dumps(held))  # as Tune pickles the searcher that sees the open study
    copy.release()
    assert refused(url, "s1") is not None  # still held by the original
    held.release()
    assert refused(url, "s1") is None
