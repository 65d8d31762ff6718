"""Load one study's MLflow runs into a pyarrow Table (one row per run).

Columns of the table (also those of ``runs.parquet``):

- ``run_id``, ``run_name``, ``status`` (MLflow run status), ``role`` (tag ``atop.role``),
  ``trial_number`` (tag ``optuna.trial_number``, int64, null when absent), ``space`` (tag
  ``atop.space``), ``stopped`` (tag ``atop.stopped`` == ``true``);
- the confirm stage's tags (null when absent): ``stage`` (``atop.stage``), ``eval_level``
  (``atop.eval_level``), ``confirm_of`` (``atop.confirm_of``, int64), ``confirm_of_run``,
  ``reference``, ``audit`` (``atop.confirm_of_run``, ``atop.reference``, ``atop.audit``),
  ``parent_run_id`` (``mlflow.parentRunId``: a ``confirm_seed`` run's ``confirm`` run),
  ``infeasible`` (``atop.infeasible``: the ``--constraint`` bounds a trial broke), ``evaluation``
  (``atop.evaluation``: how a trial's figures were obtained, one line);
- ``start_time``, ``end_time`` (UTC timestamps, ms), ``duration_s`` (float, null while running);
- ``params.<name>``: every param any run logged, as the logged string (null when a run lacks it);
- ``final.<metric>``: the value at the largest step (MLflow's latest value);
- ``best.<metric>``: the best value over the run's history: the minimum for metrics named
  ``loss...`` or listed in ``minimise``, the maximum otherwise.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa

from analysis.errors import AnalysisError
from tracking.contract import (
    AUDIT_TAG,
    CONFIRM_OF_RUN_TAG,
    CONFIRM_OF_TAG,
    EVAL_LEVEL_TAG,
    EVALUATION_TAG,
    INFEASIBLE_TAG,
    PARENT_TAG,
    REFERENCE_TAG,
    ROLE_TAG,
    SPACE_TAG,
    STAGE_TAG,
    STOPPED_TAG,
    TRIAL_TAG,
    Role,
)

#: column -> MLflow tag, for the tags kept as text columns
TEXT_TAGS = {
    "stage": STAGE_TAG,
    "eval_level": EVAL_LEVEL_TAG,
    "confirm_of_run": CONFIRM_OF_RUN_TAG,
    "reference": REFERENCE_TAG,
    "audit": AUDIT_TAG,
    "infeasible": INFEASIBLE_TAG,
    "parent_run_id": PARENT_TAG,
    "evaluation": EVALUATION_TAG,
}
from tracking.uri import TrackingURIError, check_tracking_uri

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient


@dataclass(frozen=True)
class Study:
    """One experiment's runs.

    Attributes:
        name: Experiment (= study) name.
        experiment_id: MLflow experiment id.
        parent_run_id: Id of the study's parent run (tag ``atop.role=study``); the latest started
            one if the study was resumed under several, None if there is none.
        table: One row per run, sorted by trial number then start time (see module docstring).
        metric_names: Sorted names of every metric any run logged.
    """

    name: str
    experiment_id: str
    parent_run_id: str | None
    table: pa.Table
    metric_names: tuple[str, ...]


def load_study(
    uri: str, experiment: str, minimise: Collection[str] = (), timeout_s: float = 5.0
) -> Study:
    """Read every active run of one experiment.

    Args:
        uri: MLflow tracking URI (checked first with :func:`tracking.uri.check_tracking_uri`).
        experiment: Experiment name (one experiment per study).
        minimise: Metric names whose ``best.`` value is their minimum (besides ``loss...``).
        timeout_s: Timeout of the reachability check, in seconds.

    Returns:
        The study's runs as a :class:`Study`.

    Raises:
        AnalysisError: The URI is unreachable or the experiment does not exist.
    """
    try:
        check_tracking_uri(uri, existing_store=True, timeout_s=timeout_s)
    except TrackingURIError as exc:
        raise AnalysisError(str(exc)) from None
    # imported after the check: an unreachable URI is refused without loading MLflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise AnalysisError(
            f"experiment {experiment!r} does not exist at {uri}; existing: {', '.join(names)}"
        )
    runs = _search_all(client, exp.experiment_id)
    rows = [_row(client, run, set(minimise)) for run in runs]
    rows.sort(key=lambda r: (r["trial_number"] is None, r["trial_number"] or 0, r["start_time"]))
    parents = [r for r in rows if r["role"] == Role.STUDY.value]
    parent = max(parents, key=lambda r: r["start_time"])["run_id"] if parents else None
    metrics = sorted({k.removeprefix("final.") for r in rows for k in r if k.startswith("final.")})
    return Study(experiment, exp.experiment_id, parent, _to_table(rows), tuple(metrics))


def _search_all(client: MlflowClient, experiment_id: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _row(client: MlflowClient, run: Run, minimise: set[str]) -> dict:
    info, tags = run.info, run.data.tags
    start = _ms_to_datetime(info.start_time)
    end = _ms_to_datetime(info.end_time)
    row = {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "status": info.status,
        "role": tags.get(ROLE_TAG),
        "trial_number": _int_tag(tags.get(TRIAL_TAG)),
        "space": tags.get(SPACE_TAG),
        "stopped": tags.get(STOPPED_TAG, "").lower() == "true",
        "start_time": start,
        "end_time": end,
        "duration_s": (end - start).total_seconds() if start and end else None,
        "confirm_of": _int_tag(tags.get(CONFIRM_OF_TAG)),
        **{column: tags.get(tag) for column, tag in TEXT_TAGS.items()},
    }
    row.update({f"params.{k}": v for k, v in run.data.params.items()})
    for key, final in run.data.metrics.items():
        # The latest value comes with the run; the best one needs the whole history.
        values = [m.value for m in client.get_metric_history(info.run_id, key)]
        pick = min if key.startswith("loss") or key in minimise else max
        row[f"final.{key}"] = final
        row[f"best.{key}"] = pick(values) if values else final
    return row


def _int_tag(text: str | None) -> int | None:
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


def _ms_to_datetime(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None


def _to_table(rows: list[dict]) -> pa.Table:
    fixed = {
        "run_id": pa.string(),
        "run_name": pa.string(),
        "status": pa.string(),
        "role": pa.string(),
        "trial_number": pa.int64(),
        "space": pa.string(),
        "stopped": pa.bool_(),
        "start_time": pa.timestamp("ms", tz="UTC"),
        "end_time": pa.timestamp("ms", tz="UTC"),
        "duration_s": pa.float64(),
        "confirm_of": pa.int64(),
        **{column: pa.string() for column in TEXT_TAGS},
    }
    extra = sorted({k for r in rows for k in r} - fixed.keys())
    schema = pa.schema(
        list(fixed.items())
        + [(k, pa.string() if k.startswith("params.") else pa.float64()) for k in extra]
    )
    return pa.Table.from_pylist(rows, schema=schema)
