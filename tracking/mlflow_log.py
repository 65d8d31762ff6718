"""All MLflow traffic of a study goes through here: runs, buffered logging, spool replay.

Conventions (names in `tracking.contract`, read by `analysis/`): one experiment per study (name =
study name); one parent run (tag `atop.role=study`, run name = study name); one child run per
Optuna trial (tags `mlflow.parentRunId`, `atop.role=trial`, `optuna.trial_number`, `atop.space`);
params = `Config.to_dict()`; metrics per epoch with step = epoch; early-stopped runs tagged
`atop.stopped`.

`RunLogger` never lets an MLflow outage stop training: a call that fails is kept in a spool
(JSON lines next to the trial) and retried before the next call; what is still unsent at the end
stays in the spool file, which

    python -m tracking upload SPOOL.jsonl [...] --mlflow-uri URI

replays later (the study driver itself replays every spool of the study when it ends:
`flush_spools`, and logs its own end-of-study calls through a `RunLogger` too). While the server is down the driver waits to create a trial's run
(`create_trial_run`). docs/RELIABILITY.md lists what is promised and which test proves it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from atop.cli import OneLineParser
from atop.io import atomic_write_text
from tracking.contract import (
    LAST_ERROR_TAG,
    PARENT_TAG,
    ROLE_TAG,
    SPACE_TAG,
    TERMINAL_STATUSES,
    TRIAL_TAG,
    Role,
)


def quiet_http(max_retries: int = 1, timeout_s: int = 30) -> None:
    """Fail fast on an unreachable server (MLflow's default retries take minutes), then spool."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))


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
    found = c.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{Role.STUDY.value}'",
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


def create_trial_run(uri: str, experiment_id: str, parent_run_id: str, trial_number: int, space: str,
                     tags: Mapping[str, str], wait_s: float | None = None) -> str:
    """One child run per Optuna trial, created by the driver when the trial is asked.

    A run id cannot be made offline, so while the server is down this waits (retrying every 10 s,
    at most `wait_s`, default `$ATOP_MLFLOW_WAIT_S` or 1800 s); running trials keep training and
    spool meanwhile. Before each retry it looks for a run an earlier, unanswered try made, so a
    trial never gets two runs.
    """
    wait_s = float(os.environ.get("ATOP_MLFLOW_WAIT_S", "1800")) if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    attempt = 0
    while True:
        try:
            if attempt:
                found = trial_runs(uri, experiment_id, parent_run_id).get(trial_number)
                if found is not None:
                    return found.info.run_id
            run = client(uri).create_run(
                experiment_id, run_name=f"trial-{trial_number:04d}",
                tags={PARENT_TAG: parent_run_id, ROLE_TAG: Role.TRIAL.value, TRIAL_TAG: str(trial_number),
                      SPACE_TAG: space, **tags})
            return run.info.run_id
        except Exception as exc:  # transport or server error: wait for the server
            if time.monotonic() > deadline:
                raise
            attempt += 1
            print(f"MLflow unreachable while creating the run of trial {trial_number} "
                  f"({type(exc).__name__}); retry {attempt} in 10 s", flush=True)
            time.sleep(10)


def flush_spools(folder: str | os.PathLike, uri: str) -> int:
    """Send every spool file in `folder` (calls left by an outage); returns the calls still unsent."""
    return sum(upload(path, uri) for path in sorted(Path(folder).glob("*.jsonl")))


def failure_message(uri: str, run_id: str, reported: str) -> str:
    """The error to tag a FAILED run with: what the trial itself logged when it raised (tag
    `atop.last_error`, set before each retry) beats the driver's generic "the trial raised"."""
    if reported.startswith("the trial raised"):
        try:
            last = client(uri).get_run(run_id).data.tags.get(LAST_ERROR_TAG)
        except Exception:  # noqa: BLE001 - MLflow down: the generic message will do
            last = None
        if last:
            return f"{last} (the last of its attempts)"
    return reported


def _params(values: Mapping[str, Any]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


class RunLogger:
    """Logs to one MLflow run; a failed call is spooled to `spool` and retried before later calls.

    Args:
        uri: tracking URI.
        run_id: the (existing) run to log to.
        spool: JSON-lines file for calls that could not be sent; artifacts are referenced by path
            (keep them where they are until the spool is empty).
    """

    def __init__(self, uri: str, run_id: str, spool: str | os.PathLike):
        self.uri, self.run_id, self.spool = uri, run_id, Path(spool)
        self._client = client(uri)
        self._pending: list[dict[str, Any]] = []
        if self.spool.is_file():  # an earlier attempt of this trial left unsent calls
            self._pending = [json.loads(line) for line in self.spool.read_text().splitlines() if line.strip()]
        self.last_error: str | None = None

    # --- the calls a trial makes ------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._call({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": step,
                    "time": now})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call({"op": "tags", "tags": {k: str(v)[:5000] for k, v in tags.items()}})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_status(self, status: str) -> None:
        self._call({"op": "status", "status": status})

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left unsent."""
        while self._pending:
            try:
                self._send(self._pending[0])
            except Exception as exc:  # noqa: BLE001 - any transport or server error: keep it spooled
                self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                self._write_spool()
                return False
            self._pending.pop(0)
        self._write_spool()
        return True

    @property
    def pending(self) -> int:
        """Calls not sent yet (kept in the spool file)."""
        return len(self._pending)

    # --- internals --------------------------------------------------------------------------
    def _call(self, op: dict[str, Any]) -> None:
        self._pending.append(op)
        self.flush()

    def _write_spool(self) -> None:
        if self._pending:
            atomic_write_text(self.spool, "".join(json.dumps({**op, "run_id": self.run_id}) + "\n"
                                                  for op in self._pending))
        elif self.spool.exists():
            self.spool.unlink()

    def _send(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        kind, c, run_id = op["op"], self._client, op.get("run_id", self.run_id)
        if kind == "params":
            items = _params(op["params"])
            for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
                c.log_batch(run_id, params=items[i:i + 100])
        elif kind == "metrics":
            items = [Metric(k, v, op["time"], op["step"]) for k, v in op["metrics"].items()]
            for i in range(0, len(items), 1000):
                c.log_batch(run_id, metrics=items[i:i + 1000])
        elif kind == "tags":
            c.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "artifact":
            c.log_artifact(run_id, op["path"], op["artifact_path"])
        elif kind == "status":
            if op["status"] in TERMINAL_STATUSES:
                c.set_terminated(run_id, op["status"])
            else:
                c.update_run(run_id, status=op["status"])
        else:
            raise ValueError(f"unknown spooled op {kind!r}")


def upload(spool: str | os.PathLike, uri: str | None = None) -> int:
    """Replay a spool file left by an outage; returns the number of calls still unsent."""
    path = Path(spool)
    ops = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not ops:
        return 0
    logger = RunLogger(uri or ops[0].get("uri") or "", ops[0]["run_id"], path)
    logger.flush()
    return logger.pending


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tracking")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upload", help="send MLflow calls spooled during an outage")
    up.add_argument("spool", nargs="+")
    up.add_argument("--mlflow-uri", required=True)
    args = parser.parse_args(argv)
    left = sum(upload(s, args.mlflow_uri) for s in args.spool)
    print(f"{left} call(s) still unsent" if left else "all spooled calls sent")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
