"""All MLflow traffic of a study goes through here: runs, background logging, spool replay.

Conventions (names in `tracking.contract`, read by `analysis/`): one experiment per study (name =
study name); one parent run (tag `atop.role=study`, run name = study name); one child run per
Optuna trial (tags `mlflow.parentRunId`, `atop.role=trial`, `optuna.trial_number`, `atop.space`);
params = `Config.to_dict()`; metrics per epoch with step = epoch; early-stopped runs tagged
`atop.stopped`.

Tracking never stalls training. A `RunLogger` call only appends the call to its spool file (JSON
lines, next to the trial) and returns; a background thread (one per spool file and process) sends
the calls in order and removes them from the file once the server took them (a study's trials hand
their calls to their node's sender process, which runs these same queues: `tracking.spool_sender`).
While the server is down the calls wait in the file and the thread retries (backing off to every
`RETRY_MAX_S`); `flush()` waits, bounded, and says whether anything is left. A call the server
refuses for good (a 4xx: a deleted run, a changed param, an artifact file that is gone) is skipped,
reported on stdout and in `SPOOL.skipped`, and does not hold up the calls behind it. A status
change older than the run's current final status (a stale RUNNING or FINISHED replayed after the
driver ended the run) is skipped as stale: status changes apply in time order. What is unsent when
a process ends stays in the spool file, which

    python -m tracking upload SPOOL.jsonl [...] --mlflow-uri URI

replays later (the study driver itself replays every spool of the study when it ends:
`flush_spools`). Replaying is at-least-once and harmless when repeated: MLflow stores a metric
(same key, step, timestamp, value) once, a param or tag with the same value again, and status
changes are ordered by time.

A run id is made by the server, so a trial's run cannot exist while the server is down. The driver
therefore does not wait for it: `open_trial_run` queues a "create" call under a `TrialRunKey`
(experiment, parent run, trial number) and returns at once; the trial logs under the same key, and
its calls are sent once the driver's thread has created the run (found by its tags; a create that
finds the run already there does nothing, so a trial never gets two runs).

Why not MLflow's own async logging (`log_batch(..., synchronous=False)`,
`MLFLOW_ENABLE_ASYNC_LOGGING`): it covers metrics, params and tags only (no status change, no
artifact file, no run creation), sends merged batches from a pool of 10 threads (no order between
calls), and on failure logs the error and leaves it on the returned future: nothing is retried or
kept for later (checked in MLflow 3.17, `mlflow/utils/async_logging/async_logging_queue.py`).
docs/RELIABILITY.md lists what is promised and which test proves it.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atop.cli import OneLineParser, one_line_errors
from atop.io import atomic_write_text
from tracking.contract import (
    LAST_ERROR_TAG,
    PARENT_TAG,
    PRETRAINED_TAG,
    ROLE_TAG,
    SPACE_TAG,
    TERMINAL_STATUSES,
    TRIAL_TAG,
    Role,
    role_filter,
)
from tracking.uri import TrackingURIError, check_tracking_uri

#: backoff between two tries while the server is down: doubles from the first to the second
RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0
#: how long `flush`/`close` wait by default (a failed try ends the wait sooner)
FLUSH_S = 30.0
#: an idle thread waits this long for more calls before it ends
IDLE_S = 5.0
#: while a backlog drains, the spool file is rewritten at most this often (a process killed meanwhile
#: resends at most this much, which replay tolerates)
SYNC_EVERY_S = 0.5


def quiet_http(max_retries: int = 1, timeout_s: int = 30) -> None:
    """Fail fast on an unreachable server (MLflow's default retries take minutes), then spool."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))


def quiet_logs(verbose: bool) -> None:
    """MLflow's own INFO logs ("Creating initial MLflow database tables...") only if `verbose`.

    Call it before MLflow is imported: MLflow reads `MLFLOW_LOGGING_LEVEL` then, in this process and
    in the processes it starts (an embedded Ray's trial workers). A level the user set is kept.
    """
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None) -> str:
    """The study's experiment id, created once by the driver (never concurrently by trials)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=artifact_location)


def ensure_parent_run(uri: str, experiment_id: str, study_name: str, params: Mapping[str, Any],
                      tags: Mapping[str, str]) -> str:
    """The study's parent run: reused on resume (and set RUNNING again), else created."""
    c = client(uri)
    found = c.search_runs([experiment_id], filter_string=role_filter(Role.STUDY),
                          order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(experiment_id, run_name=study_name, tags={ROLE_TAG: Role.STUDY.value, **tags})
    c.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def trial_runs(uri: str, experiment_id: str, parent_run_id: str) -> dict[int, Any]:
    """Child runs of the study by Optuna trial number (the latest run where a number repeats)."""
    c = client(uri)
    runs = c.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                         max_results=50_000, order_by=["attributes.start_time ASC"])
    return {int(r.data.tags[TRIAL_TAG]): r for r in runs if TRIAL_TAG in r.data.tags}


def pretrained_of_trials(uri: str, experiment_name: str) -> list[str]:
    """The distinct `PRETRAINED_TAG` values of a study's trial runs, oldest run first: the weights
    ("classifier file,purifier file") its trials were fine-tuned from; empty before any trial ran."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment_name)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], filter_string=role_filter(Role.TRIAL), max_results=50_000,
                         order_by=["attributes.start_time ASC"])
    return list(dict.fromkeys(r.data.tags[PRETRAINED_TAG] for r in runs if PRETRAINED_TAG in r.data.tags))


@dataclass(frozen=True)
class TrialRunKey:
    """Names a trial's child run before the server has made it (and given it a run id).

    Its `ref` (`trial:<experiment_id>:<parent_run_id>:<number>`) goes where a run id would: into a
    `RunLogger`, a spool file, a Tune config. The run is found by its tags (`mlflow.parentRunId`,
    `optuna.trial_number`), the latest where several match (as `trial_runs` does).
    """

    experiment_id: str
    parent_run_id: str
    number: int

    PREFIX = "trial:"

    @property
    def ref(self) -> str:
        return f"{self.PREFIX}{self.experiment_id}:{self.parent_run_id}:{self.number}"

    @classmethod
    def parse(cls, ref: str) -> TrialRunKey | None:
        """The key in `ref`, or None when `ref` is a plain run id."""
        if not ref.startswith(cls.PREFIX):
            return None
        parts = ref[len(cls.PREFIX):].split(":")
        if len(parts) != 3 or not all(parts) or not parts[2].isdigit():
            raise ValueError(f"bad trial run reference {ref!r}; expected trial:EXPERIMENT_ID:PARENT_RUN_ID:NUMBER")
        return cls(parts[0], parts[1], int(parts[2]))


class RunNotCreatedYet(RuntimeError):
    """A call for a `TrialRunKey` whose run the driver has not created yet (tried again later)."""


def find_trial_run(uri: str, key: TrialRunKey) -> str | None:
    """The run id of `key`'s run, None if there is none yet."""
    found = client(uri).search_runs(
        [key.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{key.parent_run_id}' and tags.`{TRIAL_TAG}` = '{key.number}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


def _create_trial_run(uri: str, key: TrialRunKey, space: str, tags: Mapping[str, str],
                      start_ms: int | None = None) -> str:
    """`key`'s run: the existing one, else a new one (so a retried create never makes two)."""
    found = find_trial_run(uri, key)
    if found is not None:
        return found
    run = client(uri).create_run(
        key.experiment_id, start_time=start_ms, run_name=f"trial-{key.number:04d}",
        tags={**tags, PARENT_TAG: key.parent_run_id, ROLE_TAG: Role.TRIAL.value, TRIAL_TAG: str(key.number),
              SPACE_TAG: space})
    return run.info.run_id


def create_trial_run(uri: str, experiment_id: str, parent_run_id: str, trial_number: int, space: str,
                     tags: Mapping[str, str], wait_s: float | None = None) -> str:
    """One child run per Optuna trial, made now (blocking: for `--resume`, whose server is up).

    While the server is down this waits (retrying every 10 s, at most `wait_s`, default
    `$ATOP_MLFLOW_WAIT_S` or 1800 s). A study's driver should not wait: use `open_trial_run`.
    """
    wait_s = float(os.environ.get("ATOP_MLFLOW_WAIT_S", "1800")) if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    key, attempt = TrialRunKey(experiment_id, parent_run_id, trial_number), 0
    while True:
        try:
            return _create_trial_run(uri, key, space, tags)
        except Exception as exc:  # transport or server error: wait for the server
            if time.monotonic() > deadline:
                raise
            attempt += 1
            print(f"MLflow unreachable while creating the run of trial {trial_number} "
                  f"({type(exc).__name__}); retry {attempt} in 10 s", flush=True)
            time.sleep(10)


def open_trial_run(uri: str, key: TrialRunKey, spool: str | os.PathLike, space: str,
                   tags: Mapping[str, str]) -> RunLogger:
    """Queue the creation of `key`'s run and return its logger at once (never waits on MLflow).

    The run is created by the logger's background thread as soon as the server answers; calls made
    through the returned logger (the driver's settling tags and status) follow the creation in order.
    Give the trial `key.ref` in place of a run id: its own `RunLogger(uri, key.ref, ...)` sends once
    the run exists. `RunLogger.run_id` says the id when it is known.

    Args:
        uri: tracking URI.
        key: the trial's key (experiment, parent run, Optuna trial number).
        spool: the driver's spool file for this trial (e.g. `<study>/spool/driver-0007.jsonl`).
        space: the search space's name (tag `atop.space`).
        tags: more tags for the run (git SHA, package versions, ...).
    """
    log = RunLogger(uri, key.ref, spool)
    log._put({"op": "create", "space": space, "tags": {k: str(v)[:5000] for k, v in tags.items()}})
    return log


def flush_spools(folder: str | os.PathLike, uri: str, timeout_s: float = FLUSH_S) -> int:
    """Send every spool file in `folder` (calls left by an outage); returns the calls still unsent.

    Files holding a run's creation go first, so that the calls of its trial find the run. Files this
    process is still writing are flushed through their own logger, never sent twice at once.
    """
    return sum(upload(path, uri, timeout_s=timeout_s) for path in _creates_first(Path(folder).glob("*.jsonl")))


def _creates_first(paths: Any) -> list[Path]:
    """Spool files by name, those that create a run first (their trials' calls need the run)."""
    return sorted(sorted(Path(p) for p in paths),
                  key=lambda p: not any(op.get("op") == "create" for op in _read_spool(p)[0]))


def failure_message(uri: str, run_id: str, reported: str) -> str:
    """The error to tag a FAILED run with: what the trial itself logged when it raised (tag
    `atop.last_error`, set before each retry) beats the driver's generic "the trial raised".

    `run_id` may be a `TrialRunKey.ref`. This asks the server (one call, bounded by MLflow's HTTP
    timeout and retries); with the server down it returns `reported`."""
    if reported.startswith("the trial raised"):
        try:
            key = TrialRunKey.parse(run_id)
            found = run_id if key is None else _RESOLVED.get(run_id) or find_trial_run(uri, key)
            last = client(uri).get_run(found).data.tags.get(LAST_ERROR_TAG) if found else None
        except Exception:  # noqa: BLE001 - MLflow down: the generic message will do
            last = None
        if last:
            return f"{last} (the last of its attempts)"
    return reported


def _params(values: Mapping[str, Any]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


class RunLogger:
    """Logs to one MLflow run without ever waiting on the server (see the module docstring).

    Every call returns at once: it is appended to `spool` and sent by a background thread, in
    order. Loggers of one process that share a spool file share its queue and thread.

    Args:
        uri: tracking URI.
        run: the run's id, or a `TrialRunKey.ref` for a trial run the driver creates
            (`open_trial_run`).
        spool: JSON-lines file holding the calls not sent yet (made when needed, removed when
            empty); artifacts are referenced by path (keep them where they are until it is gone).
        queue: who holds the spool and sends its calls: by default this process (`SpoolQueue`);
            a trial passes its node's sender (`tracking.spool_sender.node_logger`).
    """

    def __init__(self, uri: str, run: str, spool: str | os.PathLike, *, queue: Any = None):
        if not run:
            raise ValueError("RunLogger needs a run id or a TrialRunKey.ref, got an empty string")
        TrialRunKey.parse(run)  # a malformed key raises here, not later in the thread
        self.uri, self.run, self.spool = uri, run, Path(spool)
        self._queue = queue if queue is not None else SpoolQueue.of(self.spool, uri)

    # --- the calls a trial makes: each returns at once ----------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._put({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._put({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": step})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._put({"op": "tags", "tags": {k: str(v)[:5000] for k, v in tags.items()}})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._put({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_status(self, status: str) -> None:
        """RUNNING, or a final status (`TERMINAL_STATUSES`); applied only over an older final one."""
        self._put({"op": "status", "status": status})

    # --- waiting, bounded ---------------------------------------------------------------------
    def flush(self, timeout_s: float = FLUSH_S) -> bool:
        """Send what is pending now; True when nothing is left unsent.

        Waits until the queue is empty, or a try started after this call failed (the server is
        down: the calls stay in the spool file and the thread keeps retrying), or `timeout_s`.
        """
        return self._queue.flush(timeout_s)

    def close(self, timeout_s: float = FLUSH_S) -> int:
        """`flush`, then stop retrying in this process; returns the calls left in the spool file
        (sent by the driver's `flush_spools` or `python -m tracking upload`). A later call on a
        logger of this spool starts the thread again."""
        return self._queue.close(timeout_s)

    @property
    def pending(self) -> int:
        """Calls not sent yet (kept in the spool file)."""
        return self._queue.pending

    @property
    def last_error(self) -> str | None:
        """The error of the last failed try ("ExceptionName: first line"), None if none failed."""
        return self._queue.last_error

    @property
    def skipped(self) -> list[str]:
        """One line per call skipped for good (refused by the server, or a stale status)."""
        return list(self._queue.skipped)

    @property
    def run_id(self) -> str | None:
        """The run's id: `run` itself, or the id its key resolved to (None until it is known)."""
        return self.run if TrialRunKey.parse(self.run) is None else _RESOLVED.get(self.run)

    def _put(self, op: dict[str, Any]) -> None:
        self._queue.put({**op, "run_id": self.run, "t": int(time.time() * 1000)})


#: TrialRunKey.ref -> run id, for every key resolved in this process
_RESOLVED: dict[str, str] = {}


class _Skip(Exception):
    """A call that can never succeed (or is stale): dropped and reported, not retried."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0][:300] if text else ""
    return first if isinstance(exc, _Skip) else f"{type(exc).__name__}: {first}"


def _permanent(exc: BaseException) -> bool:
    """True for an error no retry can fix: MLflow's 4xx answers (bad value, no such or deleted
    run, ...) except 429 (rate limit); transport errors and 5xx are worth retrying."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, _Skip):
        return True
    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return 400 <= code < 500 and code not in (408, 429)
    return False


#: the calls a spool file holds (`_put`'s ops)
SPOOLED_OPS = ("create", "params", "metrics", "tags", "artifact", "status")


class SpoolError(ValueError):
    """A file given as a spool that is not one; the message is one line naming it."""


def check_spool(path: Path) -> None:
    """A one-line `SpoolError` unless `path` is a spool file (or missing: nothing spooled).

    A spool is UTF-8 text of JSON objects, one call per line, each with a known "op" and a "run_id".
    Lines that are not JSON are tolerated (a crash cuts one short) as long as some line is a call;
    a line of JSON that is not a call means another file.
    """
    where, expected = f"spool {str(path)!r}", "expected a .jsonl spool of MLflow calls (one JSON call per line)"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    except UnicodeDecodeError:
        raise SpoolError(f"{where} is not UTF-8 text; {expected}") from None
    except OSError as exc:
        raise SpoolError(f"{where} cannot be read ({exc.strerror}); {expected}") from None
    calls = 0
    for number, line in enumerate((line for line in text.splitlines() if line.strip()), start=1):
        try:
            op = json.loads(line)
        except ValueError:
            continue
        if not (isinstance(op, dict) and op.get("op") in SPOOLED_OPS and isinstance(op.get("run_id"), str)):
            raise SpoolError(f"{where}: line {number} is JSON but not a spooled call; {expected}")
        calls += 1
    if text.strip() and not calls:
        raise SpoolError(f"{where} holds no spooled call; {expected} (a spool whose only line a crash cut "
                         "short has nothing to send: delete it)")


def _read_spool(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the ops in a spool file, how many lines could not be read: a line cut by a crash)."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return [], 0
    ops, bad = [], 0
    for line in lines:
        try:
            ops.append(json.loads(line))
        except ValueError:
            bad += 1
    return ops, bad


#: every spool queue of this process, by resolved spool path (kept: an idle one holds no thread)
_QUEUES: dict[Path, SpoolQueue] = {}
_QUEUES_LOCK = threading.Lock()


def close_queues(timeout_s: float) -> int:
    """Close the spool queues of this process that have calls to send, one after the other, until
    `timeout_s` is spent; returns the calls left unsent (the spool files keep them)."""
    deadline = time.monotonic() + timeout_s
    with _QUEUES_LOCK:
        queues = list(_QUEUES.values())
    left = 0
    for queue in queues:
        if queue.pending:
            budget = deadline - time.monotonic()
            left += queue.close(budget) if budget > 0 else queue.pending
    return left


class SpoolQueue:
    """The calls of one spool file in one process, sent in order by a thread of their own.

    The file is the truth: a call is appended to it before `put` returns (write-ahead), the thread
    removes what the server took, and whenever no thread runs the queue reads the file again (so
    a spool that `python -m tracking upload` emptied meanwhile is not sent twice). The thread
    ends when the queue is empty or `close` stops it; an idle queue holds no thread.
    """

    @classmethod
    def of(cls, spool: Path, uri: str) -> SpoolQueue:
        key = spool.resolve()
        with _QUEUES_LOCK:
            queue = _QUEUES.get(key)
            if queue is None:
                queue = _QUEUES[key] = cls(key, uri)
            elif queue.uri != uri:
                queue.retarget(uri)
            return queue

    def __init__(self, path: Path, uri: str):
        self.path, self.uri = path, uri
        self.skipped_path = path.with_name(path.name + ".skipped")
        self._cv = threading.Condition()
        self._pending: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._kick = False
        self._tries = 0  # tries started so far
        self._failed_try = 0  # the number of the last try that failed
        self._synced = time.monotonic()
        self.last_error: str | None = None
        self.skipped: list[str] = []
        with self._cv:
            self._start()  # an earlier process (or attempt of the trial) left these unsent

    def retarget(self, uri: str) -> None:
        """Send to `uri` from now on; refused while the thread is sending to the old one."""
        with self._cv:
            if self._thread is not None:
                raise ValueError(f"spool {self.path} is being sent to {self.uri}; close its logger before "
                                 f"sending it to {uri}")
            self.uri = uri

    @property
    def pending(self) -> int:
        with self._cv:
            self._reload()
            return len(self._pending)

    def state(self) -> dict[str, Any]:
        """{"pending", "last_error", "skipped"}: what `RunLogger` reports of its queue."""
        return {"pending": self.pending, "last_error": self.last_error, "skipped": list(self.skipped)}

    def put(self, op: dict[str, Any]) -> None:
        with self._cv:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:  # write-ahead: a process killed now loses nothing
                f.write(json.dumps(op) + "\n")
            if self._thread is None:
                self._stopped = False
                self._start()  # reads the file, this call included
            else:
                self._pending.append(op)
                self._cv.notify_all()  # a lingering thread takes it at once

    def flush(self, timeout_s: float) -> bool:
        with self._cv:
            self._stopped = False
            self._start()
            if not self._pending:
                return True
            started = self._tries
            self._kick = True
            self._cv.notify_all()
            self._cv.wait_for(lambda: not self._pending or self._failed_try > started, timeout=timeout_s)
            return not self._pending

    def close(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:  # it ends after the try in progress (bounded by the HTTP timeout)
            thread.join(max(2.0, deadline - time.monotonic()))
        with self._cv:
            if self._thread is None:
                self._reload()
            else:
                self._sync()
            return len(self._pending)

    def _reload(self) -> None:  # with self._cv held
        if self._thread is None:
            self._pending, unreadable = _read_spool(self.path)
            if unreadable:  # a line cut short by a crash: nothing to send
                self._report_skip({"op": "?", "run_id": "?"}, f"{unreadable} unreadable line(s) in {self.path}")
                self._sync()

    # --- the background thread ---------------------------------------------------------------
    def _start(self) -> None:  # with self._cv held
        self._reload()
        if self._thread is None and self._pending and not self._stopped:
            self._thread = threading.Thread(target=self._work, name=f"mlflow-spool-{self.path.stem}", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        from mlflow import MlflowClient

        mlflow = MlflowClient(tracking_uri=self.uri)
        delay = RETRY_MIN_S
        while True:
            with self._cv:
                if not self._pending and not self._stopped:  # linger: calls come in bursts
                    self._cv.wait_for(lambda: self._pending or self._stopped, timeout=IDLE_S)
                if self._stopped or not self._pending:
                    self._sync()
                    self._thread = None
                    self._cv.notify_all()
                    return
                op = self._pending[0]
                self._tries += 1
                this_try = self._tries
            try:
                _send(mlflow, self.uri, op)
                error, skip = None, None
            except Exception as exc:  # noqa: BLE001 - sorted below: skipped for good, or retried
                error, skip = _one_line(exc), _permanent(exc)
            with self._cv:
                if error is None or skip:
                    self._pending.pop(0)
                    if skip:
                        self._report_skip(op, error or "")
                    delay = RETRY_MIN_S
                    if not self._pending or time.monotonic() - self._synced > SYNC_EVERY_S:
                        self._sync()
                else:
                    self.last_error, self._failed_try = error, this_try
                    self._sync()
                self._cv.notify_all()
                if error is not None and not skip:
                    self._cv.wait_for(lambda: self._kick or self._stopped, timeout=delay)
                    self._kick = False
                    delay = min(2 * delay, RETRY_MAX_S)

    def _sync(self) -> None:  # with self._cv held: the file holds exactly the pending calls
        self._synced = time.monotonic()
        if self._pending:
            atomic_write_text(self.path, "".join(json.dumps(op) + "\n" for op in self._pending))
        else:
            self.path.unlink(missing_ok=True)

    def _report_skip(self, op: dict[str, Any], why: str) -> None:
        line = f"MLflow: skipped {op.get('op')!r} call for run {op.get('run_id')}: {why}"
        self.skipped.append(line)
        print(line, flush=True)
        with open(self.skipped_path, "a") as f:
            f.write(json.dumps({**op, "skipped": why}) + "\n")


def _send(c: Any, uri: str, op: dict[str, Any]) -> None:
    """Perform one spooled call with client `c`; raises `_Skip` for a call that can never succeed."""
    from mlflow.entities import Metric, RunTag

    kind, ref = op["op"], op["run_id"]
    key = TrialRunKey.parse(ref)
    if kind == "create":
        if key is None:
            raise _Skip(f"'create' needs a trial run key, not the run id {ref!r}")
        _RESOLVED[ref] = _create_trial_run(uri, key, op["space"], op["tags"], start_ms=op.get("t"))
        return
    if key is None:
        run_id = ref
    else:
        found = _RESOLVED.get(ref) or find_trial_run(uri, key)
        if found is None:
            raise RunNotCreatedYet(f"trial {key.number}'s run is not created yet (the driver does that)")
        run_id = _RESOLVED[ref] = found
    if kind == "params":
        items = _params(op["params"])
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            c.log_batch(run_id, params=items[i:i + 100])
    elif kind == "metrics":
        stamp = int(op["time"] if "time" in op else op["t"])  # "time": spool files written before "t" existed
        items = [Metric(k, v, stamp, op["step"]) for k, v in op["metrics"].items()]
        for i in range(0, len(items), 1000):
            c.log_batch(run_id, metrics=items[i:i + 1000])
    elif kind == "tags":
        c.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
    elif kind == "artifact":
        if not Path(op["path"]).is_file():
            raise _Skip(f"the file {op['path']} is not on this machine (any more)")
        c.log_artifact(run_id, op["path"], op["artifact_path"])
    elif kind == "status":
        _set_status(c, run_id, op["status"], op.get("t"))
    else:
        raise _Skip(f"unknown spooled op {kind!r}")


def _set_status(c: Any, run_id: str, status: str, t: int | None) -> None:
    """Apply a status change made at time `t` (ms; None: unknown) unless the run's final status is
    newer: a stale RUNNING (or an earlier FINISHED) never overwrites a later FINISHED/FAILED/KILLED."""
    info = c.get_run(run_id).info
    if info.status in TERMINAL_STATUSES:
        if t is None or info.end_time is None:
            stale = status not in TERMINAL_STATUSES
        else:
            stale = t <= info.end_time
        if stale:
            raise _Skip(f"stale: {status} made at {t} is older than the run's {info.status} at {info.end_time}")
    if status in TERMINAL_STATUSES:
        c.set_terminated(run_id, status, end_time=t)
    else:
        c.update_run(run_id, status=status)


def upload(spool: str | os.PathLike, uri: str, timeout_s: float = FLUSH_S) -> int:
    """Replay a spool file left by an outage; returns the number of calls still unsent.

    Calls skipped for good are printed and appended to `SPOOL.skipped`."""
    path = Path(spool)
    if not path.exists():  # nothing spooled (a live queue always has its file)
        return 0
    return SpoolQueue.of(path, uri).close(timeout_s)


@atexit.register
def _flush_at_exit(budget_s: float = 10.0) -> None:
    """Give what is queued a last, bounded chance to leave (the spool files keep the rest)."""
    close_queues(budget_s)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tracking")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upload", help="send MLflow calls spooled during an outage")
    up.add_argument("spool", nargs="+")
    up.add_argument("--mlflow-uri", required=True)
    args = parser.parse_args(argv)

    def body() -> int:
        check_tracking_uri(args.mlflow_uri, existing_store=False)  # everything is checked before a call is sent
        for spool in args.spool:
            check_spool(Path(spool))
        left = sum(upload(p, args.mlflow_uri) for p in _creates_first(args.spool))
        skipped = sum(len(q.skipped) for q in _QUEUES.values())
        print(f"{left} call(s) still unsent" if left else "all spooled calls sent", end="")
        print(f"; {skipped} skipped for good (listed above and in SPOOL.skipped)" if skipped else "")
        return 1 if left else 0

    return one_line_errors(body, (SpoolError, TrackingURIError))


if __name__ == "__main__":
    sys.exit(main())
